"""Admission before work: a rerank request is refused (429) before its body is read when the gateway is full.

Two cheap checks, made in the ASGI middleware before the route reads, validates or tokenizes anything:
- requests inside the app: at most `max_active_requests` rerank requests are being read, parsed, queued or
  scored at once (uvicorn itself admits up to RERANK_MAX_CONNECTIONS connections);
- the scheduler's queue: when its queued tokens are at RERANK_MAX_QUEUED_TOKENS, no request could be queued.
A refusal costs microseconds: a small JSON body in the app's error shape with `Retry-After` (the queue's
measured drain time). /health, /ready, /metrics and every other route pass untouched, so probes and scrapes
stay fast under overload.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Protocol

from gateway import dialects
from gateway.errors import Overloaded
from gateway.metrics import REJECTED

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

# Every rerank route of every dialect (the registry's list).
RERANK_PATHS = frozenset(dialects.PATHS)


class QueueLoad(Protocol):
    """What admission asks the scheduler (gateway.scheduler.Scheduler)."""

    @property
    def callers(self) -> int: ...

    def is_full(self, arriving: int = 0) -> bool: ...

    def retry_after_s(self) -> float: ...


class AdmissionControl:
    """Counts the rerank requests inside the app and decides, before any work, whether one more may enter."""

    def __init__(self, *, max_active_requests: int, queue: QueueLoad | None = None) -> None:
        if max_active_requests < 1:
            raise ValueError(f"max_active_requests must be at least 1, got {max_active_requests}")
        self.max_active_requests = max_active_requests
        # Set by the lifespan once the scheduler exists; None (loading, or no scheduler) checks requests only.
        self.queue = queue
        self.active = 0

    def refusal(self) -> tuple[str, str, float] | None:
        """(reason, message, retry_after_s) when a new request must be refused now, else None."""
        queue = self.queue
        if self.active >= self.max_active_requests:
            retry_after_s = queue.retry_after_s() if queue is not None else 1.0
            message = (
                f"{self.active} requests are being served, the limit of this replica "
                "(RERANK_MAX_ACTIVE_REQUESTS); retry after the Retry-After header"
            )
            return "active_requests", message, retry_after_s
        # Requests inside the app that the scheduler has not seen yet are still being read or tokenized.
        if queue is not None and queue.is_full(arriving=max(0, self.active - queue.callers)):
            message = (
                "the scoring queue is full (RERANK_MAX_QUEUED_TOKENS, RERANK_MAX_QUEUE_DELAY_MS); retry "
                "after the Retry-After header or send fewer documents"
            )
            return "queue_full", message, queue.retry_after_s()
        return None


def overloaded_response(
    message: str, retry_after_s: float, *, path: str = "/v1/rerank", headers: dict[str, str] | None = None
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a 429 in the error shape of the dialect the route and headers imply."""
    error = Overloaded(message, retry_after_s=retry_after_s)
    body = json.dumps(dialects.route_dialect(path, headers or {}).error_body(error)).encode()
    out = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),
    ]
    return out, body


class AdmissionMiddleware:
    """Refuses rerank requests with 429 before their body is read when `control` says the gateway is full."""

    def __init__(self, app: ASGIApp, *, control: AdmissionControl, paths: frozenset[str] = RERANK_PATHS):
        self.app = app
        self.control = control
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        control = self.control
        refusal = control.refusal()
        if refusal is not None:
            reason, message, retry_after_s = refusal
            REJECTED.labels(reason).inc()
            request_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            headers, body = overloaded_response(
                message, retry_after_s, path=scope["path"], headers=request_headers
            )
            # The body is never read: the server discards it (or closes the connection).
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        control.active += 1
        counted = True

        async def send_counted(message) -> None:
            # A request stops counting as its last body part goes out, not when the app returns after it: a
            # client that sends its next request the moment it has the answer must not find its own finished
            # request counted as one still arriving (a sequential client was refused 429 that way).
            nonlocal counted
            if counted and message["type"] == "http.response.body" and not message.get("more_body", False):
                counted = False
                control.active -= 1
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if counted:
                control.active -= 1


__all__ = ["RERANK_PATHS", "AdmissionControl", "AdmissionMiddleware", "QueueLoad", "overloaded_response"]
