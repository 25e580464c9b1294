"""Ordering of scored documents: by score descending, ties to the lower index, bounded by top_n."""

from __future__ import annotations

from collections.abc import Sequence


def rank_indices(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices of `scores` sorted best first (ties keep the lower index first), cut to `top_n`."""
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_n is None else order[:top_n]
