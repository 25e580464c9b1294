"""The dialect registry: one `Dialect` entry per client dialect, used by the routes, the docs and the metrics.

Each entry says, once: its name (also its metrics label), its request and response models, the routes that
serve it, how it is detected, how a request becomes the service's `RerankQuery`, how an outcome and an error
are rendered, and an example request for the OpenAPI spec. Nothing else in the gateway branches on a dialect.

Detection, first match wins (`DIALECT_RULE` says it in the spec's words):
1. an `X-Rerank-Dialect` header names a dialect outright (any rerank route);
2. a route that belongs to one dialect: `/v1/reranking` is Mixedbread, `/score` and `/v1/score` are vLLM's
   score API, `/infinity/rerank` is Infinity;
3. a body with `texts` is TEI, on any rerank route;
4. `/v2/rerank` is Cohere v2;
5. `/v1/rerank` is Cohere v1 when the client shows it is a Cohere client (the Cohere SDKs send
   `X-Fern-SDK-Name: cohere` and a `cohere/...` User-Agent) or sends a Cohere-only field (`rank_fields`,
   `max_chunks_per_doc`);
6. otherwise Jina / vLLM (`/rerank`, `/v1/rerank`), whose body carries Cohere's `meta` too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from gateway.errors import GatewayError, InvalidRequest, clip
from gateway.schemas import cohere, infinity, jina, mixedbread, tei, vllm_score
from gateway.schemas.common import DetailErrorResponse, ErrorResponse, ParsedDocuments
from gateway.service import RerankOutcome, RerankQuery

log = logging.getLogger("gateway")

DIALECT_HEADER = "x-rerank-dialect"
COHERE_ONLY_FIELDS = ("rank_fields", "max_chunks_per_doc")
# Cohere documents max_chunks_per_doc as a maximum with documents x chunks < 10,000.
MAX_DOCUMENT_CHUNKS = 10_000


@dataclass(frozen=True, slots=True)
class Probe:
    """What detection looks at: the route, the parsed body (empty before it is read) and the headers."""

    path: str
    payload: Mapping[str, Any]
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RenderContext:
    """What a response needs besides the outcome."""

    request_id: str
    model: str  # the served model name


@dataclass(frozen=True)
class Dialect:
    """One client dialect, end to end."""

    name: str
    title: str
    request_model: type[BaseModel]
    response_model: Any
    error_model: type[BaseModel]
    paths: tuple[str, ...]
    claims: Callable[[Probe], bool]
    to_query: Callable[[Any], tuple[RerankQuery, ParsedDocuments]]
    render: Callable[[Any, RerankOutcome, ParsedDocuments, RenderContext], Any]
    error_body: Callable[[GatewayError], Any]
    example: dict[str, Any]

    def query(self, req: BaseModel, *, max_chunks_per_doc_limit: int) -> tuple[RerankQuery, ParsedDocuments]:
        """The service's query for a validated request (max_chunks_per_doc capped)."""
        q, docs = self.to_query(req)
        return check_query(q, max_chunks_per_doc_limit), docs


def check_query(q: RerankQuery, max_chunks_per_doc_limit: int) -> RerankQuery:
    """`max_chunks_per_doc` as Cohere documents it, a maximum: capped at RERANK_MAX_CHUNKS_PER_DOC_LIMIT,
    and refused (400 `too_many_chunks`) only when documents x chunks >= 10,000.

    Empty documents and a result count below 1 are checked once, by the service (RerankLimits.check), in
    the dialect's words (`documents_param`, `top_n_param`).
    """
    if q.max_chunks_per_doc is None:
        return q
    chunks = min(q.max_chunks_per_doc, max_chunks_per_doc_limit)
    if len(q.documents) * chunks >= MAX_DOCUMENT_CHUNKS:
        raise InvalidRequest(
            f"{len(q.documents)} documents x {chunks} chunks (`max_chunks_per_doc`, capped at "
            f"{max_chunks_per_doc_limit} by RERANK_MAX_CHUNKS_PER_DOC_LIMIT) = "
            f"{len(q.documents) * chunks} chunks; the limit is documents x chunks < "
            f"{MAX_DOCUMENT_CHUNKS:,}: lower `max_chunks_per_doc` or send fewer documents",
            param="max_chunks_per_doc",
            code="too_many_chunks",
        )
    return q if chunks == q.max_chunks_per_doc else replace(q, max_chunks_per_doc=chunks)


