"""Async benchmark client: rerank requests from a workload at several concurrency levels.

Per level it reports throughput (requests/s, pairs/s), latency percentiles, errors by kind, nDCG@10 when
the workload carries relevance labels, and optionally what the gateway's `/metrics` say happened inside
(mean batch size and tokens, padding, queue and inference time, queue depth, fallbacks, dropped requests).
Every response is checked (status, shape, order, indices), so a fast wrong answer counts as an error.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx

from bench.beir_workload import Workload, WorkloadItem

RESULTS_FORMAT = "rerank-bench/v1"
Dialect = Literal["cohere", "cohere-v2", "jina", "tei"]
DIALECTS: tuple[str, ...] = ("cohere", "cohere-v2", "jina", "tei")
# The Cohere SDKs name themselves in this header; on /v1/rerank the gateway then answers in Cohere's shape.
COHERE_SDK_HEADERS = {"X-Fern-SDK-Name": "cohere"}


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says what to change."""


class BadResponse(Exception):
    """A 200 answer whose body breaks the rerank contract."""


@dataclass(frozen=True)
class BenchConfig:
    """What to send, how hard, and where."""

    url: str
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 200
    batch_size: int | None = None
    dialect: Dialect = "cohere"
    top_n: int | None = None
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    warmup_requests: int = 4
    poll_metrics: bool = False
    metrics_interval_s: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class PlannedRequest:
    """One request to send: a query, its documents, and their relevance labels when known."""

    query: str
    documents: tuple[str, ...]
    relevance: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened to one request."""

    latency_s: float
    pairs: int
    error: str | None = None
    ndcg_at_10: float | None = None


@dataclass(frozen=True)
class LevelResult:
    """Figures for one concurrency level."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    throughput_rps: float
    pairs_per_s: float
    latency_ms: dict[str, float]
    ndcg_at_10: float | None
    gateway_metrics: dict[str, Any] | None = field(default=None)


# --- planning ------------------------------------------------------------------------------------------


