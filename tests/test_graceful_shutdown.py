"""SIGTERM under load: the real server stops accepting, finishes what it accepted, and exits 0.

The server runs as its own process (`python -m gateway.cli serve`) on the tiny prepared model, with a long
`max_wait_ms` so that, when SIGTERM arrives, requests sit both in the coalescer's queue and in flight.
Requests sent well before the signal were accepted and must all come back 200 with a well-formed answer;
requests sent around or after it may be refused (connection closed, or 503), never answered wrongly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port, require_real_component

MAX_WAIT_MS = 400  # every batch waits this long for company, so work is queued when SIGTERM lands
DRAIN_TIMEOUT_S = 20.0
CLIENTS = 12
DOCUMENTS = 6
# A request sent this long before SIGTERM has certainly reached the server: it counts as accepted.
ACCEPTED_MARGIN_S = 0.25
START_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request's fate, with monotonic send and answer times."""

    sent_s: float
    answered_s: float
    status: int | None  # None: the connection was refused or closed
    body: dict | None
    documents: int


def well_formed(outcome: Outcome) -> bool:
    """A Cohere-shaped answer ranking every document once, best first."""
    body = outcome.body or {}
    results = body.get("results")
    if not isinstance(results, list) or len(results) != outcome.documents:
        return False
    if sorted(r.get("index") for r in results) != list(range(outcome.documents)):
        return False
    scores = [r.get("relevance_score") for r in results]
    return all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)


def start_server(port: int, env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """`python -m gateway.cli serve` as its own process, output to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_until_ready(client: httpx.AsyncClient, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with status {process.returncode} before it was ready")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    pytest.fail(f"the server was not ready within {START_TIMEOUT_S} s")


async def client_loop(
    client: httpx.AsyncClient, worker: int, stop: asyncio.Event, out: list[Outcome], active: dict[int, float]
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        documents = [
            f"document {worker}-{n}-{j} about bread and ovens" * (1 + j % 3) for j in range(DOCUMENTS)
        ]
        payload = {
            "model": "mixedbread-ai/mxbai-rerank-base-v2",
            "query": f"query {worker}",
            "documents": documents,
        }
        sent_s = active[worker] = time.monotonic()
        try:
            response = await client.post("/v1/rerank", json=payload)
        except httpx.TransportError:
            out.append(Outcome(sent_s, time.monotonic(), None, None, DOCUMENTS))
            active.pop(worker, None)
            await asyncio.sleep(0.05)
            continue
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else None
        )
        out.append(Outcome(sent_s, time.monotonic(), response.status_code, body, DOCUMENTS))


@pytest.mark.timeout(240)
async def test_sigterm_under_load_loses_no_accepted_request(tiny_model_dir: Path, tmp_path: Path):
    if importlib.util.find_spec("gateway.commands.serve") is None:
        require_real_component("rerank-gateway serve", "gateway/commands/serve.py does not exist yet")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(
        RERANK_MODEL_PATH=str(tiny_model_dir),
        RERANK_CACHE_DIR=str(tmp_path / "cache"),
        RERANK_MAX_WAIT_MS=str(MAX_WAIT_MS),
        RERANK_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        RERANK_ONNX_INTRA_OP_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    log_path = tmp_path / "server.log"
    process = start_server(port, env, tmp_path, log_path)
    outcomes: list[Outcome] = []
    try:
        limits = httpx.Limits(max_connections=CLIENTS + 2)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=DRAIN_TIMEOUT_S + 10, limits=limits
        ) as client:
            await wait_until_ready(client, process)
            stop = asyncio.Event()
            active: dict[int, float] = {}
            workers = [
                asyncio.create_task(client_loop(client, w, stop, outcomes, active)) for w in range(CLIENTS)
            ]
            await asyncio.sleep(2.0)  # steady load: several waves of batches
            # Clients move in waves (a batch answers them together): signal while a wave is well under way.
            deadline = time.monotonic() + 10
            while not any(time.monotonic() - sent_s >= ACCEPTED_MARGIN_S for sent_s in active.values()):
                assert time.monotonic() < deadline, "no request stayed in flight long enough"
                await asyncio.sleep(0.005)
            sigterm_s = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)  # keep sending while the server shuts down
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), DRAIN_TIMEOUT_S + 15)
        exit_status = await asyncio.to_thread(process.wait, DRAIN_TIMEOUT_S + 10)
        exited_after_s = time.monotonic() - sigterm_s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log_text = log_path.read_text()[-3000:]

    accepted = [o for o in outcomes if o.sent_s <= sigterm_s - ACCEPTED_MARGIN_S]
    in_flight = [o for o in accepted if o.answered_s > sigterm_s]
    assert in_flight, f"no request was in flight at SIGTERM; the test did not exercise the drain\n{log_text}"
    for outcome in accepted:
        assert outcome.status == 200, f"an accepted request got {outcome.status}: {outcome.body}\n{log_text}"
        assert well_formed(outcome), outcome.body
    for outcome in outcomes:
        # Around and after the signal: a clean refusal or a correct answer, nothing else.
        assert outcome.status in (None, 200, 503), f"{outcome.status}: {outcome.body}"
        if outcome.status == 200:
            assert well_formed(outcome), outcome.body
    assert exit_status == 0, log_text
    assert exited_after_s < DRAIN_TIMEOUT_S + 10
