"""POST /v1/rerank, /rerank and /v2/rerank: one handler, the dialect picked per request (see schemas)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.auth import ApiKeyDep
from gateway.disconnect import run_until_disconnected
from gateway.docs import json_body
from gateway.errors import InvalidRequest, PayloadTooLarge, ServiceUnavailable
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

# Bodies from this size on are parsed and validated in a worker thread.
OFFLOAD_BYTES = 256 * 1024

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
    400: _error("Invalid JSON, a missing or mistyped field, empty documents, top_n < 1 (`param` names it)."),
    401: _error("Missing or wrong API key (only when RERANK_API_KEYS is set)."),
    404: _error("`model` names a model this gateway does not serve."),
    413: _error("Body, document count, document or query over the configured limits."),
    429: _error("The queue is full; retry after the Retry-After header."),
    502: _error("The engine answered with an error."),
    503: _error("No engine can answer now, or the request's deadline passed."),
}

_ROUTE_NOTES = {
    "/v1/rerank": "Cohere v1 clients, Jina and vLLM clients.",
    "/rerank": "Jina / vLLM clients, and TEI clients (bodies with `texts`).",
    "/v2/rerank": "Cohere v2 clients.",
}


_DIALECT_PARAMETER = {
    "name": DIALECT_HEADER,
    "in": "header",
    "required": False,
    "description": "Optional: the dialect to speak, overriding the route and body rule.",
    "schema": {"type": "string", "enum": list(DIALECTS)},
}


def _openapi(path: str) -> dict[str, Any]:
    extra = json_body(
        REQUEST_BODY_MODELS, "One of the dialects' requests; unknown fields are ignored. " + DIALECT_RULE
    )
    extra["parameters"] = [_DIALECT_PARAMETER]
    return {
        "response_model": RESPONSE_MODEL,
        "responses": RESPONSES,
        "openapi_extra": extra,
        "description": f"Rerank documents against a query. For {_ROUTE_NOTES[path]} " + DIALECT_RULE,
    }


async def read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, refusing more than `max_bytes` (from Content-Length and while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(
            f"the body has {int(declared)} bytes; this server takes at most {max_bytes} "
            "(RERANK_MAX_BODY_BYTES): send fewer or shorter documents",
            code="body_too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the body is over {max_bytes} bytes (RERANK_MAX_BODY_BYTES): "
                "send fewer or shorter documents",
                code="body_too_large",
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    request.state.body_bytes = len(raw)
    if not raw.strip():
        raise InvalidRequest(
            'the request body is empty: send a JSON object such as {"query": "...", "documents": ["..."]}',
            code="empty_body",
        )
    try:
        # A body of many megabytes takes long enough to parse that it must not stall the event loop.
        payload = json.loads(raw) if len(raw) < OFFLOAD_BYTES else await asyncio.to_thread(json.loads, raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except UnicodeDecodeError:
        raise InvalidRequest(
            "the request body is not UTF-8 text: send JSON in UTF-8", code="invalid_json"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(
            'the request body must be a JSON object such as {"query": "...", "documents": ["..."]}, '
            f"got {type(payload).__name__}",
            code="invalid_json",
        )
    return payload


async def rerank(request: Request) -> Response:
    """Shared handler of the three rerank routes."""
    state = request.app.state
    path = request.scope["route"].path
    request.state.dialect = route_dialect(path)
    payload = await read_json_body(request, state.settings.max_body_bytes)
    dialect = detect_dialect(path, payload, request.headers)
    request.state.dialect = dialect
    try:
        model = REQUEST_MODELS[dialect]
        big = request.state.body_bytes >= OFFLOAD_BYTES
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