def plan_requests(
    workload: Workload, count: int, batch_size: int | None, seed: int = 0
) -> list[PlannedRequest]:
    """`count` requests cycling through the workload's queries.

    With `batch_size`, each request carries exactly that many documents: a query's own candidates first
    (keeping their labels), topped up with other queries' documents (labelled 0) when it has fewer.
    """
    if count < 1:
        raise BenchError("--requests must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise BenchError("--batch-size must be at least 1")
    rng = random.Random(seed)
    spare = list(dict.fromkeys(d for it in workload.items for d in it.documents))
    plans = []
    for i in range(count):
        item: WorkloadItem = workload.items[i % len(workload.items)]
        docs = list(item.documents)
        labels = list(item.relevance) if item.relevance is not None else None
        if batch_size is not None:
            docs = docs[:batch_size]
            labels = labels[:batch_size] if labels is not None else None
            need = batch_size - len(docs)
            if need > 0:
                own = set(docs)
                sample = rng.sample(spare, min(len(spare), need + len(own)))
                extra = [d for d in sample if d not in own][:need]
                # A workload smaller than the batch repeats documents, as a client with duplicates would.
                extra += [spare[rng.randrange(len(spare))] for _ in range(need - len(extra))]
                docs += extra
                if labels is not None:
                    labels += [0] * len(extra)
        plans.append(PlannedRequest(item.query, tuple(docs), tuple(labels) if labels is not None else None))
    return plans


# --- one request -----------------------------------------------------------------------------------------


def request_for(
    dialect: Dialect, plan: PlannedRequest, top_n: int | None, model: str | None
) -> tuple[str, dict, dict[str, str]]:
    """The route, JSON body and extra headers for `plan` in `dialect`."""
    if dialect == "tei":
        return "/rerank", {"query": plan.query, "texts": list(plan.documents), "return_text": False}, {}
    body: dict[str, Any] = {"query": plan.query, "documents": list(plan.documents)}
    if model:
        body["model"] = model
    if top_n is not None:
        body["top_n"] = top_n
    if dialect == "jina":
        body["return_documents"] = False
        return "/v1/rerank", body, {}
    if dialect == "cohere-v2":
        return "/v2/rerank", body, {}
    return "/v1/rerank", body, COHERE_SDK_HEADERS


def ranking_from(dialect: Dialect, plan: PlannedRequest, top_n: int | None, payload: Any) -> list[int]:
    """The document indices of a response, best first; raises BadResponse when it breaks the contract."""
    rows = payload if dialect == "tei" else (payload.get("results") if isinstance(payload, dict) else None)
    if not isinstance(rows, list):
        raise BadResponse("no result list")
    score_key = "score" if dialect == "tei" else "relevance_score"
    n = len(plan.documents)
    expected = n if (top_n is None or dialect == "tei") else min(top_n, n)
    if len(rows) != expected:
        raise BadResponse(f"{len(rows)} results for {n} documents (top_n={top_n})")
    indices, scores = [], []
    for row in rows:
        if not isinstance(row, dict):
            raise BadResponse("a result is not an object")
        index, score = row.get("index"), row.get(score_key)
        if not isinstance(index, int) or not 0 <= index < n:
            raise BadResponse(f"index {index!r} out of range")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise BadResponse(f"{score_key} {score!r} is not a finite number")
        indices.append(index)
        scores.append(float(score))
    if len(set(indices)) != len(indices):
        raise BadResponse("an index appears twice")
    if any(a < b for a, b in itertools.pairwise(scores)):
        raise BadResponse("results are not sorted by score")
    return indices


def ndcg_at_10(ranking: Sequence[int], relevance: Sequence[int]) -> float | None:
    """nDCG@10 of `ranking` (indices best first) under graded `relevance`; None when nothing is relevant."""
    ideal = sorted(relevance, reverse=True)[:10]
    idcg = sum((2**r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    if idcg <= 0:
        return None
    dcg = sum((2 ** relevance[d] - 1) / math.log2(i + 2) for i, d in enumerate(ranking[:10]))
    return dcg / idcg


async def send_one(client: httpx.AsyncClient, config: BenchConfig, plan: PlannedRequest) -> Outcome:
    """Send one request and judge its answer."""
    path, body, headers = request_for(config.dialect, plan, config.top_n, config.model)
    start_s = time.perf_counter()
    try:
        response = await client.post(path, json=body, headers=headers)
        payload = response.json() if response.status_code == 200 else None
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - start_s, len(plan.documents), error=type(exc).__name__)
    except json.JSONDecodeError:
        return Outcome(time.perf_counter() - start_s, len(plan.documents), error="bad_response")
    latency_s = time.perf_counter() - start_s
    if response.status_code != 200:
        return Outcome(latency_s, len(plan.documents), error=f"http_{response.status_code}")
    try:
        ranking = ranking_from(config.dialect, plan, config.top_n, payload)
    except BadResponse:
        return Outcome(latency_s, len(plan.documents), error="bad_response")
    quality = ndcg_at_10(ranking, plan.relevance) if plan.relevance is not None else None
    return Outcome(latency_s, len(plan.documents), ndcg_at_10=quality)


# --- /metrics ----------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text exposition -> {sample name: {sorted label pairs: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _total(snapshot: dict, name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in snapshot.get(name, {}).items()
        if all(dict(labels).get(k) == m for k, m in match.items())
    )


def _by_label(snapshot: dict, name: str, label: str, skip: dict[str, str] | None = None) -> dict[str, float]:
    out: dict[str, float] = Counter()
    for labels, v in snapshot.get(name, {}).items():
        as_dict = dict(labels)
        if skip and any(as_dict.get(k) == s for k, s in skip.items()):
            continue
        out[as_dict.get(label, "")] += v
    return dict(out)


def metrics_delta(before: dict, after: dict, depth_samples: Sequence[float]) -> dict[str, Any]:
    """What the gateway did between two scrapes: means of its batch histograms, counter increases."""

    def mean(hist: str) -> float | None:
        count = _total(after, f"{hist}_count") - _total(before, f"{hist}_count")
        total = _total(after, f"{hist}_sum") - _total(before, f"{hist}_sum")
        return round(total / count, 6) if count > 0 else None

    def increase(name: str, label: str, skip: dict[str, str] | None = None) -> dict[str, float]:
        a, b = _by_label(after, name, label, skip), _by_label(before, name, label, skip)
        return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) > 0}

    batches = _total(after, "rerank_batch_size_pairs_count") - _total(before, "rerank_batch_size_pairs_count")
    buckets = {}
    for labels, v in after.get("rerank_batch_size_pairs_bucket", {}).items():
        le = dict(labels).get("le", "")
        buckets[le] = (
            buckets.get(le, 0.0) + v - before.get("rerank_batch_size_pairs_bucket", {}).get(labels, 0.0)
        )
    return {
        "batches": batches,
        "batch_size_mean_pairs": mean("rerank_batch_size_pairs"),
        "batch_size_buckets": buckets,
        "batch_tokens_mean": mean("rerank_batch_tokens"),
        "padding_ratio_mean": mean("rerank_batch_padding_ratio"),
        "queue_wait_mean_s": mean("rerank_queue_duration_seconds"),
        "inference_mean_s": mean("rerank_inference_duration_seconds"),
        "queue_depth_max_pairs": max(depth_samples, default=None),
        "queue_depth_mean_pairs": round(sum(depth_samples) / len(depth_samples), 3)
        if depth_samples
        else None,
        "fallbacks": increase("rerank_fallbacks_total", "reason"),
        "dropped": increase("rerank_dropped_requests_total", "reason"),
        # Rerank requests only: the /metrics polls themselves are dialect "other".
        "requests_by_status": increase("rerank_requests_total", "status", {"dialect": "other"}),
    }


