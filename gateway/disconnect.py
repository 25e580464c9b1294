"""Cancel a request's work when its HTTP client disconnects.

A route calls it once the request body has been parsed (FastAPI does that before the route runs):

    from gateway.disconnect import run_until_disconnected

    result = await run_until_disconnected(request, service.rerank(...))

The work runs as its own task while a watcher waits on the ASGI receive channel. Once the body has been
read, the only message a server sends there is `http.disconnect` (uvicorn, Starlette's middleware and the
test clients all behave so), so the watcher costs no polling. When the client goes, the work is cancelled
with the message "client_disconnected": the scheduler then removes the request's queued pairs before they
reach the engine and counts them under that reason. ClientDisconnected (499, which nobody reads) is raised
so the route stops there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

T = TypeVar("T")
DISCONNECT_REASON = "client_disconnected"
DEFAULT_POLL_INTERVAL_S = 0.05


class ClientDisconnected(GatewayError):
    """The client closed the connection before its answer was ready (499, never delivered)."""

    status_code = 499
    error_type = "client_closed_request"


class _DisconnectSource(Protocol):
    async def is_disconnected(self) -> bool: ...


async def wait_for_disconnect(request: Any, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
    """Return once the client of `request` (a Starlette Request, or anything with is_disconnected) is gone."""
    receive = getattr(request, "receive", None)
    if receive is not None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return
            # Leftover empty body chunks; a route that still had body to read must not use this helper.
    source: _DisconnectSource = request
    # Without a receive channel, is_disconnected() is all there is to ask: poll it.
    while not await source.is_disconnected():  # noqa: ASYNC110
        await asyncio.sleep(poll_interval_s)


async def run_until_disconnected(
    request: Any,
    work: Awaitable[T],
    *,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    work_task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request, poll_interval_s))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        watcher.cancel()
        raise
    if work_task.done() or watcher.cancelled() or watcher.exception() is not None:
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            log.debug("disconnect watcher failed; waiting for the work alone", exc_info=watcher.exception())
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return await work_task
    work_task.cancel(DISCONNECT_REASON)
    # Wait for the work to unwind (its queued pairs released) without swallowing our own cancellation.
    await asyncio.wait({work_task})
    if not work_task.cancelled() and work_task.exception() is not None:
        log.debug("work of a disconnected client ended with %r", work_task.exception())
    raise ClientDisconnected("the client closed the connection before the answer was ready")


__all__ = ["DISCONNECT_REASON", "ClientDisconnected", "run_until_disconnected", "wait_for_disconnect"]
