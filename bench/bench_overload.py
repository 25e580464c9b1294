"""Overload benchmark: the figures of issue 12's "What must hold", on the tiny test model.

The real server (`rerank-gateway serve`, its own process, ONNX fp32 on the tiny prepared model of
tests/conftest.py) is driven by a small raw-HTTP/1.1 asyncio client (pre-encoded requests, keep-alive
connections) so the load generator costs little CPU next to the server.

1. Capacity: 16 closed-loop clients, 1 query x 8 documents per request; the engine's pairs/s (from
   /metrics: rerank_batch_size_pairs_sum) is the capacity.
2. Overload: open-loop arrivals at 10x that request rate for 30 s. Printed: the engine's pairs/s during
   the overload as % of capacity, the 429s' latency p50/p99, /health (every 100 ms) and /metrics (every 1 s)
   latency p99, the server's RSS (baseline, peak, after), and the time from the end of the load to the first
   200 of a normal request.
3. Abandonment (a second server, admitting 1,000 requests and 10 M queued tokens, so that all get in):
   400 requests queued behind a held engine, then every client leaves; printed: queued pairs and tokens
   before, how long until the queue is empty (vs. one engine batch), RSS before/after.
4. Fairness (same server): one request of 1,000 documents of ~6,000 tokens, then 1 s later a 2-document
   request; printed: the small request's latency, in its own batch times.

    python bench/bench_overload.py [--overload-s 30] [--factor 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DOCS_PER_REQUEST = 8
CAPACITY_CLIENTS = 16
MAX_CLIENT_CONNECTIONS = 600
VOCABULARY = [
    "bread",
    "flour",
    "yeast",
    "oven",
    "crust",
    "dough",
    "salt",
    "water",
    "sugar",
    "butter",
    "milk",
    "egg",
    "knead",
    "proof",
    "bake",
    "slice",
    "toast",
    "grain",
    "rye",
    "wheat",
    "starter",
    "loaf",
    "crumb",
    "steam",
    "rack",
    "pan",
    "timer",
    "cool",
    "wrap",
    "fresh",
    "stale",
    "freezer",
    "paper",
    "search",
    "index",
]


def text(seed: int, n_words: int) -> str:
    return " ".join(VOCABULARY[(seed * 13 + i * (seed % 7 + 1)) % len(VOCABULARY)] for i in range(n_words))


def rerank_request(seed: int, n_docs: int = DOCS_PER_REQUEST, words: int = 12) -> bytes:
    body = json.dumps(
        {
            "query": f"question {seed} {text(seed, 4)}",
            "documents": [text(seed * 31 + j, words) for j in range(n_docs)],
        }
    ).encode()
    head = (
        "POST /v1/rerank HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


GET_HEALTH = b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n"
GET_METRICS = b"GET /metrics HTTP/1.1\r\nhost: bench\r\n\r\n"


class Conn:
    """One keep-alive HTTP/1.1 connection; `request` sends pre-encoded bytes and reads one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.alive = True

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        match = re.search(rb"content-length: *(\d+)", lower)
        body = await self.reader.readexactly(int(match.group(1))) if match else b""
        if b"connection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        self.alive = False
        self.writer.close()

    def abort(self) -> None:
        self.alive = False
        self.writer.transport.abort()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Server:
    port: int
    process: subprocess.Popen
    log_path: Path

    async def metrics(self) -> dict[str, float]:
        conn = await Conn.open(self.port)
        try:
            _, body = await conn.request(GET_METRICS)
        finally:
            conn.close()
        values: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def metric(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix))


@contextlib.contextmanager
def serve(model_dir: Path, work: Path, env: dict[str, str]) -> Iterator[Server]:
    from tests.conftest import free_port

    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    child_env.update(
        PYTHONPATH=str(REPO_ROOT),
        RERANK_MODEL_PATH=str(model_dir),
        RERANK_CACHE_DIR=str(work / "cache"),
        RERANK_ONNX_INTRA_OP_THREADS="1",
        RERANK_LOG_LEVEL="warning",  # no access log line per request
        HF_HUB_OFFLINE="1",
        **env,
    )
    log_path = work / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=child_env,
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(port, process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


# --- 1. capacity -----------------------------------------------------------------------------------------


async def capacity(server: Server, seconds: float) -> tuple[float, float]:
    """(engine pairs/s, requests/s) with CAPACITY_CLIENTS closed-loop clients."""
    requests = [rerank_request(seed) for seed in range(256)]
    stop = time.monotonic() + seconds
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        conn = await Conn.open(server.port)
        k = i
        while time.monotonic() < stop:
            status, _ = await conn.request(requests[k % len(requests)])
            if status == 429:  # a closed loop at capacity may touch the queue's time bound: back off
                await asyncio.sleep(0.05)
                continue
            assert status == 200, status
            done += 1
            k += CAPACITY_CLIENTS
        conn.close()

    before = await server.metrics()
    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(CAPACITY_CLIENTS)))
    elapsed = time.monotonic() - t0
    after = await server.metrics()
    pairs = metric(after, "rerank_batch_size_pairs_sum") - metric(before, "rerank_batch_size_pairs_sum")
    return pairs / elapsed, done / elapsed


