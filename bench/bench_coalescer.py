"""Batching benchmark: concurrent small requests with and without the scheduler, against the best batch.

In process, on the real ONNX engine: N concurrent clients each send requests of 1 query x 8 documents,
either straight to `engine.score` (one engine call per request) or through `Scheduler.score` (gateway/
scheduler.py, which replaced the coalescer; the mode keeps its name `coalesced`). Printed per
level: throughput, p50/p99 latency, mean batch fill and padding waste, and throughput as a share of the
engine's best offline batch throughput on the same pairs (all pairs at once, or fixed-size chunks).

Models: the tiny test model, and a random-weight model of the real base-v2 shape (bench/configs),
built once with tests/tiny_model.build_shaped_model and prepared with `rerank-gateway export --quantize
int8`, both cached under .cache/bench-models/. The shaped model is slow on a small CPU: keep its request
counts low (the defaults do).

    python bench/bench_coalescer.py                      # tiny and base-v2 shape
    python bench/bench_coalescer.py --models tiny --clients 1,8,64 --requests-per-client 8

Targets (issue 4): at 64 clients, coalesced throughput >= 0.9x the best offline batch throughput; at 1
client, added latency (coalesced p50 - direct p50) <= max_wait_ms + 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.contract import Prompt, PromptBuilder  # noqa: E402
from engines.onnx_engine import OnnxEngine  # noqa: E402
from gateway.scheduler import Scheduler  # noqa: E402

CACHE = REPO_ROOT / ".cache" / "bench-models"
DOCS_PER_REQUEST = 8
VOCABULARY_TEXT = (
    "bread flour yeast oven crust dough salt water sugar butter milk egg knead proof bake slice toast grain "
    "rye wheat starter loaf crumb steam rack pan timer cool wrap fresh stale freezer paper search index "
    "query ranking model token batch queue latency throughput engine gateway request document relevance"
)
VOCABULARY = VOCABULARY_TEXT.split()
# Requests per client at each level for each model: the shaped model costs ~100x the tiny one per pair.
DEFAULT_REQUESTS = {"tiny": {1: 32, 8: 16, 64: 16}, "base-v2": {1: 2, 8: 1, 64: 1}}
# Offline chunk sizes tried besides "all pairs at once" (each try scores every pair once).
OFFLINE_CHUNKS = {"tiny": (64, 32, 16, 8), "base-v2": (8,)}
# Alternations of offline / direct / coalesced per level; the best of each is kept (shared, noisy CPUs).
DEFAULT_REPEATS = {"tiny": 2, "base-v2": 1}
DEFAULT_WARMUP_REQUESTS = {"tiny": 4, "base-v2": 1}


def text(seed: int, n_words: int) -> str:
    return " ".join(VOCABULARY[(seed * 13 + i * (seed % 7 + 1)) % len(VOCABULARY)] for i in range(n_words))


def build_requests(builder: PromptBuilder, n: int, *, offset: int = 0) -> list[list[Prompt]]:
    """`n` requests of one query and 8 documents of 10 to 60 words (a realistic spread of lengths)."""
    out = []
    for r in range(offset, offset + n):
        docs = [text(r * 31 + j, 10 + (r * 7 + j * 13) % 51) for j in range(DOCS_PER_REQUEST)]
        out.append(builder.build(f"how does {text(r, 3)} work?", docs))
    return out


# --- models -----------------------------------------------------------------------------------------


def _export(hf_dir: Path, out: Path) -> None:
    from gateway.cli import main

    # Both graphs; the int8 gate is opened: random weights say nothing about fidelity (bench_precision does).
    args = ["export", str(hf_dir), "--out", str(out), "--quantize", "int8", "--verify-samples", "2"]
    rc = main([*args, "--int8-max-abs-diff", "1000", "--int8-min-spearman", "-1"])
    if rc != 0:
        raise SystemExit(f"rerank-gateway export failed with exit status {rc}")


def prepared_model(name: str) -> Path:
    """A prepared (ONNX fp32 and int8) folder for `name`, built once and cached."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests import conftest, tiny_model

    if name == "tiny":
        return conftest.prepared_model(conftest.tiny_hf_model())
    shape = {"base-v2": "mxbai-rerank-base-v2"}[name]
    hf_dir = conftest.CACHE_ROOT.parent / "bench-models" / f"{shape}-random-hf"
    prepared = hf_dir.with_name(f"{shape}-random-prepared")
    if not (hf_dir / ".complete").is_file():
        print(f"building a random-weight {shape} model in {hf_dir} ...", file=sys.stderr)
        tiny_model.build_shaped_model(hf_dir, shape)
        (hf_dir / ".complete").write_text("ok\n")
    if not (prepared / ".complete").is_file():
        print(f"exporting it to ONNX in {prepared} (minutes) ...", file=sys.stderr)
        tmp = prepared.with_name(prepared.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        _export(hf_dir, tmp)
        (tmp / ".complete").write_text("ok\n")
        tmp.rename(prepared)
    return prepared


# --- measurement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    model: str
    mode: str
    clients: int
    requests: int
    pairs_per_s: float
    p50_ms: float
    p99_ms: float
    batch_fill: float
    padding: float
    calls: int
    added_ms: float | None
    offline_pairs_per_s: float = math.nan
    offline_how: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def batch_stats(calls: Sequence[Sequence[Prompt]], info) -> tuple[float, float]:
    """Mean batch fill and padding share of engine calls, measured the scheduler's way."""
    fills, paddings = [], []
    for call in calls:
        longest, tokens = max(len(p) for p in call), sum(len(p) for p in call)
        cost = longest * len(call) if info.padded else tokens
        fills.append(min(1.0, max(cost / info.max_batch_tokens, len(call) / info.max_batch_pairs)))
        paddings.append(1.0 - tokens / (longest * len(call)) if info.padded else 0.0)
    return statistics.fmean(fills), statistics.fmean(paddings)


async def run_clients(score, per_client: list[list[list[Prompt]]]) -> tuple[float, list[float]]:
    """Each client sends its requests one after another; returns (wall seconds, latencies)."""
    latencies: list[float] = []

    async def client(requests: list[list[Prompt]]) -> None:
        for prompts in requests:
            t0 = time.perf_counter()
            scored = await score(prompts)
            latencies.append(time.perf_counter() - t0)
            assert len(scored.scores) == len(prompts)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(r) for r in per_client))
    return time.perf_counter() - t0, latencies


