"""The Jina / vLLM rerank dialect (`/rerank`, and `/v1/rerank` for non-Cohere clients).

Jina's API and vLLM's `RerankRequest` take `model`, `query`, `documents`, `top_n` (and vLLM adds
`max_tokens_per_doc`, `truncate_prompt_tokens`, `max_tokens_per_query`, `instruction`); both answer `{id,
model, usage{prompt_tokens, total_tokens}, results[{index, document{text}, relevance_score}]}`. Jina returns
documents unless `return_documents: false`; vLLM always does, so the default here is to return them. The
body also carries Cohere's `meta` (api_version, billed_units): `/v1/rerank` answers this shape to Cohere
clients that send no SDK headers (LiteLLM's `cohere/` and `azure_ai`), and they read `meta`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gateway.schemas.cohere import ApiVersion, BilledUnits, CohereMeta, search_units
from gateway.schemas.common import ParsedDocuments, RerankOptions, ResultDocument, options_to_query
from gateway.service import RerankOutcome, RerankQuery


class JinaRequest(RerankOptions):
    """Jina / vLLM rerank request (plus the mxbai extras `instruction` and `raw_scores`)."""

    return_documents: bool = Field(True, description="Echo each ranked document in `results[].document`.")


class JinaResult(BaseModel):
    """One ranked document."""

    index: int = Field(description="Position of the document in the request's `documents`.")
    document: ResultDocument | None = Field(
        None, description="The document as sent (`{text}` for a string), unless return_documents=false."
    )
    relevance_score: float = Field(
        description="Normalized score in 0..1, or the raw score when `raw_scores` is set."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of every scored prompt (template included).")
    total_tokens: int = Field(description="Same as prompt_tokens: a reranker generates nothing.")


class JinaResponse(BaseModel):
    """Jina / vLLM rerank response."""

    id: str = Field(description="The request id (also in the `x-request-id` header).")
    model: str = Field(description="The served model name.")
    usage: Usage
    results: list[JinaResult] = Field(description="Ranked documents, best first.")
    meta: CohereMeta = Field(description="Cohere's meta block, for Cohere parsers (api_version 1).")


def to_query(req: JinaRequest) -> tuple[RerankQuery, ParsedDocuments]:
    """The dialect-free query, and the documents to echo."""
    return options_to_query(req)


def render(
    req: JinaRequest, outcome: RerankOutcome, docs: ParsedDocuments, *, request_id: str, model: str
) -> dict[str, Any]:
    """The Jina / vLLM response body for one outcome."""
    results = [
        JinaResult(index=r.index, document=docs.echoes[r.index], relevance_score=r.score)
        if req.return_documents
        else JinaResult(index=r.index, relevance_score=r.score)
        for r in outcome.ranked
    ]
    body = JinaResponse(
        id=request_id,
        model=model,
        usage=Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
        results=results,
        meta=CohereMeta(
            api_version=ApiVersion(version="1"),
            billed_units=BilledUnits(search_units=search_units(outcome.pairs_scored)),
        ),
    )
    return body.model_dump(mode="json", exclude_unset=True)
