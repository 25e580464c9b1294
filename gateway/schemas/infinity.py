"""The Infinity rerank dialect (`infinity_emb`): documents come back as plain strings.

Infinity's `RerankInput` takes `query`, `documents` (strings), `return_documents` (default false), `top_n`,
`raw_scores`, `model`; its `ReRankResult` answers `{object: "rerank", results[{relevance_score, index,
document: str | null}], model, usage{prompt_tokens, total_tokens}, id, created}`. The request is the Jina
one, so it is told apart by where it is sent: the `/infinity` prefix (a client's base URL) or the
`X-Rerank-Dialect: infinity` header. `GET /models` and `/infinity/models` answer Infinity's model list.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from gateway.schemas.common import STRICT_REQUEST, ParsedDocuments, TopN, parse_documents
from gateway.service import RerankOutcome, RerankQuery


class InfinityRequest(BaseModel):
    """Infinity rerank request (plus the mxbai extra `instruction`)."""

    model_config = STRICT_REQUEST

    model: str | None = Field(None, description="Optional; when given, the served name or an alias.")
    query: str = Field(description="The search query.")
    documents: list[str] = Field(description="The texts to rank.", json_schema_extra={"minItems": 1})
    return_documents: bool = Field(False, description="Echo each text in `results[].document`.")
    top_n: TopN | None = Field(None, description="Return only the `top_n` best documents.")
    raw_scores: bool = Field(False, description="Return the raw score instead of the normalized 0..1 one.")
    instruction: str | None = Field(None, description="mxbai extra: an instruction put before the query.")


class InfinityResult(BaseModel):
    relevance_score: float = Field(description="Normalized score in 0..1, or the raw score.")
    index: int = Field(description="Position of the text in the request's `documents`.")
    document: str | None = Field(None, description="The text, with `return_documents`.")


class InfinityUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InfinityResponse(BaseModel):
    """Infinity rerank response."""

    object: Literal["rerank"] = "rerank"
    results: list[InfinityResult] = Field(description="Ranked documents, best first.")
    model: str
    usage: InfinityUsage
    id: str = Field(description="The request id (also in the `x-request-id` header).")
    created: int = Field(description="Unix time of the answer.")


class InfinityModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "rerank-gateway"
    created: int
    backend: str = Field(description="The engine that serves the model.")
    capabilities: list[str] = Field(default_factory=lambda: ["rerank"])
    stats: dict = Field(default_factory=dict)


class InfinityModelList(BaseModel):
    """Infinity's `GET /models`."""

    data: list[InfinityModel]
    object: Literal["list"] = "list"


def to_query(req: InfinityRequest) -> tuple[RerankQuery, ParsedDocuments]:
    docs = parse_documents(req.documents, None)
    return (
        RerankQuery(
            query=req.query,
            documents=docs.texts,
            instruction=req.instruction,
            top_n=req.top_n,
            raw_scores=req.raw_scores,
        ),
        docs,
    )


def render(
    req: InfinityRequest, outcome: RerankOutcome, docs: ParsedDocuments, *, request_id: str, model: str
) -> dict:
    results = [
        InfinityResult(
            relevance_score=r.score,
            index=r.index,
            document=docs.texts[r.index] if req.return_documents else None,
        )
        for r in outcome.ranked
    ]
    usage = InfinityUsage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens)
    body = InfinityResponse(
        results=results, model=model, usage=usage, id=request_id, created=int(time.time())
    )
    return body.model_dump(mode="json")