# --- error bodies -----------------------------------------------------------------------------------------


def gateway_error_body(exc: GatewayError) -> dict[str, Any]:
    """`{"error": {message, type, param, code}}`."""
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}


def detail_error_body(exc: GatewayError) -> dict[str, Any]:
    """The gateway's body plus a top-level `detail` (what Jina clients raise)."""
    return {**gateway_error_body(exc), "detail": exc.message}


def tei_error_body(exc: GatewayError) -> dict[str, Any]:
    """TEI's `{"error": "<message>", "error_type": "Validation|...|Empty"}`."""
    return {"error": exc.message, "error_type": tei.error_type_of(exc.status_code, exc.code)}


# --- detection ------------------------------------------------------------------------------------------


def _is_cohere_client(headers: Mapping[str, str]) -> bool:
    sdk = headers.get("x-fern-sdk-name", "").lower()
    agent = headers.get("user-agent", "").lower()
    return "cohere" in sdk or agent.startswith("cohere")


def _on(*paths: str) -> Callable[[Probe], bool]:
    return lambda p: p.path in paths


def _cohere_v1(p: Probe) -> bool:
    return p.path == "/v1/rerank" and (
        _is_cohere_client(p.headers) or any(p.payload.get(f) is not None for f in COHERE_ONLY_FIELDS)
    )


# --- the registry -----------------------------------------------------------------------------------------

_DOCS = ["Bread keeps best in a paper bag.", "Espresso is brewed under pressure."]
_QUERY = "How do I keep bread fresh?"

# In detection order.
REGISTRY: tuple[Dialect, ...] = (
    Dialect(
        name="mixedbread",
        title="Mixedbread API (the `mixedbread` SDK's `client.rerank`)",
        request_model=mixedbread.MixedbreadRequest,
        response_model=mixedbread.MixedbreadResponse,
        error_model=DetailErrorResponse,
        paths=("/v1/reranking",),
        claims=_on("/v1/reranking"),
        to_query=mixedbread.to_query,
        render=lambda req, out, docs, ctx: mixedbread.render(req, out, docs, model=ctx.model),
        error_body=detail_error_body,
        example={"query": _QUERY, "input": _DOCS, "top_k": 2, "return_input": True},
    ),
    Dialect(
        name="vllm-score",
        title="vLLM score API (`text_1`, `text_2`; scores in input order)",
        request_model=vllm_score.ScoreRequest,
        response_model=vllm_score.ScoreResponse,
        error_model=ErrorResponse,
        paths=("/score", "/v1/score"),
        claims=_on("/score", "/v1/score"),
        to_query=vllm_score.to_query,
        render=lambda req, out, docs, ctx: vllm_score.render(
            req, out, request_id=ctx.request_id, model=ctx.model
        ),
        error_body=gateway_error_body,
        example={"text_1": _QUERY, "text_2": _DOCS},
    ),
    Dialect(
        name="infinity",
        title="Infinity (documents come back as plain strings)",
        request_model=infinity.InfinityRequest,
        response_model=infinity.InfinityResponse,
        error_model=DetailErrorResponse,
        paths=("/infinity/rerank",),
        claims=_on("/infinity/rerank"),
        to_query=infinity.to_query,
        render=lambda req, out, docs, ctx: infinity.render(
            req, out, docs, request_id=ctx.request_id, model=ctx.model
        ),
        error_body=detail_error_body,
        example={"query": _QUERY, "documents": _DOCS, "return_documents": True},
    ),
    Dialect(
        name="tei",
        title="Hugging Face text-embeddings-inference (a body with `texts`)",
        request_model=tei.TeiRequest,
        response_model=tei.TeiResponse,
        error_model=tei.TeiErrorResponse,
        paths=("/rerank", "/v1/rerank", "/v2/rerank"),
        claims=lambda p: "texts" in p.payload,
        to_query=tei.to_query,
        render=lambda req, out, docs, ctx: tei.render(req, out, docs),
        error_body=tei_error_body,
        example={"query": _QUERY, "texts": _DOCS, "return_text": True},
    ),
    Dialect(
        name="cohere-v2",
        title="Cohere v2 (`cohere.ClientV2`)",
        request_model=cohere.CohereV2Request,
        response_model=cohere.CohereV2Response,
        error_model=ErrorResponse,
        paths=("/v2/rerank",),
        claims=_on("/v2/rerank"),
        to_query=cohere.to_query,
        render=lambda req, out, docs, ctx: cohere.render(
            req, out, docs, request_id=ctx.request_id, version="2"
        ),
        error_body=gateway_error_body,
        example={"model": "rerank-v3.5", "query": _QUERY, "documents": _DOCS, "top_n": 2},
    ),
    Dialect(
        name="cohere-v1",
        title="Cohere v1 (`cohere.Client`)",
        request_model=cohere.CohereV1Request,
        response_model=cohere.CohereV1Response,
        error_model=ErrorResponse,
        paths=("/v1/rerank",),
        claims=_cohere_v1,
        to_query=cohere.to_query,
        render=lambda req, out, docs, ctx: cohere.render(
            req, out, docs, request_id=ctx.request_id, version="1"
        ),
        error_body=gateway_error_body,
        example={"query": _QUERY, "documents": _DOCS, "top_n": 2, "return_documents": True},
    ),
    Dialect(
        name="jina",
        title="Jina / vLLM rerank (also read by Cohere parsers: it carries `meta`)",
        request_model=jina.JinaRequest,
        response_model=jina.JinaResponse,
        error_model=DetailErrorResponse,
        paths=("/rerank", "/v1/rerank"),
        claims=lambda p: True,
        to_query=jina.to_query,
        render=lambda req, out, docs, ctx: jina.render(
            req, out, docs, request_id=ctx.request_id, model=ctx.model
        ),
        error_body=detail_error_body,
        example={
            "model": "mixedbread-ai/mxbai-rerank-base-v2",
            "query": _QUERY,
            "documents": _DOCS,
            "top_n": 2,
        },
    ),
)

