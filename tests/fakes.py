"""Test doubles shared by the test modules."""

from __future__ import annotations

from engines.base import Engine, EngineInfo


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
