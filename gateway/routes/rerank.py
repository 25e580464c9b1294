"""POST /v1/rerank, /rerank and /v2/rerank: one handler, the dialect picked per request (see schemas)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.auth import ApiKeyDep
from gateway.disconnect import run_until_disconnected
from gateway.docs import json_body
from gateway.errors import ServiceUnavailable
from gateway.jsonbody import OFFLOAD_BYTES, parse_object_async, read_body, require_json
from gateway.schemas import (
    DIALECT_HEADER,
    DIALECT_RULE,
    DIALECTS,
    REQUEST_MODELS,
    cohere,
    detect_dialect,
    invalid_request_from,
    jina,
    route_dialect,
    tei,
)
from gateway.schemas.cohere import CohereV1Request, CohereV1Response, CohereV2Request, CohereV2Response
from gateway.schemas.common import ErrorResponse
from gateway.schemas.jina import JinaRequest, JinaResponse
from gateway.schemas.tei import TeiRequest, TeiResponse
from gateway.service import RerankService, check_model_name

router = APIRouter(tags=["rerank"])

REQUEST_BODY_MODELS = [CohereV1Request, CohereV2Request, JinaRequest, TeiRequest]
RESPONSE_MODEL = Union[CohereV1Response, CohereV2Response, JinaResponse, TeiResponse]  # noqa: UP007

_HEADERS_DOC = {
    "x-request-id": {
        "description": "The client's x-request-id, or one the gateway made.",
        "schema": {"type": "string"},
    },
    "x-rerank-engine": {"description": "The engine that scored the request.", "schema": {"type": "string"}},
    "x-total-time": {"description": "Milliseconds spent in the gateway.", "schema": {"type": "string"}},
    "x-tokenization-time": {
        "description": "Milliseconds spent building prompts.",
        "schema": {"type": "string"},
    },
    "x-inference-time": {
        "description": "Milliseconds from queueing to scores (queue wait included).",
        "schema": {"type": "string"},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ranked documents, best first, in the request's dialect.", "headers": _HEADERS_DOC},
    400: _error(
        "Invalid JSON, a missing or mistyped field, empty documents, top_n < 1, invalid Unicode, a number "
        "over 4,300 digits, nesting over 64 levels (`param` names the field)."
    ),
    401: _error("Missing or wrong API key (only when RERANK_API_KEYS is set)."),
    404: _error("`model` names a model this gateway does not serve."),
    408: _error("The body did not arrive within RERANK_BODY_READ_TIMEOUT_S."),
    413: _error("Body, document count, document or query over the configured limits."),
    415: _error("The body is not sent as `Content-Type: application/json`."),
    429: _error("The queue is full; retry after the Retry-After header."),
    502: _error("The engine answered with an error."),
    503: _error(
        "No engine can answer now, the request's deadline passed, or the gateway is shutting down "
        "(with Retry-After)."
    ),
}

_ROUTE_NOTES = {
    "/v1/rerank": "Cohere v1 clients, Jina and vLLM clients.",
    "/rerank": "Jina / vLLM clients, and TEI clients (bodies with `texts`).",
    "/v2/rerank": "Cohere v2 clients.",
}


# The X-Rerank-Dialect header is described in words, not as a header parameter: it decides which request
# schema the body must match, which OpenAPI cannot express (as a parameter, a valid header with a body of
# another dialect would look schema-valid and get a 400).
_HEADER_NOTE = (
    f" The optional `{DIALECT_HEADER}` header ({', '.join(DIALECTS)}) forces a dialect; the body must then "
    "be that dialect's request."
)


def _openapi(path: str) -> dict[str, Any]:
    extra = json_body(
        REQUEST_BODY_MODELS,
        "One of the dialects' requests; unknown fields are ignored. " + DIALECT_RULE + _HEADER_NOTE,
    )
    return {
        "response_model": RESPONSE_MODEL,
        "responses": RESPONSES,
        "openapi_extra": extra,
        "description": f"Rerank documents against a query. For {_ROUTE_NOTES[path]} " + DIALECT_RULE,
    }


async def read_json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 415 unless declared JSON, 413 over the limits, 408 when too slow."""
    settings = request.app.state.settings
    require_json(request.headers.get("content-type"))
    raw = await read_body(
        request.stream(),
        declared_length=request.headers.get("content-length"),
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_read_timeout_s,
    )
    request.state.body_bytes = len(raw)
    return await parse_object_async(raw, max_documents=settings.max_documents_per_request)


async def rerank(request: Request) -> Response:
    """Shared handler of the three rerank routes."""
    state = request.app.state
    path = request.scope["route"].path
    request.state.dialect = route_dialect(path)
    payload = await read_json_body(request)
    dialect = detect_dialect(path, payload, request.headers)
    request.state.dialect = dialect
    try:
        model = REQUEST_MODELS[dialect]
        big = request.state.body_bytes >= OFFLOAD_BYTES
        # Pydantic holds the GIL; on a large body a worker thread at least lets the event loop interleave.
        req = await asyncio.to_thread(model.model_validate, payload) if big else model.model_validate(payload)
    except ValidationError as exc:
        raise invalid_request_from(exc) from None
    check_model_name(state.settings, getattr(req, "model", None))
    service: RerankService | None = getattr(state, "service", None)
    if service is None or not service.ready:
        raise ServiceUnavailable("the model is still loading: retry in a moment (GET /ready says when)")
    if dialect == "tei":
        query, docs = tei.to_query(req)  # type: ignore[arg-type]
    elif dialect == "jina":
        query, docs = jina.to_query(req)  # type: ignore[arg-type]
    else:
        query, docs = cohere.to_query(req)  # type: ignore[arg-type]
    # A client that leaves cancels its work: its queued pairs never reach the engine.
    outcome = await run_until_disconnected(request, service.rerank(query))
    request_id = request.state.request_id
    body: Any
    if dialect == "tei":
        body = tei.render(req, outcome, docs)  # type: ignore[arg-type]
    elif dialect == "jina":
        body = jina.render(req, outcome, docs, request_id=request_id, model=state.settings.public_model_name)  # type: ignore[arg-type]
    else:
        version = "2" if dialect == "cohere-v2" else "1"
        body = cohere.render(req, outcome, docs, request_id=request_id, version=version)  # type: ignore[arg-type]
    headers = {
        "x-rerank-engine": outcome.engine,
        "x-tokenization-time": f"{outcome.tokenization_ms:.1f}",
        "x-inference-time": f"{outcome.inference_ms:.1f}",
        "x-total-time": f"{(time.perf_counter() - request.state.started_s) * 1000.0:.1f}",
    }
    return JSONResponse(body, headers=headers)


@router.post("/v1/rerank", summary="Rerank (Cohere v1, Jina, vLLM, TEI)", **_openapi("/v1/rerank"))
async def rerank_v1(request: Request, _auth: ApiKeyDep) -> Response:
    return await rerank(request)


@router.post("/rerank", summary="Rerank (Jina, vLLM, TEI)", **_openapi("/rerank"))
async def rerank_plain(request: Request, _auth: ApiKeyDep) -> Response:
    return await rerank(request)


@router.post("/v2/rerank", summary="Rerank (Cohere v2)", **_openapi("/v2/rerank"))
async def rerank_v2(request: Request, _auth: ApiKeyDep) -> Response:
    return await rerank(request)
