"""The Mixedbread API's own rerank dialect: `POST /v1/reranking`, as the official `mixedbread` SDK speaks it.

Shapes follow the `mixedbread` Python SDK (0.54, `client.rerank`): it posts `model`, `query`, `input` (strings
or objects), `rank_fields`, `top_k`, `return_input`, `rewrite_query` and reads `{model, object: "list",
data[{index, score, input?, object: "rank_result"}], usage{prompt_tokens, total_tokens}, top_k,
return_input}`. `rewrite_query` is accepted and ignored (a self-hosted model has no query rewriter).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from gateway.schemas.common import STRICT_REQUEST, ParsedDocuments, TopN, parse_documents
from gateway.service import RerankOutcome, RerankQuery


class MixedbreadRequest(BaseModel):
    """Mixedbread rerank request (plus the mxbai extras `instruction` and `raw_scores`)."""

    model_config = STRICT_REQUEST

    model: str | None = Field(
        None, description="Model name; optional. When given, the served name or an alias."
    )
    query: str = Field(description="The search query.")
    input: list[Any] = Field(
        description=(
            "The documents to rank: strings, or objects with a `text` field (or the fields named in "
            "`rank_fields`)."
        ),
        json_schema_extra={"minItems": 1},
    )
    rank_fields: list[str] | None = Field(
        None, description="For objects: the fields to rank on, in order (default: `text`)."
    )
    top_k: TopN | None = Field(None, description="Return only the `top_k` best documents (default: all).")
    return_input: bool = Field(False, description="Echo each ranked document in `data[].input`.")
    rewrite_query: bool = Field(False, description="Accepted for compatibility; the query is used as sent.")
    instruction: str | None = Field(None, description="mxbai extra: an instruction put before the query.")
    raw_scores: bool = Field(False, description="mxbai extra: the raw score instead of the normalized one.")


class MixedbreadRankResult(BaseModel):
    """One ranked document."""

    index: int = Field(description="Position of the document in the request's `input`.")
    score: float = Field(description="Normalized score in 0..1, or the raw score with `raw_scores`.")
    input: Any | None = Field(None, description="The document as sent, with `return_input`.")
    object: Literal["rank_result"] = "rank_result"


class MixedbreadUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of every scored prompt (template included).")
    total_tokens: int = Field(description="Same as prompt_tokens: a reranker generates nothing.")


class MixedbreadResponse(BaseModel):
    """Mixedbread rerank response."""

    model: str = Field(description="The served model name.")
    object: Literal["list"] = "list"
    data: list[MixedbreadRankResult] = Field(description="Ranked documents, best first.")
    usage: MixedbreadUsage
    top_k: int = Field(description="How many documents were asked for (all of them without `top_k`).")
    return_input: bool


def to_query(req: MixedbreadRequest) -> tuple[RerankQuery, ParsedDocuments]:
    """The dialect-free query, and the documents to echo."""
    docs = parse_documents(req.input, req.rank_fields, param="input")
    return (
        RerankQuery(
            query=req.query,
            documents=docs.texts,
            instruction=req.instruction,
            top_n=req.top_k,
            raw_scores=req.raw_scores,
            documents_param="input",
            top_n_param="top_k",
        ),
        docs,
    )


def render(req: MixedbreadRequest, outcome: RerankOutcome, docs: ParsedDocuments, *, model: str) -> dict:
    """The Mixedbread response body for one outcome."""
    data = [
        MixedbreadRankResult(index=r.index, score=r.score, input=req.input[r.index])
        if req.return_input
        else MixedbreadRankResult(index=r.index, score=r.score)
        for r in outcome.ranked
    ]
    body = MixedbreadResponse(
        model=model,
        data=data,
        usage=MixedbreadUsage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
        top_k=req.top_k if req.top_k is not None else len(docs.texts),
        return_input=req.return_input,
    )
    return body.model_dump(mode="json", exclude_none=not req.return_input)
