"""The Cohere rerank dialects: v1 (`/v1/rerank`) and v2 (`/v2/rerank`), as the official SDK speaks them.

Shapes follow the `cohere` Python SDK (v5+): the v1 client posts `query`, `documents` (strings or objects),
`top_n`, `rank_fields`, `return_documents`, `max_chunks_per_doc` to `{base_url}/v1/rerank`; the v2 client
posts `model`, `query`, `documents`, `top_n`, `max_tokens_per_doc` to `{base_url}/v2/rerank`. Both read
`{id, results[{index, relevance_score, document?}], meta{api_version, billed_units{search_units}}}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gateway.schemas.common import ParsedDocuments, RerankOptions, ResultDocument, options_to_query
from gateway.service import RerankOutcome, RerankQuery

# Cohere bills one search unit per query with up to 100 documents (chunks count as documents).
DOCUMENTS_PER_SEARCH_UNIT = 100


class CohereV1Request(RerankOptions):
    """Cohere v1 rerank request (plus the mxbai extras `instruction` and `raw_scores`)."""

    return_documents: bool = Field(
        False, description="Echo each ranked document (the object as sent) in `results[].document`."
    )


class CohereV2Request(RerankOptions):
    """Cohere v2 rerank request: v1 plus `max_tokens_per_doc` (v2 clients send strings)."""

    return_documents: bool = Field(False, description="Echo each ranked document in `results[].document`.")


class CohereResult(BaseModel):
    """One ranked document."""

    index: int = Field(description="Position of the document in the request's `documents`.")
    relevance_score: float = Field(
        description="Normalized score in 0..1 (sigmoid of the raw score minus estimated_max / 2), "
        "or the raw score when `raw_scores` is set."
    )
    document: ResultDocument | None = Field(
        None, description="The document as sent (`{text}` for a string), with `return_documents`."
    )


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int = Field(description="One unit per 100 scored documents or chunks (at least 1).")


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class CohereV1Response(BaseModel):
    """Cohere v1 rerank response."""

    id: str = Field(description="The request id (also in the `x-request-id` header).")
    results: list[CohereResult] = Field(description="Ranked documents, best first.")
    meta: CohereMeta


class CohereV2Response(CohereV1Response):
    """Cohere v2 rerank response (same fields as v1)."""


def search_units(pairs_scored: int) -> int:
    """Cohere's billing unit: ceil(pairs / 100), at least one."""
    return max(1, -(-pairs_scored // DOCUMENTS_PER_SEARCH_UNIT))


def to_query(req: CohereV1Request | CohereV2Request) -> tuple[RerankQuery, ParsedDocuments]:
    """The dialect-free query, and the documents to echo."""
    return options_to_query(req)


def render(
    req: CohereV1Request | CohereV2Request,
    outcome: RerankOutcome,
    docs: ParsedDocuments,
    *,
    request_id: str,
    version: str,
) -> dict[str, Any]:
    """The Cohere response body for one outcome."""
    results = [
        CohereResult(index=r.index, relevance_score=r.score, document=docs.echoes[r.index])
        if req.return_documents
        else CohereResult(index=r.index, relevance_score=r.score)
        for r in outcome.ranked
    ]
    response_cls = CohereV2Response if version == "2" else CohereV1Response
    body = response_cls(
        id=request_id,
        results=results,
        meta=CohereMeta(
            api_version=ApiVersion(version=version),
            billed_units=BilledUnits(search_units=search_units(outcome.pairs_scored)),
        ),
    )
    return body.model_dump(mode="json", exclude_unset=True)
