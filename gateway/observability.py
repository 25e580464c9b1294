"""Request metrics middleware and the `/metrics` route, installed by the app factory.

The middleware is pure ASGI (not `BaseHTTPMiddleware`), so streamed bodies pass through untouched and a
client that goes away cancels the handler as usual. Labels stay bounded: `route` is the matched route's
template (`/v1/rerank`), never the raw path; unmatched paths share one label.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import check_api_key
from gateway.dialects import NAMES
from gateway.metrics import REGISTRY, REQUEST_LATENCY, REQUESTS, REQUESTS_IN_FLIGHT

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from gateway.config import Settings

DIALECTS = NAMES  # the registry's names: a fixed label set
OTHER_DIALECT = "other"
UNMATCHED_ROUTE = "<unmatched>"
# nginx's code for "client closed the request": the handler was cancelled before a response started.
CLIENT_CLOSED_STATUS = 499


def route_label(scope: Scope) -> str:
    """The matched route's path template, or one shared label when no route matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def dialect_label(scope: Scope) -> str:
    """The dialect a route stored in `request.state.dialect`, or `other`."""
    state = scope.get("state")
    dialect = state.get("dialect") if isinstance(state, dict) else None
    # Only known values: a typo in a route must not mint a new time series.
    return dialect if dialect in DIALECTS else OTHER_DIALECT


class RequestMetricsMiddleware:
    """Counts every HTTP request by dialect, route and status, and times it until its last body byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start_s = time.perf_counter()
        status: int | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            if status is None:
                status = CLIENT_CLOSED_STATUS
            raise
        except BaseException:
            # The server answers 500 for an exception that escaped the app before a response started.
            if status is None:
                status = 500
            raise
        finally:
            REQUESTS_IN_FLIGHT.dec()
            dialect = dialect_label(scope)
            REQUESTS.labels(dialect, route_label(scope), str(status if status is not None else 500)).inc()
            REQUEST_LATENCY.labels(dialect).observe(time.perf_counter() - start_s)


def metrics_endpoint(settings: Settings) -> Any:
    """The `/metrics` handler: the registry in the Prometheus text format, behind the API keys if asked."""
    api_keys = list(settings.api_keys) if settings.metrics_require_auth else []

    async def metrics(request: Request) -> Response:
        check_api_key(api_keys, request.headers.get("authorization"))  # no keys: open
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return metrics


def install_observability(app: FastAPI, settings: Settings) -> None:
    """Add the request metrics middleware and `GET /metrics` to `app`."""
    app.add_middleware(RequestMetricsMiddleware)
    app.add_api_route(
        "/metrics",
        metrics_endpoint(settings),
        methods=["GET"],
        tags=["observability"],
        summary="Prometheus metrics",
        description=(
            "Every `rerank_*` metric in the Prometheus text exposition format. Needs a Bearer API key "
            "when the gateway runs with RERANK_METRICS_REQUIRE_AUTH=true and RERANK_API_KEYS set."
        ),
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}},
    )