async def best_offline(engine: OnnxEngine, prompts: list[Prompt], chunks: Sequence[int]) -> tuple[float, str]:
    """The engine's best throughput (pairs/s) on these pairs: all at once, or in fixed-size chunks."""
    best, how = 0.0, ""
    for size in (len(prompts), *(c for c in chunks if c < len(prompts))):
        t0 = time.perf_counter()
        for i in range(0, len(prompts), size):
            await engine.score(prompts[i : i + size])
        rate = len(prompts) / (time.perf_counter() - t0)
        if rate > best:
            best, how = rate, ("all at once" if size == len(prompts) else f"chunks of {size}")
    return best, how


class CountingEngine:
    """The real engine, remembering each call's prompts and duration (fill, padding, added latency)."""

    def __init__(self, inner: OnnxEngine) -> None:
        self.inner = inner
        self.calls: list[tuple[Prompt, ...]] = []
        self.call_s: list[float] = []

    @property
    def info(self):
        return self.inner.info

    async def score(self, prompts):
        self.calls.append(tuple(prompts))
        t0 = time.perf_counter()
        try:
            return await self.inner.score(prompts)
        finally:
            self.call_s.append(time.perf_counter() - t0)


def added_ms(latencies: Sequence[float], counting: CountingEngine) -> float | None:
    """Median of (request latency - its engine call), when requests and calls pair one to one."""
    if len(latencies) != len(counting.call_s):
        return None
    return statistics.median(lat - call for lat, call in zip(latencies, counting.call_s, strict=True)) * 1e3


async def run_direct(engine: OnnxEngine, per_client, info) -> Row:
    counting = CountingEngine(engine)
    wall, lat = await run_clients(counting.score, per_client)
    fill, padding = batch_stats(counting.calls, info)
    pairs = sum(len(r) for c in per_client for r in c)
    return Row("", "direct", len(per_client), sum(map(len, per_client)), pairs / wall,
               percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, fill, padding, len(counting.calls),
               added_ms(lat, counting))  # fmt: skip


async def run_coalesced(engine: OnnxEngine, per_client, info, max_wait_ms: float) -> Row:
    counting = CountingEngine(engine)
    scheduler = Scheduler(
        counting,
        budget=info.budget,
        max_wait_ms=max_wait_ms,
        max_queued_tokens=1_000_000_000,
        request_timeout_ms=3_600_000,
    )
    try:
        wall, lat = await run_clients(scheduler.score, per_client)
        stats = scheduler.stats()
    finally:
        await scheduler.close()
    pairs = sum(len(r) for c in per_client for r in c)
    return Row("", "coalesced", len(per_client), sum(map(len, per_client)), pairs / wall,
               percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3, stats["mean_batch_fill"],
               stats["mean_padding_ratio"], stats["batches"], added_ms(lat, counting))  # fmt: skip


