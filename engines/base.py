"""The one small interface every engine implements, and the errors engines raise.

Engines return raw scores (logit("1") - logit("0") at the last position) in input order. Sorting,
top_n, normalization and response dialects belong to the gateway, so every engine is compared on
identical numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from core.batching import BatchBudget
from core.contract import Prompt

T = TypeVar("T")


class EngineError(Exception):
    """Base class for every engine failure."""

    # Set by a router that has already reported this error to its observer, under the engine that raised
    # it, so that a caller counting failed engine calls does not count it a second time.
    reported: bool = False


class EngineUnavailable(EngineError):
    """The engine cannot take work now (not loaded, sidecar down, circuit open)."""


class EngineTimeout(EngineError):
    """The engine did not answer within its deadline."""


class EngineFailure(EngineError):
    """The engine answered, but with an error or a malformed result."""


class EngineRejected(EngineFailure):
    """A healthy engine refused this batch (e.g. a prompt over its length limit); not a health failure."""


class ModelPreparationError(Exception):
    """A model folder is missing, truncated, or does not match this gateway's scoring contract."""


def error_kind(exc: EngineError) -> str:
    """The kind an engine error is reported under: unavailable, timeout, rejected or failure."""
    if isinstance(exc, EngineTimeout):
        return "timeout"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, EngineRejected):
        return "rejected"
    return "failure"


class CircuitState(enum.Enum):
    """A router's circuit breaker state; values order them by how far the primary is cut off."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class EngineObserver(Protocol):
    """What the engine layer reports (metrics live above it; `gateway.metrics` implements this)."""

    def engine_error(self, engine: str, kind: str) -> None:
        """`engine` failed a call; `kind` is `error_kind(exc)`. Each failure is reported once."""

    def fallback(self, reason: str) -> None:
        """A batch went to the fallback: circuit_open, or the primary's error kind."""

    def circuit_changed(self, engine: str, state: CircuitState) -> None:
        """The circuit in front of `engine` (the primary) is now `state` (also sent once at creation)."""

    def engine_health(self, engine: str, healthy: bool) -> None:
        """The result of a health check of `engine`."""


class NullObserver:
    """The default observer: reports nowhere."""

    def engine_error(self, engine: str, kind: str) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def circuit_changed(self, engine: str, state: CircuitState) -> None:
        pass

    def engine_health(self, engine: str, healthy: bool) -> None:
        pass


NULL_OBSERVER: EngineObserver = NullObserver()


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine can do, asked by the router and the scheduler instead of branching on its type."""

    name: str
    # Padded engines pay for the longest row in a batch; their token budget counts padded cost.
    padded: bool
    max_batch_tokens: int
    max_batch_pairs: int
    # Engines that batch internally (vLLM) are sent large slices, several at once.
    max_concurrent_batches: int = 1
    # The numbers the scores are computed in ("fp32", "int8"; "sidecar" when the sidecar's own --dtype
    # decides), reported by /ready so an operator knows which fidelity figures apply.
    precision: str = "fp32"

    @property
    def budget(self) -> BatchBudget:
        """One run's budget, for `core.batching.plan_batches`."""
        return BatchBudget(self.max_batch_tokens, self.max_batch_pairs, padded=self.padded)


@dataclass(frozen=True, slots=True)
class Scored:
    """Raw scores in input order, and the name of the engine that computed them."""

    scores: list[float]
    engine: str


@runtime_checkable
class Engine(Protocol):
    """A scorer of mxbai-v2 prompts."""

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None:
        """Load weights or connect, and warm up. Idempotent."""

    async def health(self) -> bool:
        """True when the engine can score now."""

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        """Raw scores for `prompts`, in input order. Raises EngineError subclasses only.

        A routing engine reports which of its engines answered in `Scored.engine`.
        """

    async def close(self) -> None:
        """Release threads, sessions and connections."""


class EngineThread:
    """The one thread an in-process engine runs its blocking work on (load, score): never the event loop."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self._name}-engine")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Let an in-flight batch finish on its thread without blocking the event loop.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (a health probe loop) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
