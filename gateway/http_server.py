"""The HTTP server under the app: uvicorn, with the connection limits a trusted front end would enforce.

uvicorn alone leaves a connection open as long as its client likes until the first request arrives (its
keep-alive timeout only starts after a response), has no connection cap of its own (`limit_concurrency`
answers 503 but keeps every socket), accepts any header size with httptools, and at the end of a graceful
shutdown cancels what is still running and answers plain-text 500. So the gateway runs uvicorn's h11
protocol with a thin subclass (`GuardedH11Protocol`) and its own `Server`:

- request head (request line + headers) within `header_read_timeout_s` of its first byte, or of the
  connection's opening: else 408 and close;
- a head over `max_header_bytes`: 431 and close (h11 checks an incomplete head; the subclass also checks one
  that arrived whole);
- at most `max_connections` open connections: a new one closes the longest-idle connection (waiting for a
  first request or between keep-alive requests) to make room, or gets 503 when every connection is busy, so
  silent sockets can never use up the file descriptors that real clients need;
- `keep_alive_timeout_s` between requests (uvicorn's own timer);
- the body deadline (`body_read_timeout_s`, 408) is enforced where the body is read (gateway.jsonbody).

Shutdown (SIGTERM): listeners close, idle connections close, running requests may finish until
`drain_timeout_s`; then `DrainController` cancels what still runs and answers 503 JSON with `Retry-After`
(queued pairs leave the scheduler), the lifespan gets what is left of a one-second budget to close the
engine, and a watchdog ends the process `EXIT_GRACE_S` after the drain deadline whatever the engine is doing
(an onnxruntime call cannot be interrupted; its thread would otherwise hold the exit for its whole run).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from engines.base import EngineError, ModelPreparationError
from gateway.errors import ShuttingDown
from gateway.metrics import CONNECTIONS_CLOSED

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from gateway.config import Settings

log = logging.getLogger("gateway")

DEFAULT_MAX_CONNECTIONS = 1_000
# File descriptors kept for everything but client sockets: model files, logs, the vLLM client pool, threads.
RESERVED_FDS = 128
# After the drain deadline: time for the lifespan to close the engine, and the hard stop after it.
LIFESPAN_GRACE_S = 1.0
EXIT_GRACE_S = 1.5
DRAIN_CUT = "drain deadline"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may hold and for how long."""

    header_read_timeout_s: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_read_timeout_s=settings.header_read_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_connections=settings.max_connections or default_max_connections(),
        )


def default_max_connections() -> int:
    """1,000, or fewer so that client sockets stay under the process's open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - RESERVED_FDS))


def error_response_bytes(status: int, message: str, error_type: str, code: str, **headers: str) -> bytes:
    """A whole HTTP/1.1 response in the gateway's error shape that closes the connection."""
    body = json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _HeadLimitedConnection(h11.Connection):
    """h11's server connection, with the head size limit applied to heads that arrive whole as well."""

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.error_status: int | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise
        if type(event) is h11.Request:
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > self.max_header_bytes:
                self.error_status = 431
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a head size limit and a connection cap."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadLimitedConnection(self.limits.max_header_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        # Loop time since when the connection waits for a request (None while one is being served).
        self.idle_since: float | None = None

    # --- connection life --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        self._arm_head_timer()
        self._enforce_connection_cap()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head() and self._head_timer is None:
            self._arm_head_timer()  # the first byte of a request after a keep-alive pause
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._request_started()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is not cycle:  # a pipelined request started at once
            self._request_started()
        elif not self.transport.is_closing():
            self.idle_since = self.loop.time()

    def _request_started(self) -> None:
        self._cancel_head_timer()
        self.idle_since = None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # --- the head deadline ------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_read_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        CONNECTIONS_CLOSED.labels("header_timeout").inc()
        self.reply_and_close(
            408,
            f"the request headers did not arrive within {self.limits.header_read_timeout_s:g} s "
            "(RERANK_HEADER_READ_TIMEOUT_S): send the whole request head at once",
            "request_timeout",
            "header_timeout",
        )

    # --- errors written straight to the socket ------------------------------------------------------

    def reply_and_close(self, status: int, message: str, error_type: str, code: str, **headers: str) -> None:
        """Write a whole error response and close (no ASGI cycle: the request never reached the app)."""
        if self.transport.is_closing():
            return
        self.transport.write(error_response_bytes(status, message, error_type, code, **headers))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self.conn.error_status == 431:
            CONNECTIONS_CLOSED.labels("headers_too_large").inc()
            self.reply_and_close(
                431,
                f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                "(RERANK_MAX_HEADER_BYTES): send smaller headers",
                "request_header_fields_too_large",
                "headers_too_large",
            )
            return
        super().send_400_response(msg)

    # --- the connection cap -----------------------------------------------------------------------------

    def _enforce_connection_cap(self) -> None:
        if len(self.connections) <= self.limits.max_connections:
            return
        victim: GuardedH11Protocol | None = None
        oldest = float("inf")
        for other in self.connections:
            if other is self or not isinstance(other, GuardedH11Protocol):
                continue
            since = other.idle_since
            if since is not None and since < oldest and not other.transport.is_closing():
                victim, oldest = other, since
        if victim is not None:
            # An idle connection costs its client one reconnect; a refused one costs a real request.
            CONNECTIONS_CLOSED.labels("evicted_idle").inc()
            victim.close_idle()
            return
        CONNECTIONS_CLOSED.labels("over_capacity").inc()
        self.reply_and_close(
            503,
            f"the gateway holds {self.limits.max_connections} busy connections (RERANK_MAX_CONNECTIONS): "
            "retry shortly",
            "service_unavailable",
            "too_many_connections",
            **{"retry-after": "1"},
        )

    def close_idle(self) -> None:
        """Close a connection that waits for a request (to make room for a new one)."""
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol bound to `limits` (uvicorn instantiates the class it is given)."""
    return type("GatewayH11Protocol", (GuardedH11Protocol,), {"limits": limits})


# --- drain --------------------------------------------------------------------------------------------


class DrainController:
    """Knows the requests in flight; at the drain deadline answers those still running with 503."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.deadline_s: float | None = None  # time.monotonic() of the drain deadline, once draining
        self.cut = False

    @property
    def draining(self) -> bool:
        return self.deadline_s is not None

    def begin(self, timeout_s: float) -> None:
        """Start the drain: requests still running `timeout_s` from now are cut (idempotent)."""
        if self.deadline_s is not None:
            return
        self.deadline_s = time.monotonic() + timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self.cut_now)

    def cut_now(self) -> None:
        """Cancel every request still running; each answers 503 unless its response had begun."""
        self.cut = True
        if self._running:
            log.warning("drain deadline: answering %d unfinished requests with 503", len(self._running))
        for task in list(self._running):
            task.cancel(DRAIN_CUT)

    def time_left_s(self, default_s: float) -> float:
        """Seconds the lifespan may still spend closing down (`default_s` when no drain was started)."""
        if self.deadline_s is None:
            return default_s
        return max(0.0, self.deadline_s + LIFESPAN_GRACE_S - time.monotonic())