async def bench_model(name: str, args: argparse.Namespace) -> list[Row]:
    """Per level: best offline, direct and coalesced, alternated `repeats` times (best of each kept)."""
    model_dir = prepared_model(name)
    builder = PromptBuilder.from_dir(model_dir)
    engine = OnnxEngine(
        model_dir, quantization=args.quantization, intra_op_threads=args.intra_op_threads, verify_hashes=False
    )
    await engine.start()
    info = engine.info
    rows: list[Row] = []
    repeats = args.repeats or DEFAULT_REPEATS[name]
    try:
        for prompts in build_requests(builder, DEFAULT_WARMUP_REQUESTS[name], offset=10_000):
            await engine.score(prompts)
        levels = args.clients if name == "tiny" else args.shaped_clients
        for clients in levels:
            per_request = args.requests_per_client or DEFAULT_REQUESTS[name].get(clients, 1)
            requests = build_requests(builder, clients * per_request)
            per_client = [requests[i::clients] for i in range(clients)]
            pairs = [p for r in requests for p in r]
            best: dict[str, Row] = {}
            offline, offline_how = 0.0, ""
            for _ in range(repeats):
                chunks = OFFLINE_CHUNKS[name] if args.offline_chunks is None else args.offline_chunks
                rate, how = await best_offline(engine, pairs, chunks)
                if rate > offline:
                    offline, offline_how = rate, how
                for mode in args.modes:
                    if mode == "direct":
                        row = await run_direct(engine, per_client, info)
                    else:
                        row = await run_coalesced(engine, per_client, info, args.max_wait_ms)
                    if row.mode not in best or row.pairs_per_s > best[row.mode].pairs_per_s:
                        best[row.mode] = row
            for mode in args.modes:
                rows.append(
                    dataclasses.replace(
                        best[mode], model=name, offline_pairs_per_s=offline, offline_how=offline_how
                    )
                )
    finally:
        await engine.close()
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (
        f"{'model':<8} {'mode':<10} {'clients':>7} {'reqs':>5} {'calls':>6} {'pairs/s':>9} {'offline':>8} "
        f"{'x best':>7} {'p50 ms':>9} {'p99 ms':>9} {'added':>7} {'fill':>6} {'padding':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        share = r.pairs_per_s / r.offline_pairs_per_s
        added = "-" if r.added_ms is None else f"{r.added_ms:.2f}"
        lines.append(
            f"{r.model:<8} {r.mode:<10} {r.clients:>7} {r.requests:>5} {r.calls:>6} {r.pairs_per_s:>9.1f} "
            f"{r.offline_pairs_per_s:>8.1f} {share:>7.2f} {r.p50_ms:>9.1f} {r.p99_ms:>9.1f} {added:>7} "
            f"{r.batch_fill:>6.2f} {r.padding:>8.2f}"
        )
    return "\n".join(lines)


def targets(rows: list[Row], max_wait_ms: float) -> list[str]:
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        by = {(r.mode, r.clients): r for r in rows if r.model == model}
        if ("coalesced", 64) in by:
            row = by["coalesced", 64]
            share = row.pairs_per_s / row.offline_pairs_per_s
            verdict = "met" if share >= 0.9 else "NOT met"
            out.append(
                f"{model}: 64 clients coalesced = {share:.2f}x best offline "
                f"({row.offline_how}) (target >= 0.9): {verdict}"
            )
        if ("coalesced", 1) in by and by["coalesced", 1].added_ms is not None:
            added = by["coalesced", 1].added_ms
            verdict = "met" if added <= max_wait_ms + 2 else "NOT met"
            out.append(
                f"{model}: 1 client added latency (median of request - its engine call) = {added:.2f} ms "
                f"(target <= max_wait_ms + 2 = {max_wait_ms + 2:.1f} ms): {verdict}"
            )
    return out


def levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,base-v2", help="Comma separated: tiny, base-v2.")
    parser.add_argument("--clients", default="1,8,64", type=levels, help="Concurrency levels (tiny model).")
    parser.add_argument(
        "--shaped-clients",
        default="1,8",
        type=levels,
        help="Levels for the base-v2 shape (64 clients = 512 pairs: tens of minutes per mode on 2 cores).",
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=None, help="Override the per-model defaults."
    )
    parser.add_argument(
        "--modes",
        default="direct,coalesced",
        type=lambda t: [m for m in ("direct", "coalesced") if m in t.split(",")],
        help="Which paths to measure (the offline best is always measured).",
    )
    parser.add_argument(
        "--offline-chunks",
        default=None,
        type=levels,
        help="Chunk sizes tried offline besides all-at-once (default per model; empty: all at once only).",
    )
    parser.add_argument("--repeats", type=int, default=None, help="Override the per-model repeats.")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--quantization", default="fp32", choices=("fp32", "int8"))
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="onnxruntime threads (0: one per core, the default)."
    )
    parser.add_argument("--build-only", action="store_true", help="Build and prepare the models, then stop.")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in DEFAULT_REQUESTS:
            parser.error(f"unknown model {m!r}: choose tiny or base-v2")
    if args.build_only:
        for m in models:
            print(prepared_model(m))
        return 0
    rows: list[Row] = []
    for m in models:
        rows += asyncio.run(bench_model(m, args))
    print(
        f"batching benchmark: {os.cpu_count()} CPUs, onnx {args.quantization}, "
        f"intra_op_threads={args.intra_op_threads}, max_wait_ms={args.max_wait_ms}"
    )
    print(f"{DOCS_PER_REQUEST} documents per request; direct = one engine call per request")
    print("offline = the engine's best batch throughput on the same pairs (all at once or fixed chunks); ")
    print("added = median of (request latency - its engine call); fill and padding of the engine calls")
    print(format_rows(rows))
    print()
    print("\n".join(targets(rows, args.max_wait_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
