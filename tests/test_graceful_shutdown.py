"""SIGTERM under load: the real server stops accepting, answers what it accepted, and exits in bounded time.

The server runs as its own process (`python -m tests.gated_server`: `rerank-gateway serve` on the tiny
prepared model, its engine held on a gate that SIGUSR1 opens; the wait at the gate cannot be cancelled, as
an onnxruntime run cannot). Nothing here waits on timing to create the situation under test: the test
sends the requests, reads from /metrics that the server holds every one of them and that the engine is
busy, then signals. Timing appears only as generous upper bounds on how long things take.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port

CLIENTS = 12
DOCUMENTS = 6
START_TIMEOUT_S = 120.0
# Bounds for "it did not hang", generous for a busy 2-core machine.
SETTLE_BOUND_S = 30.0


def well_formed(body: dict | None, documents: int) -> bool:
    """A Cohere-shaped answer ranking every document once, best first."""
    results = (body or {}).get("results")
    if not isinstance(results, list) or len(results) != documents:
        return False
    if sorted(r.get("index") for r in results) != list(range(documents)):
        return False
    scores = [r.get("relevance_score") for r in results]
    return all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)


class GatedServer:
    """The gated gateway process on 127.0.0.1:`port`, its output in `log_path`."""

    def __init__(self, model_dir: Path, work: Path, *, drain_timeout_s: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            RERANK_MODEL_PATH=str(model_dir),
            RERANK_CACHE_DIR=str(work / "cache"),
            RERANK_DRAIN_TIMEOUT_S=str(drain_timeout_s),
            RERANK_ONNX_INTRA_OP_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.gated_server", "--port", str(self.port)],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    async def wait_until_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited early:\n{self.log()}"
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        pytest.fail(f"the server was not ready within {START_TIMEOUT_S} s:\n{self.log()}")

    async def metric(self, client: httpx.AsyncClient, name: str) -> float:
        text = (await client.get("/metrics")).text
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} is not in /metrics"
        return float(found.group(1))

    async def wait_until_holding(self, client: httpx.AsyncClient, requests: int) -> None:
        """Until `requests` rerank requests and /metrics itself are in flight, and the engine waits."""
        deadline = time.monotonic() + SETTLE_BOUND_S
        while True:
            in_flight = await self.metric(client, "rerank_requests_in_flight")
            waiting = await self.metric(client, "rerank_test_gate_waiting")
            if in_flight >= requests + 1 and waiting >= 1:
                return
            assert time.monotonic() < deadline, f"{in_flight=} {waiting=}\n{self.log()}"
            await asyncio.sleep(0.05)

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    async def wait_until_not_listening(self) -> None:
        deadline = time.monotonic() + SETTLE_BOUND_S
        while self.listening():
            assert time.monotonic() < deadline, f"still listening after SIGTERM\n{self.log()}"
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def rerank(url: str, worker: int) -> httpx.Response:
    """One request on its own connection (so that each is accepted on its own, not pooled)."""
    payload = {
        "query": f"query {worker}",
        "documents": [f"document {worker}-{j} about bread and ovens" * (1 + j % 3) for j in range(DOCUMENTS)],
    }
    async with httpx.AsyncClient(base_url=url, timeout=SETTLE_BOUND_S + 30) as client:
        return await client.post("/v1/rerank", json=payload)


@pytest.mark.timeout(180)
async def test_sigterm_under_load_loses_no_accepted_request(tiny_model_dir: Path, tmp_path: Path):
    server = GatedServer(tiny_model_dir, tmp_path, drain_timeout_s=60.0)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as control:
            await server.wait_until_ready(control)
            accepted = [asyncio.create_task(rerank(server.url, w)) for w in range(CLIENTS)]
            await server.wait_until_holding(control, CLIENTS)
        server.process.send_signal(signal.SIGTERM)
        await server.wait_until_not_listening()
        # After SIGTERM new connections are refused, never answered wrongly.
        with pytest.raises(httpx.ConnectError):
            await rerank(server.url, CLIENTS)
        assert all(not t.done() for t in accepted), "an accepted request ended before the engine was free"
        server.process.send_signal(signal.SIGUSR1)  # the engine finishes its work now
        responses = await asyncio.wait_for(asyncio.gather(*accepted), SETTLE_BOUND_S)
        exit_status = await asyncio.to_thread(server.process.wait, SETTLE_BOUND_S)
    finally:
        server.stop()
    for response in responses:
        assert response.status_code == 200, f"{response.status_code}: {response.text}\n{server.log()}"
        assert well_formed(response.json(), DOCUMENTS), response.text
    assert exit_status == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.mark.timeout(180)
async def test_requests_cut_by_the_drain_get_503_json_and_the_process_exits_in_time(
    tiny_model_dir: Path, tmp_path: Path
):
    drain_s = 2.0
    server = GatedServer(tiny_model_dir, tmp_path, drain_timeout_s=drain_s)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as control:
            await server.wait_until_ready(control)
            held = [asyncio.create_task(rerank(server.url, w)) for w in range(CLIENTS)]
            await server.wait_until_holding(control, CLIENTS)
        sigterm_s = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # The gate never opens: the engine stays busy in a thread nothing can interrupt.
        responses = await asyncio.wait_for(asyncio.gather(*held), SETTLE_BOUND_S)
        answered_s = time.monotonic() - sigterm_s
        exit_status = await asyncio.to_thread(server.process.wait, SETTLE_BOUND_S)
        exited_s = time.monotonic() - sigterm_s
    finally:
        server.stop()
    log = server.log()
    for response in responses:
        assert response.status_code == 503, f"{response.status_code}: {response.text}\n{log}"
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-request-id"]
        error = response.json()["error"]
        assert error["type"] == "shutting_down"
        assert "RERANK_DRAIN_TIMEOUT_S" in error["message"]
    # The drain lets requests run until its deadline, and the process is gone 2 s after it at most (plus
    # what a busy machine adds to starting the clock and reaping the process).
    assert answered_s >= drain_s - 0.5
    assert exited_s < drain_s + 2.0 + 2.0, (exited_s, log)
    assert exit_status == 0, log
    assert "Traceback" not in log
    assert "Internal Server Error" not in log
