"""The FastAPI app factory: routes, error handlers, request ids, docs, and the engine's lifespan.

Lifespan: resolve the model, build and start the engine, warm it with one pair, build the scheduler, then
mark the service ready. On shutdown (uvicorn stops taking connections and waits up to drain_timeout_s for
in-flight requests first) the scheduler drains and the engine closes.

Admission (gateway/admission.py) sits in front of the rerank routes: when RERANK_MAX_ACTIVE_REQUESTS are
inside or the scheduler's queue is full, a request gets 429 before its body is read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import DomainError
from engines.base import EngineError
from gateway.admission import AdmissionControl, AdmissionMiddleware
from gateway.errors import GatewayError, clip, from_domain_error, from_engine_error
from gateway.http_server import DrainController, DrainMiddleware
from gateway.schemas import invalid_request_from_errors

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from engines.base import Engine
    from gateway.config import Settings

log = logging.getLogger("gateway")

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed only when it is short printable ASCII, so it is safe in headers and logs.
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _version() -> str:
    try:
        return version("rerank-gateway")
    except PackageNotFoundError:
        return "0.0.0"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's `x-request-id`, or a new one) and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started_s"] = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    if exc.status_code >= 500:
        log.warning("request %s: %s %s", _request_id(request), exc.status_code, exc.message)
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers(),
    )


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    """A domain error (core.errors) or an engine error, at its status in the table."""
    assert isinstance(exc, (DomainError, EngineError))
    error = from_domain_error(exc) if isinstance(exc, DomainError) else from_engine_error(exc)
    return await _gateway_error(request, error)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return await _gateway_error(request, invalid_request_from_errors(exc.errors(), fastapi_locations=True))


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = (
            f"no route {clip(request.url.path)}: see /docs for the routes "
            "(POST /v1/rerank, /rerank, /v2/rerank)"
        )
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {clip(request.url.path)}: see /docs"
    else:
        message = str(exc.detail)
    error_type = _HTTP_TYPES.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(message, error_type, None, error_type),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request %s failed", _request_id(request), exc_info=exc)
    return JSONResponse(
        error_body(
            f"internal error (request id {_request_id(request)}): the gateway log has the details",
            "internal_error",
            code="internal_error",
        ),
        status_code=500,
        headers={REQUEST_ID_HEADER: _request_id(request)},
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load, start and warm the engine before the first request; drain and close it at shutdown."""
    from core.contract import PromptBuilder
    from gateway import compose

    settings: Settings = app.state.settings
    model_dir: Path | None = app.state.model_dir
    if model_dir is None:
        model_dir = await asyncio.to_thread(compose.resolve_model, settings)
        settings = app.state.settings = compose.with_served_name(settings, model_dir)
    builder = await asyncio.to_thread(PromptBuilder.from_dir, model_dir, max_length=settings.max_length)
    engine: Engine | None = app.state.engine
    if engine is None:
        engine = compose.build_serving_engine(settings, model_dir)
    scheduler = None
    service = None
    try:
        started = time.perf_counter()
        await engine.start()
        service = compose.build_service(settings, builder, engine, model_dir)
        await service.warm()
        if settings.coalesce:
            scheduler = compose.build_scheduler(settings, engine)
            service.scorer = scheduler
            app.state.admission.queue = scheduler
        app.state.service = service
        service.ready = True
        log.info(
            "ready: %s from %s on %s in %.1f s",
            settings.public_model_name,
            model_dir,
            engine.info.name,
            time.perf_counter() - started,
        )
        yield
    finally:
        if service is not None:
            service.ready = False
        # After a SIGTERM drain only what is left of its budget: the process must exit soon after the
        # deadline even when the engine is busy (an onnxruntime run cannot be interrupted).
        drain: DrainController = app.state.drain
        if scheduler is not None:
            await scheduler.drain(drain.time_left_s(settings.drain_timeout_s))
            await scheduler.close()
            app.state.admission.queue = None
        try:
            await asyncio.wait_for(engine.close(), drain.time_left_s(settings.drain_timeout_s) or 0.01)
        except asyncio.TimeoutError:
            log.warning("the engine was still busy at the end of the drain; exiting without waiting for it")


def _install_observability(app: FastAPI, settings: Settings) -> None:
    try:
        from gateway.observability import install_observability
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.observability":
            raise
        return
    install_observability(app, settings)


def create_app(settings: Settings, *, model_dir: Path | None = None, engine: Engine | None = None) -> FastAPI:
    """The gateway app. `model_dir` skips model resolution; `engine` replaces the configured engine."""
    from gateway.docs import install_docs, install_openapi
    from gateway.routes import health, models, rerank

    app = FastAPI(
        title="rerank-gateway",
        version=_version(),
        description=(
            "Self-hosted mxbai-rerank-v2 serving. POST /v1/rerank, /rerank and /v2/rerank speak the Cohere "
            "(v1, v2), Jina / vLLM and Hugging Face TEI rerank dialects, each answered in its own shape. "
            'Errors are `{"error": {"message", "type", "param", "code"}}`. '
            "With RERANK_API_KEYS set, send `Authorization: Bearer <key>` (/health and /ready stay open)."
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    if model_dir is not None:
        from gateway.compose import with_served_name

        settings = with_served_name(settings, Path(model_dir))
    app.state.settings = settings
    app.state.model_dir = Path(model_dir) if model_dir is not None else None
    app.state.engine = engine
    app.state.service = None
    app.state.drain = DrainController()
    app.state.admission = AdmissionControl(max_active_requests=settings.max_active_requests)

    app.include_router(rerank.router)
    app.include_router(health.router)
    app.include_router(models.router)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(EngineError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    install_docs(app)
    install_openapi(app, rerank.REQUEST_BODY_MODELS, auth_enabled=bool(settings.api_keys), settings=settings)
    # Inside the metrics and request-id middleware, so a request cut by the drain is counted and has an id.
    app.add_middleware(DrainMiddleware, controller=app.state.drain)
    # Inside the metrics middleware too (a 429 is counted), outside everything that reads the body.
    app.add_middleware(AdmissionMiddleware, control=app.state.admission)
    _install_observability(app, settings)
    app.add_middleware(RequestIdMiddleware)
    return app
