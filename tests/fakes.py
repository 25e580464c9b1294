"""Test doubles shared by the test modules: one wrapper base and one recording engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from core.contract import Prompt
from engines.base import CircuitState, Engine, EngineInfo, Scored


class DelegatingEngine:
    """Wraps a real engine: `info`, `start` and `health` are the inner engine's; subclasses wrap `score`."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    async def start(self) -> None:
        await self.inner.start()

    async def health(self) -> bool:
        return await self.inner.health()


class RecordingEngine(DelegatingEngine):
    """A shared real engine, recording each call's prompts; a closed `gate` holds calls (a slow engine).

    `fail(call_number, prompts)` may return an exception to raise instead of scoring. `close` does nothing:
    the inner engine belongs to a fixture that outlives the routers and schedulers wrapped around this.
    """

    def __init__(
        self, inner: Engine, *, fail: Callable[[int, Sequence[Prompt]], Exception | None] | None = None
    ) -> None:
        super().__init__(inner)
        self.calls: list[tuple[Prompt, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self._fail = fail

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        self.calls.append(tuple(prompts))
        self.entered.set()
        await self.gate.wait()
        if self._fail is not None and (exc := self._fail(len(self.calls), prompts)) is not None:
            raise exc
        return await self.inner.score(prompts)

    async def close(self) -> None:
        """The inner engine is closed by its owner fixture."""

    def seen(self) -> list[Prompt]:
        """Every prompt sent so far, in call order."""
        return [p for call in self.calls for p in call]

    def sizes(self) -> list[int]:
        """Prompts per call."""
        return [len(call) for call in self.calls]


class RecordingObserver:
    """An engines.base.EngineObserver that keeps every event, in order, as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def engine_error(self, engine: str, kind: str) -> None:
        self.events.append(("error", engine, kind))

    def fallback(self, reason: str) -> None:
        self.events.append(("fallback", reason))

    def circuit_changed(self, engine: str, state: CircuitState) -> None:
        self.events.append(("circuit", engine, state))

    def engine_health(self, engine: str, healthy: bool) -> None:
        self.events.append(("health", engine, healthy))

    def of(self, kind: str) -> list[tuple]:
        """The events of one kind, without the kind."""
        return [event[1:] for event in self.events if event[0] == kind]
