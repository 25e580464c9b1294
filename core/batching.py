"""The one cost rule and the one batch planner that every engine and the scheduler use.

A batch's cost is what an engine pays to run it: a padded engine (ONNX, the official wrapper) pays for every
row at the longest row's length; an engine that packs sequences (vLLM) pays for the tokens it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchBudget:
    """What one engine run may hold: `max_tokens` of cost and `max_rows` prompts."""

    max_tokens: int
    max_rows: int
    padded: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_rows < 1:
            raise ValueError(f"a batch budget needs max_tokens and max_rows >= 1, got {self}")


def batch_cost(lengths: Sequence[int], padded: bool) -> int:
    """The cost of running prompts of these lengths together."""
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if padded else sum(lengths)


def plan_batches(
    lengths: Sequence[int], budget: BatchBudget, *, alone_over: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches that fit `budget`, longest first (ties: lower index first).

    Sorting by length keeps rows of one batch close in length, so padding wastes little. A prompt longer
    than the whole budget, or than `alone_over` tokens, runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = total = 0
    for i in order:
        n = lengths[i]
        if alone_over is not None and n > alone_over:
            batches.append([i])
            continue
        rows = len(current) + 1
        cost = max(longest, n) * rows if budget.padded else total + n
        if current and (rows > budget.max_rows or cost > budget.max_tokens):
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, n), total + n
    if current:
        batches.append(current)
    return batches
