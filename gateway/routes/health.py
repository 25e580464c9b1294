"""GET /health (the process is up) and GET /ready (the engine is loaded, warm and healthy)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from engines.base import EngineError

router = APIRouter(tags=["health"])


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness, with what each engine reports."""

    status: Literal["ready", "loading", "unavailable", "misconfigured"] = Field(
        description="ready: requests are scored now; loading: the model is not loaded or warm yet; "
        "unavailable: loaded, but no engine passes its health check; misconfigured: an engine is up but "
        "cannot serve this gateway (a vLLM sidecar serving another model name), `reason` says why."
    )
    model: str = Field(description="The served model name.")
    reason: str | None = Field(None, description="Why the gateway is not ready, when it knows.")
    engines: dict[str, Any] = Field(
        default_factory=dict,
        description="Per engine state: `{name: {healthy, precision}}`, or the router's status (engines with "
        "their precision, circuit). precision: fp32 or int8 for the ONNX engine, sidecar for vLLM (its "
        "--dtype decides).",
    )


@router.get("/health", response_model=HealthResponse, summary="Liveness: always 200 while the process runs")
async def health() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness: 200 once the engine is loaded and warm, 503 otherwise",
    responses={503: {"model": ReadyResponse, "description": "Loading, or no engine is healthy."}},
)
async def ready(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        body = ReadyResponse(status="loading", model=settings.public_model_name)
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    engine = service.engine
    try:
        healthy = bool(await engine.health())
    except EngineError:
        healthy = False
    status_fn = getattr(engine, "status", None)
    engines = (
        dict(await status_fn())
        if callable(status_fn)
        else {engine.info.name: {"healthy": healthy, "precision": engine.info.precision}}
    )
    # A misconfigured primary is not ready even while a fallback answers: falling back silently for
    # every request is exactly what an operator must hear about.
    problem = getattr(engine, "config_problem", None)
    if isinstance(problem, str):
        body = ReadyResponse(
            status="misconfigured", model=settings.public_model_name, engines=engines, reason=problem
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    body = ReadyResponse(
        status="ready" if healthy else "unavailable", model=settings.public_model_name, engines=engines
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if healthy else 503)