async def scrape(client: httpx.AsyncClient) -> dict:
    response = await client.get("/metrics")
    if response.status_code != 200:
        raise BenchError(f"GET /metrics answered {response.status_code}; pass --api-key if it is protected")
    return parse_metrics(response.text)


# --- levels ---------------------------------------------------------------------------------------------


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds (linear interpolation between ranks)."""
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    out = {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}
    out["mean"] = sum(ordered) / len(ordered)
    out["max"] = ordered[-1]
    return {k: round(v * 1000, 3) for k, v in out.items()}


async def run_level(
    client: httpx.AsyncClient,
    config: BenchConfig,
    plans: Sequence[PlannedRequest],
    concurrency: int,
    *,
    progress: bool = True,
) -> LevelResult:
    """Send every plan with `concurrency` requests in flight at a time."""
    from tqdm.auto import tqdm

    outcomes: list[Outcome] = []
    next_index = 0
    bar = tqdm(total=len(plans), desc=f"concurrency {concurrency}", unit="req", disable=not progress)
    depth: list[float] = []
    before = await scrape(client) if config.poll_metrics else None

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(plans):
            plan = plans[next_index]
            next_index += 1
            outcomes.append(await send_one(client, config, plan))
            bar.update(1)

    async def poll_depth() -> None:
        while True:
            await asyncio.sleep(config.metrics_interval_s)
            snapshot = await scrape(client)
            depth.append(_total(snapshot, "rerank_queue_depth_pairs"))

    poller = asyncio.create_task(poll_depth()) if config.poll_metrics else None
    start_s = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall_s = time.perf_counter() - start_s
        bar.close()
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    gateway = metrics_delta(before, await scrape(client), depth) if before is not None else None

    good = [o for o in outcomes if o.error is None]
    quality = [o.ndcg_at_10 for o in good if o.ndcg_at_10 is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(outcomes),
        ok=len(good),
        errors=len(outcomes) - len(good),
        error_kinds=dict(Counter(o.error for o in outcomes if o.error is not None)),
        wall_s=round(wall_s, 4),
        throughput_rps=round(len(good) / wall_s, 3) if wall_s > 0 else 0.0,
        pairs_per_s=round(sum(o.pairs for o in good) / wall_s, 3) if wall_s > 0 else 0.0,
        latency_ms=percentiles_ms([o.latency_s for o in good]),
        ndcg_at_10=round(sum(quality) / len(quality), 4) if quality else None,
        gateway_metrics=gateway,
    )


async def run_benchmark(config: BenchConfig, workload: Workload, *, progress: bool = True) -> dict[str, Any]:
    """Warm up, then run every concurrency level; the results document (`rerank-bench/v1`)."""
    if not config.concurrency or min(config.concurrency) < 1:
        raise BenchError("--concurrency needs one or more levels of at least 1, e.g. 1,8,32")
    plans = plan_requests(workload, config.requests, config.batch_size, config.seed)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(
        max_connections=max(config.concurrency), max_keepalive_connections=max(config.concurrency)
    )
    async with httpx.AsyncClient(
        base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s, limits=limits
    ) as client:
        try:
            await client.get("/health")
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach the gateway at {config.url}: {exc}") from exc
        for plan in plans[: config.warmup_requests]:
            await send_one(client, config, plan)
        levels = [
            await run_level(client, config, plans, c, progress=progress)
            for c in sorted(set(config.concurrency))
        ]
    return {
        "format": RESULTS_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": config.url,
        "workload": {"name": workload.name, "queries": len(workload.items)},
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "levels": [asdict(level) for level in levels],
    }


def format_table(results: dict[str, Any]) -> str:
    """The levels as a plain-text table."""
    header = (
        f"{'conc':>5} {'req/s':>9} {'pairs/s':>10} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
        f"{'errors':>7} {'batch':>7} {'nDCG@10':>8}"
    )
    lines = [header, "-" * len(header)]
    for lv in results["levels"]:
        lat = lv["latency_ms"] or {}
        batch = (lv.get("gateway_metrics") or {}).get("batch_size_mean_pairs")
        batch_text = "-" if batch is None else f"{batch:.1f}"
        ndcg_text = "-" if lv["ndcg_at_10"] is None else f"{lv['ndcg_at_10']:.3f}"
        lines.append(
            f"{lv['concurrency']:>5} {lv['throughput_rps']:>9.2f} {lv['pairs_per_s']:>10.1f} "
            f"{lat.get('p50', float('nan')):>9.1f} {lat.get('p90', float('nan')):>9.1f} "
            f"{lat.get('p99', float('nan')):>9.1f} {lv['errors']:>7} "
            f"{batch_text:>7} {ndcg_text:>8}"
        )
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path