# --- 2. overload -----------------------------------------------------------------------------------------


@dataclass
class Overload:
    sent: int = 0
    unsent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    rejected_ms: list[float] = field(default_factory=list)
    ok_ms: list[float] = field(default_factory=list)
    errors: int = 0
    health_ms: list[float] = field(default_factory=list)
    metrics_ms: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    # Server side: rerank_request_duration_seconds{dialect="other"} over the overload (the 429s, which never
    # reach a route, plus the probes): the bucket bounds holding the 50th and 99th percentiles.
    server_other_s: tuple[float, float] = (math.nan, math.nan)


async def overload(server: Server, rate: float, seconds: float) -> tuple[Overload, float, float]:
    """Open-loop arrivals at `rate` requests/s for `seconds`; (results, engine pairs/s, first-200 delay s)."""
    out = Overload()
    requests = [rerank_request(1000 + seed) for seed in range(512)]
    free: list[Conn] = []
    opened = 0
    tasks: set[asyncio.Task] = set()
    running = True

    async def one(raw: bytes) -> None:
        nonlocal opened
        if free:
            conn = free.pop()
        elif opened < MAX_CLIENT_CONNECTIONS:
            opened += 1
            try:
                conn = await Conn.open(server.port)
            except OSError:
                opened -= 1
                out.errors += 1
                return
        else:
            out.unsent += 1  # the client is out of connections: every one waits on an answer
            return
        out.sent += 1
        t0 = time.perf_counter()
        try:
            status, _ = await conn.request(raw)
        except (OSError, asyncio.IncompleteReadError):
            out.errors += 1
            opened -= 1
            return
        ms = (time.perf_counter() - t0) * 1000
        out.statuses[status] = out.statuses.get(status, 0) + 1
        (out.rejected_ms if status == 429 else out.ok_ms if status == 200 else []).append(ms)
        if conn.alive:
            free.append(conn)
        else:
            opened -= 1

    async def probe(raw: bytes, interval_s: float, into: list[float]) -> None:
        conn = await Conn.open(server.port)
        while running:
            t0 = time.perf_counter()
            status, _ = await conn.request(raw)
            into.append((time.perf_counter() - t0) * 1000)
            assert status == 200, status
            await asyncio.sleep(interval_s)
        conn.close()

    async def sample_rss() -> None:
        while running:
            out.rss.append(rss_mb(server.process.pid))
            await asyncio.sleep(0.5)

    probes = [
        asyncio.create_task(probe(GET_HEALTH, 0.1, out.health_ms)),
        asyncio.create_task(probe(GET_METRICS, 1.0, out.metrics_ms)),
        asyncio.create_task(sample_rss()),
    ]
    before = await server.metrics()
    start = time.monotonic()
    k = 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) * rate) + 1
        while k < due:
            task = asyncio.create_task(one(requests[k % len(requests)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    after = await server.metrics()
    stopped = time.monotonic()
    # The first normal request after the load stops, on a fresh connection, until it gets a 200.
    first_200_s = math.nan
    while time.monotonic() - stopped < 30:
        conn = await Conn.open(server.port)
        status, _ = await conn.request(rerank_request(99_999))
        conn.close()
        if status == 200:
            first_200_s = time.monotonic() - stopped
            break
        await asyncio.sleep(0.02)
    running = False
    await asyncio.gather(*probes)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in free:
        conn.close()
    pairs = metric(after, "rerank_batch_size_pairs_sum") - metric(before, "rerank_batch_size_pairs_sum")
    out.server_other_s = (bucket_quantile(before, after, 0.5), bucket_quantile(before, after, 0.99))
    return out, pairs / elapsed, first_200_s


def bucket_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile `q` of the non-rerank requests in between."""
    buckets = []
    for name, value in after.items():
        match = re.fullmatch(r'rerank_request_duration_seconds_bucket\{dialect="other",le="([^"]+)"\}', name)
        if match:
            buckets.append((float(match.group(1)), value - before.get(name, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return math.nan


# --- 3. abandonment ---------------------------------------------------------------------------------------


async def abandonment(server: Server, n: int) -> dict[str, float]:
    """`n` requests queued, then every client leaves; how fast the queue and memory follow."""
    # Long documents (~500 tokens each) keep the engine slower than the arrivals, so the queue builds up.
    held = [rerank_request(5000 + i, n_docs=8, words=400) for i in range(n)]
    baseline_rss = rss_mb(server.process.pid)
    conns = await asyncio.gather(*(Conn.open(server.port) for _ in range(n)))
    for conn, raw in zip(conns, held, strict=True):
        conn.writer.write(raw)
    peak = {"pairs": 0.0, "tokens": 0.0}
    grown_at = time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        values = await server.metrics()
        pairs = metric(values, "rerank_queue_depth_pairs")
        tokens = metric(values, "rerank_queue_depth_tokens")
        if pairs > peak["pairs"]:
            peak, grown_at = {"pairs": pairs, "tokens": tokens}, time.monotonic()
        elif pairs and time.monotonic() - grown_at > 1.0:
            break  # every request is queued (or scored): the queue grows no more
        await asyncio.sleep(0.05)
    rss_queued = rss_mb(server.process.pid)
    left_at = time.monotonic()
    for conn in conns:
        conn.abort()
    empty_s = math.nan
    while time.monotonic() - left_at < 60:
        values = await server.metrics()
        if (
            metric(values, "rerank_queue_depth_pairs") == 0
            and metric(values, "rerank_queue_depth_tokens") == 0
        ):
            empty_s = time.monotonic() - left_at
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)
    values = await server.metrics()
    batch_s = metric(values, "rerank_inference_duration_seconds_sum") / max(
        1.0, metric(values, "rerank_inference_duration_seconds_count")
    )
    return {
        "queued_pairs": peak["pairs"],
        "queued_tokens": peak["tokens"],
        "empty_s": empty_s,
        "batch_s": batch_s,
        "rss_baseline": baseline_rss,
        "rss_queued": rss_queued,
        "rss_after": rss_mb(server.process.pid),
    }


# --- 4. fairness -------------------------------------------------------------------------------------------


async def fairness(server: Server, model_dir: Path, huge_docs: int, huge_tokens: int) -> dict[str, float]:
    from core.contract import PromptBuilder

    builder = PromptBuilder.from_dir(model_dir)
    words = huge_tokens
    probe = builder.build("q", [text(1, words)])[0]
    words = max(1, int(words * huge_tokens / len(probe)))
    docs = [text(7000 + j, words) + f" {j}" for j in range(huge_docs)]
    prompt_tokens = len(builder.build("huge query", docs[:1])[0])
    body = json.dumps({"query": "huge query", "documents": docs}).encode()
    raw = (
        "POST /v1/rerank HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    big = await Conn.open(server.port)
    before = await server.metrics()
    big.writer.write(raw)
    # The small request is sent once the huge one is queued (its tokenization done), plus 1 s.
    t0 = time.monotonic()
    while metric(await server.metrics(), "rerank_queue_depth_pairs") < huge_docs / 2:
        assert time.monotonic() - t0 < 300, "the huge request was never queued"
        await asyncio.sleep(0.05)
    queued_after_s = time.monotonic() - t0
    await asyncio.sleep(1.0)
    small = await Conn.open(server.port)
    s0 = time.perf_counter()
    status, _ = await small.request(rerank_request(42, n_docs=2))
    small_s = time.perf_counter() - s0
    small.close()
    after = await server.metrics()
    big.abort()  # the huge request would run for minutes: its client leaves, its entries leave the queue
    batches = metric(after, "rerank_inference_duration_seconds_count") - metric(
        before, "rerank_inference_duration_seconds_count"
    )
    seconds = metric(after, "rerank_inference_duration_seconds_sum") - metric(
        before, "rerank_inference_duration_seconds_sum"
    )
    while metric(await server.metrics(), "rerank_queue_depth_pairs") > 0:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.05)
    return {
        "small_status": status,
        "small_s": small_s,
        "queued_after_s": queued_after_s,
        "prompt_tokens": prompt_tokens,
        "huge_batch_s": seconds / max(1.0, batches),
        "batches": batches,
    }


async def small_batch_time(server: Server) -> float:
    """The mean engine time of a lone 2-document request (idle server)."""
    conn = await Conn.open(server.port)
    before = await server.metrics()
    for seed in range(20):
        await conn.request(rerank_request(800 + seed, n_docs=2))
    after = await server.metrics()
    conn.close()
    count = metric(after, "rerank_inference_duration_seconds_count") - metric(
        before, "rerank_inference_duration_seconds_count"
    )
    total = metric(after, "rerank_inference_duration_seconds_sum") - metric(
        before, "rerank_inference_duration_seconds_sum"
    )
    return total / max(1.0, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--abandoned", type=int, default=400)
    parser.add_argument("--huge-docs", type=int, default=1000)
    parser.add_argument("--huge-tokens", type=int, default=6000)
    parser.add_argument("--skip", default="", help="Comma separated phases to skip: overload, abandon, fair.")
    args = parser.parse_args()
    skip = set(args.skip.split(","))

    from tests.conftest import prepared_model, tiny_hf_model

    model_dir = prepared_model(tiny_hf_model())
    print(f"overload benchmark: {os.cpu_count()} CPUs, tiny model, onnx fp32, 1 intra-op thread", flush=True)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (shared CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "overload" not in skip:
            with serve(model_dir, work, {}) as server:
                pairs_s, requests_s = asyncio.run(capacity(server, args.capacity_s))
                print(f"capacity: {pairs_s:.0f} pairs/s ({requests_s:.1f} requests/s of {DOCS_PER_REQUEST})")
                rate = args.factor * requests_s
                rss_before = rss_mb(server.process.pid)
                out, during, first_200_s = asyncio.run(overload(server, rate, args.overload_s))
                rss_after = rss_mb(server.process.pid)
                statuses = dict(sorted(out.statuses.items()))
                print(
                    f"overload {args.factor:.0f}x: {rate:.0f} requests/s for {args.overload_s:.0f} s, "
                    f"{out.sent} sent, {out.unsent} not sent (no free client connection), "
                    f"{out.errors} connection errors; statuses {statuses}"
                )
                share = 100 * during / pairs_s
                print(f"  engine during overload: {during:.0f} pairs/s = {share:.0f} % of capacity")
                rej50, rej99 = percentile(out.rejected_ms, 50), percentile(out.rejected_ms, 99)
                ok50, ok99 = percentile(out.ok_ms, 50), percentile(out.ok_ms, 99)
                print(
                    f"  429: p50 {rej50:.1f} ms, p99 {rej99:.1f} ms; 200: p50 {ok50:.0f}, p99 {ok99:.0f} ms"
                )
                server50, server99 = (x * 1000 for x in out.server_other_s)
                print(
                    f"  server side (429s and probes, from rerank_request_duration_seconds buckets): "
                    f"p50 <= {server50:g} ms, p99 <= {server99:g} ms"
                )
                health99, metrics99 = percentile(out.health_ms, 99), percentile(out.metrics_ms, 99)
                print(
                    f"  /health p99 {health99:.1f} ms (max {max(out.health_ms):.1f}, {len(out.health_ms)} "
                    f"probes); /metrics p99 {metrics99:.1f} ms"
                )
                print(
                    f"  RSS: {rss_before:.0f} MB before, peak {max(out.rss):.0f} MB, {rss_after:.0f} MB "
                    f"after; first 200 {first_200_s:.2f} s after the load stopped"
                )
        if not {"abandon", "fair"} <= skip:
            env = {
                "RERANK_MAX_ACTIVE_REQUESTS": "2000",
                "RERANK_MAX_QUEUED_TOKENS": "100000000",
                "RERANK_MAX_BODY_BYTES": "200000000",
                # The huge request queues about an hour of work: admitted here on purpose.
                "RERANK_REQUEST_TIMEOUT_MS": "3600000",
                "RERANK_MAX_QUEUE_DELAY_MS": "3600000",
            }
            with serve(model_dir, work, env) as server:
                if "abandon" not in skip:
                    a = asyncio.run(abandonment(server, args.abandoned))
                    empty_ms, batch_ms = a["empty_s"] * 1000, a["batch_s"] * 1000
                    print(
                        f"abandonment: {args.abandoned} requests, at most {a['queued_pairs']:.0f} pairs / "
                        f"{a['queued_tokens']:.0f} tokens queued; after the clients left the queue was "
                        f"empty in {empty_ms:.0f} ms (one engine batch: {batch_ms:.0f} ms); RSS "
                        f"{a['rss_baseline']:.0f} MB before, {a['rss_queued']:.0f} MB queued, "
                        f"{a['rss_after']:.0f} MB after"
                    )
                if "fair" not in skip:
                    alone_s = asyncio.run(small_batch_time(server))
                    f = asyncio.run(fairness(server, model_dir, args.huge_docs, args.huge_tokens))
                    shape = f"{args.huge_docs} x {f['prompt_tokens']}-token prompts"
                    huge_ms = f["huge_batch_s"] * 1000
                    print(
                        f"fairness: a 2-document request 1 s after {shape} were queued "
                        f"({f['queued_after_s']:.1f} s to tokenize): {f['small_status']} in "
                        f"{f['small_s'] * 1000:.0f} ms; its own batch alone takes {alone_s * 1000:.1f} ms, a "
                        f"huge-prompt batch {huge_ms:.0f} ms ({f['batches']:.0f} batches ran meanwhile): "
                        f"{f['small_s'] / max(f['huge_batch_s'], 1e-9):.1f} huge-batch times"
                    )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