class DrainMiddleware:
    """Runs each HTTP request as a task the DrainController can cut; a cut request gets 503 + Retry-After."""

    def __init__(self, app: ASGIApp, controller: DrainController) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.controller.cut:
            await _send_shutting_down(send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        self.controller._running.add(task)
        try:
            # asyncio.wait, not `await task`: this task's own cancellation must not look like a cut.
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self.controller._running.discard(task)
        if task.cancelled() and self.controller.cut:
            if not started:
                await _send_shutting_down(send)
            return
        task.result()  # the request's own outcome: its exception, or its cancellation


async def _send_shutting_down(send: Send) -> None:
    exc = ShuttingDown(
        "the gateway is shutting down and could not finish this request within its drain time "
        "(RERANK_DRAIN_TIMEOUT_S): retry it, another instance will answer",
        code="shutting_down",
    )
    body = json.dumps(
        {"error": {"message": exc.message, "type": exc.error_type, "param": None, "code": exc.code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- start-up errors ------------------------------------------------------------------------------------

# What a start-up failure the operator can fix raises: shown as one line, not as a lifespan traceback.
KNOWN_STARTUP_ERRORS = (ModelPreparationError, EngineError, ValueError, OSError)
_UVICORN_STARTUP_FAILED = "Application startup failed. Exiting."


class _StartupErrors:
    """Keeps a known start-up error for the CLI to print as one line; other errors keep their traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failure: dict[str, Any] = {}

        async def quiet_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                failure.update(message)
                message = {"type": message["type"], "message": ""}
            await send(message)

        try:
            await self.app(scope, receive, quiet_send)
        except KNOWN_STARTUP_ERRORS as exc:
            if failure:
                self.error = exc
            raise
        except BaseException:
            if failure.get("message"):
                logging.getLogger("uvicorn.error").error(failure["message"])
            raise

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop uvicorn's "startup failed" line when the CLI prints the cause itself."""
        return not (self.error is not None and record.getMessage() == _UVICORN_STARTUP_FAILED)


# --- the server -----------------------------------------------------------------------------------------


def _hard_exit(drain_timeout_s: float) -> None:
    log.warning(
        "exiting %.1f s after the drain deadline (RERANK_DRAIN_TIMEOUT_S=%g) without waiting for the engine",
        EXIT_GRACE_S,
        drain_timeout_s,
    )
    for handler in [*logging.getLogger().handlers, *logging.getLogger("uvicorn").handlers]:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


def serve_app(app: FastAPI, settings: Settings) -> int:
    """Serve `app` until SIGTERM or SIGINT; a known start-up failure is raised for the CLI to print."""
    import uvicorn

    drain: DrainController = app.state.drain
    drain_timeout_s = settings.drain_timeout_s

    class GatewayServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            drain.begin(drain_timeout_s)
            watchdog = threading.Timer(drain_timeout_s + EXIT_GRACE_S, _hard_exit, args=(drain_timeout_s,))
            watchdog.daemon = True
            watchdog.start()
            await super().shutdown(sockets)

    wrapped = _StartupErrors(app)
    config = uvicorn.Config(
        wrapped,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=protocol_class(ConnectionLimits.from_settings(settings)),  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        # A backstop only: the DrainController answers what is left at the deadline itself.
        timeout_graceful_shutdown=drain_timeout_s + 0.5,  # type: ignore[arg-type]
    )
    logging.getLogger("uvicorn.error").addFilter(wrapped.filter)
    # uvicorn drains on SIGTERM, restores the handler it found, then re-raises the signal. With SIGTERM
    # ignored beforehand that re-raise is a no-op, so a completed drain exits 0 instead of dying by signal
    # 15 (uvicorn still catches SIGTERM itself while it serves).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = GatewayServer(config)
    try:
        server.run()
    except SystemExit:
        if wrapped.error is not None:
            raise wrapped.error from None
        raise
    return 0
