"""The one small interface every engine implements, and the errors engines raise.

Engines return raw scores (logit("1") - logit("0") at the last position) in input order. Sorting,
top_n, normalization and response dialects belong to the gateway, so every engine is compared on
identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from core.batching import BatchBudget
from core.contract import Prompt


class EngineError(Exception):
    """Base class for every engine failure."""


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


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine can do, asked by the router and the coalescer instead of branching on its type."""

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
