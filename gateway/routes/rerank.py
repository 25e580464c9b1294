"""Every rerank route (Cohere, Jina / vLLM, TEI, Mixedbread, vLLM score, Infinity): one handler, the dialect
picked per request by the registry (gateway.dialects), which also renders the answer and the error body."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from core.errors import DomainError
from engines.base import EngineError
from gateway.auth import ApiKeyDep
from gateway.compose import check_model_name
from gateway.dialects import (
    DIALECT_HEADER,
    DIALECT_RULE,
    NAMES,
    PATHS,
    REGISTRY,
    Dialect,
    RenderContext,
    detect,
    route_dialect,
    served_at,
)
from gateway.disconnect import run_until_disconnected
from gateway.docs import json_body
from gateway.errors import GatewayError, ServiceUnavailable, from_domain_error, from_engine_error
from gateway.jsonbody import OFFLOAD_BYTES, parse_object_async, read_body, require_json
from gateway.schemas import invalid_request_from
from gateway.schemas.common import ErrorResponse
from gateway.service import RerankService

log = logging.getLogger("gateway")

router = APIRouter(tags=["rerank"])

# Every request model, for the spec's components (the routes reference them by hand).
REQUEST_BODY_MODELS: list[type[BaseModel]] = list(dict.fromkeys(d.request_model for d in REGISTRY))

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

_ERRORS = {
    400: (
        "Invalid JSON, a missing or mistyped field, empty documents, top_n < 1, documents x "
        "max_chunks_per_doc >= 10,000, invalid Unicode, a number over 4,300 digits, nesting over 64 "
        "levels (`param` names the field)."
    ),
    401: "Missing or wrong API key (only when RERANK_API_KEYS is set).",
    404: "`model` names a model this gateway does not serve.",
    408: "The body did not arrive within RERANK_BODY_READ_TIMEOUT_S.",
    413: "Body, document count, document or query over the configured limits.",
    415: "The body is not sent as `Content-Type: application/json`.",
    429: "The queue is full; retry after the Retry-After header.",
    502: "The engine answered with an error.",
    503: (
        "No engine can answer now, the request's deadline passed, or the gateway is shutting down "
        "(with Retry-After)."
    ),
}


def _union(types: list[Any]) -> Any:
    unique = list(dict.fromkeys(types))
    return unique[0] if len(unique) == 1 else Union[tuple(unique)]  # noqa: UP007


# The X-Rerank-Dialect header is described in words, not as a header parameter: it decides which request
# schema the body must match, which OpenAPI cannot express (as a parameter, a valid header with a body of
# another dialect would look schema-valid and get a 400).
_HEADER_NOTE = (
    f" The optional `{DIALECT_HEADER}` header ({', '.join(NAMES)}) forces a dialect; the body must then "
    "be that dialect's request."
)


def _openapi(path: str) -> dict[str, Any]:
    dialects = served_at(path)
    titles = "; ".join(d.title for d in dialects)
    # The 401 comes from the auth dependency, before a dialect is known: always the gateway's shape.
    errors = _union([d.error_model for d in dialects])
    responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "Ranked documents, in the request's dialect.", "headers": _HEADERS_DOC},
        **{
            status: {"model": ErrorResponse if status == 401 else errors, "description": text}
            for status, text in _ERRORS.items()
        },
    }
    return {
        "response_model": _union([d.response_model for d in dialects]),
        "responses": responses,
        "openapi_extra": json_body(
            dialects,
            "One of the dialects' requests; unknown fields are ignored. " + DIALECT_RULE + _HEADER_NOTE,
        ),
        "description": f"Rerank documents against a query. Dialects: {titles}. " + DIALECT_RULE,
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


def error_response(dialect: Dialect, error: GatewayError | DomainError | EngineError) -> JSONResponse:
    """An error in the dialect's own error shape, with its status and headers (domain and engine errors
    translated to the HTTP status table first)."""
    if isinstance(error, DomainError):
        exc = from_domain_error(error)
    elif isinstance(error, EngineError):
        exc = from_engine_error(error)
    else:
        exc = error
    if exc.status_code >= 500:
        log.warning("%s %s: %s", dialect.name, exc.status_code, exc.message)
    return JSONResponse(dialect.error_body(exc), status_code=exc.status_code, headers=exc.headers())


async def _validate(request: Request, dialect: Dialect, payload: dict[str, Any]) -> BaseModel:
    model = dialect.request_model
    try:
        if request.state.body_bytes >= OFFLOAD_BYTES:
            # Pydantic holds the GIL; on a large body a worker thread at least lets the event loop interleave.
            return await asyncio.to_thread(model.model_validate, payload)
        return model.model_validate(payload)
    except ValidationError as exc:
        raise invalid_request_from(exc) from None


async def rerank(request: Request) -> Response:
    """Shared handler of every rerank route."""
    state = request.app.state
    settings = state.settings
    path = request.scope["route"].path
    dialect = route_dialect(path, request.headers)
    request.state.dialect = dialect.name
    try:
        payload = await read_json_body(request)
        dialect = detect(path, payload, request.headers)
        request.state.dialect = dialect.name
        req = await _validate(request, dialect, payload)
        check_model_name(settings, getattr(req, "model", None))
        query, docs = dialect.query(req, max_chunks_per_doc_limit=settings.max_chunks_per_doc_limit)
        service: RerankService | None = getattr(state, "service", None)
        if service is None or not service.ready:
            raise ServiceUnavailable("the model is still loading: retry in a moment (GET /ready says when)")
        # A client that leaves cancels its work: its queued pairs never reach the engine.
        outcome = await run_until_disconnected(request, service.rerank(query))
    except (GatewayError, DomainError, EngineError) as exc:
        return error_response(dialect, exc)
    context = RenderContext(request_id=request.state.request_id, model=settings.public_model_name)
    headers = {
        "x-rerank-engine": outcome.engine,
        "x-tokenization-time": f"{outcome.tokenization_ms:.1f}",
        "x-inference-time": f"{outcome.inference_ms:.1f}",
        "x-total-time": f"{(time.perf_counter() - request.state.started_s) * 1000.0:.1f}",
    }
    return JSONResponse(dialect.render(req, outcome, docs, context), headers=headers)


def _summary(path: str) -> str:
    names = ", ".join(d.name for d in served_at(path))
    return f"Rerank ({names})"


async def _endpoint(request: Request, _auth: ApiKeyDep) -> Response:
    return await rerank(request)


for _path in PATHS:
    router.add_api_route(
        _path,
        _endpoint,
        methods=["POST"],
        summary=_summary(_path),
        operation_id="rerank" + _path.replace("/", "_").replace("-", "_"),
        **_openapi(_path),
    )