BY_NAME: dict[str, Dialect] = {d.name: d for d in REGISTRY}
# The metrics' fixed label set (plus `other` for routes outside the dialects).
NAMES: tuple[str, ...] = tuple(BY_NAME)
# Every rerank route, in the order the spec lists them.
PATHS: tuple[str, ...] = (
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/reranking",
    "/score",
    "/v1/score",
    "/infinity/rerank",
)


def served_at(path: str) -> tuple[Dialect, ...]:
    """The dialects a route answers, in detection order."""
    return tuple(d for d in REGISTRY if path in d.paths)


def detect(path: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Dialect:
    """Apply the detection rule above to one request."""
    explicit = headers.get(DIALECT_HEADER)
    if explicit is not None:
        dialect = BY_NAME.get(explicit.strip().lower())
        if dialect is None:
            raise InvalidRequest(
                f"unknown dialect {clip(explicit)} in the X-Rerank-Dialect header: use one of "
                + ", ".join(NAMES),
                param=DIALECT_HEADER,
                code="unknown_dialect",
            )
        return dialect
    probe = Probe(path, payload, headers)
    return next(d for d in served_at(path) if d.claims(probe))


def route_dialect(path: str, headers: Mapping[str, str]) -> Dialect:
    """The dialect a route implies before its body is read (error shape, metrics label of a bad body)."""
    try:
        return detect(path, {}, headers)
    except InvalidRequest:
        return detect(path, {}, {})


DIALECT_RULE = (
    "Which dialect answers, first match wins: (1) an `X-Rerank-Dialect` header ("
    + ", ".join(f"`{n}`" for n in NAMES)
    + "); (2) `/v1/reranking` is Mixedbread, `/score` and `/v1/score` vLLM's score API, `/infinity/rerank` "
    "Infinity; (3) a body with `texts` is TEI, on any other rerank route; (4) `/v2/rerank` is Cohere v2; "
    "(5) `/v1/rerank` is Cohere v1 for Cohere clients (the Cohere SDKs' `X-Fern-SDK-Name: cohere` or "
    "`cohere/...` User-Agent) or bodies with `rank_fields` or `max_chunks_per_doc`; (6) otherwise Jina/vLLM."
)
