"""PNG plots of benchmark results: latency percentiles and throughput against concurrency.

Several result files (say onnx vs vllm, or before vs after a change) can share one figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt

Run = tuple[str, dict[str, Any]]  # (label, results document)
_PERCENTILES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def _levels(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(results["levels"], key=lambda lv: lv["concurrency"])


def _style_concurrency_axis(ax: Any, runs: Sequence[Run]) -> None:
    levels = sorted({lv["concurrency"] for _, r in runs for lv in r["levels"]})
    if len(levels) > 1 and levels[-1] / max(levels[0], 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.grid(True, which="both", alpha=0.3)


def plot_latency(runs: Sequence[Run], path: str | Path) -> Path:
    """Latency p50/p90/p99 (ms) against concurrency, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for color, (label, results) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs, strict=False):
        levels = [lv for lv in _levels(results) if lv["latency_ms"]]
        xs = [lv["concurrency"] for lv in levels]
        for pct, style in _PERCENTILES:
            ax.plot(
                xs,
                [lv["latency_ms"][pct] for lv in levels],
                style,
                marker="o",
                color=color,
                label=f"{label} {pct}",
            )
    ax.set_ylabel("latency (ms)")
    ax.set_title("Rerank latency vs concurrency")
    _style_concurrency_axis(ax, runs)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput(runs: Sequence[Run], path: str | Path) -> Path:
    """Requests/s and (query, document) pairs/s against concurrency."""
    fig, (ax_req, ax_pairs) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=110)
    for label, results in runs:
        levels = _levels(results)
        xs = [lv["concurrency"] for lv in levels]
        ax_req.plot(xs, [lv["throughput_rps"] for lv in levels], marker="o", label=label)
        ax_pairs.plot(xs, [lv["pairs_per_s"] for lv in levels], marker="o", label=label)
    ax_req.set_ylabel("requests / s")
    ax_req.set_title("Throughput (requests)")
    ax_pairs.set_ylabel("pairs / s")
    ax_pairs.set_title("Throughput (query-document pairs)")
    for ax in (ax_req, ax_pairs):
        _style_concurrency_axis(ax, runs)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_plots(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """latency_vs_concurrency.png and throughput.png in `out_dir`."""
    out = Path(out_dir)
    return [
        plot_latency(runs, out / "latency_vs_concurrency.png"),
        plot_throughput(runs, out / "throughput.png"),
    ]
