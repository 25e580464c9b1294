"""How closely one engine's scores follow another's: raw differences and, per query, the ranking.

Used by `rerank-gateway export` (the quantized graph against fp32, before anything is written), by the
trained-weights test tier and by the precision benchmark, so all three report the same figures. No
dependencies beyond the standard library.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs two sequences of one length, not {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    if n < 2:
        return 1.0
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else 1.0


def _argmax(xs: Sequence[float]) -> int:
    # Ties keep the lower index first, as the gateway's ranking does.
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@dataclass(frozen=True, slots=True)
class Fidelity:
    """Scores `got` against `want`, over queries that each rank several documents."""

    pairs: int
    queries: int
    max_abs_diff: float
    median_abs_diff: float
    spearman_mean: float
    spearman_min: float
    top1_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)

    def row(self, name: str) -> str:
        """One line of a fidelity table."""
        return (
            f"| {name} | {self.max_abs_diff:.3g} | {self.median_abs_diff:.3g} | {self.spearman_mean:.4f} / "
            f"{self.spearman_min:.3f} | {100 * self.top1_agreement:.0f} % | {self.pairs} |"
        )


TABLE_HEADER = (
    "| engine vs reference | max abs Δraw | median abs Δraw | per-query Spearman mean / min | top-1 same "
    "| pairs |\n"
    "|---|---|---|---|---|---|"
)


def compare(got: Sequence[Sequence[float]], want: Sequence[Sequence[float]]) -> Fidelity:
    """Fidelity of `got` to `want`, both grouped by query (one list of document scores per query)."""
    if len(got) != len(want) or any(len(g) != len(w) for g, w in zip(got, want, strict=False)):
        raise ValueError("compare needs the same queries with the same number of documents on both sides")
    diffs = [abs(g - w) for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True)]
    if not diffs:
        raise ValueError("compare needs at least one scored pair")
    ranked = [(g, w) for g, w in zip(got, want, strict=True) if len(g) > 1]
    rhos = [spearman(g, w) for g, w in ranked] or [1.0]
    top1 = [_argmax(g) == _argmax(w) for g, w in ranked] or [True]
    return Fidelity(
        pairs=len(diffs),
        queries=len(got),
        max_abs_diff=max(diffs),
        median_abs_diff=statistics.median(diffs),
        spearman_mean=statistics.fmean(rhos),
        spearman_min=min(rhos),
        top1_agreement=sum(top1) / len(top1),
    )


@dataclass(frozen=True, slots=True)
class FidelityBound:
    """What a quantized graph must reach against fp32 to be written (and served) at all."""

    max_abs_diff: float
    spearman_min: float

    def violations(self, fidelity: Fidelity) -> list[str]:
        out = []
        if fidelity.max_abs_diff > self.max_abs_diff:
            out.append(f"max |Δraw| {fidelity.max_abs_diff:.3g} > {self.max_abs_diff:g}")
        if fidelity.spearman_min < self.spearman_min:
            out.append(f"per-query Spearman min {fidelity.spearman_min:.3f} < {self.spearman_min:g}")
        return out


# The int8 graph is written only when it follows fp32 this closely on the export's sample prompts (export's
# --int8-max-abs-diff and --int8-min-spearman loosen it, knowingly).
DEFAULT_INT8_BOUND = FidelityBound(max_abs_diff=0.1, spearman_min=0.95)
