"""Routing with fallback: a VllmEngine primary that is down, hung or failing, the real ONNX engine behind it.

The primaries are real network peers on 127.0.0.1, not mocks: a closed port (down), a TCP server that
accepts and never answers (hung), and small stdlib HTTP servers answering HTTP 500, 400 or a bad body.
`StandInSidecar` answers vLLM's /health and /classify shapes with scores from the real ONNX engine; it is a
stand-in used ONLY to show the breaker closing when a primary recovers. The real vLLM server is tested in
tests/test_vllm_tier.py (marker `vllm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.contract import Prompt, PromptBuilder
from engines.base import (
    EngineFailure,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Scored,
)
from engines.onnx_engine import OnnxEngine
from engines.router import CircuitBreaker, CircuitState, RoutedEngine
from engines.vllm_engine import SidecarMisconfigured, VllmEngine
from gateway import metrics
from tests.conftest import free_port
from tests.fakes import RecordingEngine, RecordingObserver

TOLERANCE = 1e-5
# Bounds for "it did not hang": generous on a shared 2-core machine; the timeouts under test are ~0.3 s.
HANG_BOUND_S = 10.0
# An HttpPeer /classify answer: close the connection without answering (a kept-alive connection the server
# closed as the request went out, or a server that died mid-request).
DROP = object()


def sample(metric, **labels) -> float:
    name = metric._name  # the exported sample name of a Counter gets a _total suffix
    suffix = "_total" if metric._type == "counter" else ""
    return metrics.REGISTRY.get_sample_value(name + suffix, labels) or 0.0


# --- real peers ------------------------------------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never answers (a hung sidecar)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.create_server(("127.0.0.1", port))
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for c in self._conns:
            c.close()
        self._sock.close()


class HttpPeer:
    """A stdlib HTTP server on 127.0.0.1 whose /health and /classify answers the test chooses."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.health_status = 200
        # Names GET /v1/models lists (vLLM's shape); None answers 404, as a server without the route.
        self.served_models: list[str] | None = None
        # (status, body) for POST /classify; a callable gets the decoded request and returns one.
        self.classify = (500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
        self.classify_calls = 0
        self.hold_classify = threading.Event()  # set: answer at once; clear: hang until set
        self.hold_classify.set()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # A client that gave up (a timeout under test) has closed its end.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(peer.health_status, b"")
                elif self.path == "/v1/models" and peer.served_models is not None:
                    data = [{"id": name, "object": "model"} for name in peer.served_models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/classify":
                    self._send(404, {"detail": "Not Found"})
                    return
                peer.classify_calls += 1
                peer.hold_classify.wait(timeout=30)
                answer = peer.classify(body) if callable(peer.classify) else peer.classify
                if answer is DROP:
                    self.close_connection = True
                    return
                self._send(*answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.hold_classify.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class StandInSidecar(HttpPeer):
    """Answers vLLM's /classify shape with raw scores from the real ONNX engine (a recovered primary).

    Used only to test the breaker closing; it is not vLLM (the vllm tier runs the real server).
    """

    def __init__(self, port: int, onnx: OnnxEngine) -> None:
        super().__init__(port)

        def classify(body: dict) -> tuple[int, dict]:
            if body.get("use_activation") is not False:
                return 400, {"error": {"message": "stand-in serves raw scores only", "code": 400}}
            prompts = [Prompt("", "", None, tuple(ids)) for ids in body["input"]]
            scores = onnx.score_sync(prompts)
            data = [{"index": i, "label": None, "probs": [s], "num_classes": 1} for i, s in enumerate(scores)]
            return 200, {"object": "list", "model": body.get("model"), "data": data}

        self.classify = classify


@contextlib.contextmanager
def http_peer(cls=HttpPeer, *args) -> Iterator[HttpPeer]:
    peer = cls(free_port(), *args)
    try:
        yield peer
    finally:
        peer.close()


# --- engines ---------------------------------------------------------------------------------------


@pytest.fixture
def onnx(onnx_engine: OnnxEngine) -> OnnxEngine:
    """The shared fp32 engine (tests/conftest.py): fp32 scores do not depend on their batch mates."""
    return onnx_engine


@pytest.fixture
def fallback(onnx: OnnxEngine) -> RecordingEngine:
    return RecordingEngine(onnx)


@pytest.fixture(scope="module")
def prompts(prompt_builder: PromptBuilder) -> list[Prompt]:
    docs = [
        "Paris is the capital of France.",
        "Berlin is the capital of Germany.",
        "Bread needs flour, water, salt and yeast. " * 20,
        "",
        "The capital of France is Paris.\n",
    ]
    return prompt_builder.build("What is the capital of France?", docs)


def vllm(url: str, **kw) -> VllmEngine:
    kw.setdefault("connect_timeout_ms", 500)
    kw.setdefault("request_timeout_ms", 300)
    kw.setdefault("health_timeout_ms", 300)
    return VllmEngine(url, model="tiny-reranker", **kw)


def routed(primary, fallback, **kw) -> RoutedEngine:
    kw.setdefault("failure_threshold", 3)
    kw.setdefault("reset_ms", 60_000)
    # A slow probe by default, so only the batches under test move the breaker.
    kw.setdefault("probe_interval_ms", 60_000)
    # The metrics the app reports through, so the tests below can read them as an operator would.
    kw.setdefault("observer", metrics.ENGINE_OBSERVER)
    return RoutedEngine(primary, fallback, **kw)


def assert_scores(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= TOLERANCE, (got, want)


async def wait_for_state(router: RoutedEngine, state: CircuitState, bound_s: float = HANG_BOUND_S) -> None:
    deadline = time.monotonic() + bound_s
    while router.circuit_state is not state:
        assert time.monotonic() < deadline, f"circuit stayed {router.circuit_state} instead of {state}"
        await asyncio.sleep(0.02)


# --- the vLLM engine's error translation ------------------------------------------------------------


async def test_vllm_engine_reports_a_closed_port_as_unavailable(prompts):
    engine = vllm(f"http://127.0.0.1:{free_port()}")
    await engine.start()
    try:
        assert await engine.health() is False
        with pytest.raises(EngineUnavailable, match="cannot connect"):
            await engine.score(prompts)
    finally:
        await engine.close()


async def test_vllm_engine_times_out_on_a_sidecar_that_never_answers(prompts):
    server = SilentServer(free_port())
    engine = vllm(f"http://127.0.0.1:{server.port}")
    await engine.start()
    try:
        started = time.monotonic()
        assert await engine.health() is False
        with pytest.raises(EngineTimeout, match=r"did not answer within 0\.3 s"):
            await engine.score(prompts)
        assert time.monotonic() - started < HANG_BOUND_S
    finally:
        await engine.close()
        server.close()


async def score_once(url: str, prompts: Sequence[Prompt]) -> Scored:
    """Start a vLLM engine on `url`, score `prompts` once, close it."""
    engine = vllm(url)
    await engine.start()
    try:
        return await engine.score(prompts)
    finally:
        await engine.close()


def classify_answer(body: dict) -> tuple[int, dict]:
    """vLLM's /classify shape with a made-up raw score per prompt (its index)."""
    data = [
        {"index": i, "label": None, "probs": [float(i)], "num_classes": 1} for i in range(len(body["input"]))
    ]
    return 200, {"object": "list", "model": body.get("model"), "data": data}


async def test_vllm_engine_tries_a_lost_connection_once_more(prompts):
    """A connection lost without an answer (a kept-alive one the server just closed) is no fallback: the
    request goes out once more and is answered (seen in CI: one such loss sent a batch to ONNX)."""
    with http_peer() as peer:
        peer.classify = lambda body: DROP if peer.classify_calls == 1 else classify_answer(body)
        scored = await score_once(peer.url, prompts)
    assert list(scored.scores) == [float(i) for i in range(len(prompts))]
    assert peer.classify_calls == 2


async def test_vllm_engine_reports_a_connection_lost_twice_as_unavailable(prompts):
    with http_peer() as peer:
        peer.classify = DROP
        with pytest.raises(EngineUnavailable, match="lost the connection"):
            await score_once(peer.url, prompts)
    assert peer.classify_calls == 2


async def test_vllm_engine_passes_on_the_sidecars_error_message(prompts):
    with http_peer() as peer:
        peer.classify = (500, {"error": {"message": "EngineCore died", "type": "InternalServerError"}})
        engine = vllm(peer.url)
        await engine.start()
        try:
            with pytest.raises(EngineFailure, match=r"HTTP 500.*EngineCore died") as info:
                await engine.score(prompts)
            assert not isinstance(info.value, EngineRejected)
            peer.classify = (400, {"error": {"message": "maximum context length is 512 tokens"}})
            with pytest.raises(EngineRejected, match=r"HTTP 400.*maximum context length"):
                await engine.score(prompts)
        finally:
            await engine.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "invalid JSON"),
        ({"data": []}, "returned 0 results"),
        ({"data": [{"index": 0, "probs": [0.1, 0.9], "num_classes": 2}]}, "2 scores per prompt"),
        ({"data": [{"index": 0, "probs": ["high"]}]}, "non-numeric score"),
        ({"data": [{"index": 3, "probs": [0.5]}]}, "bad or repeated index"),
    ],
)
async def test_vllm_engine_refuses_a_malformed_answer(prompts, body, message):
    with http_peer() as peer:
        peer.classify = (200, body)
        engine = vllm(peer.url)
        await engine.start()
        try:
            with pytest.raises(EngineFailure, match=message):
                await engine.score(prompts[:1])
        finally:
            await engine.close()


async def test_vllm_engine_sends_token_ids_and_reads_results_by_index(prompts):
    seen: list[dict] = []

    def classify(body: dict) -> tuple[int, dict]:
        seen.append(body)
        # Out of order on purpose: the engine must place results by their index.
        data = [{"index": i, "probs": [float(i) - 0.5]} for i in reversed(range(len(body["input"])))]
        return 200, {"data": data}

    with http_peer() as peer:
        peer.classify = classify
        scored = await score_once(peer.url, prompts)
    assert scored == Scored([i - 0.5 for i in range(len(prompts))], "vllm")
    (body,) = seen
    assert body["input"] == [list(p.input_ids) for p in prompts]
    assert body["use_activation"] is False
    assert body["add_special_tokens"] is False
    assert body["model"] == "tiny-reranker"


# --- the breaker on its own -------------------------------------------------------------------------


# --- a sidecar serving another model name ------------------------------------------------------------


async def test_vllm_engine_refuses_to_start_on_a_sidecar_serving_another_model(fallback):
    with http_peer() as peer:
        peer.served_models = ["some-other-model"]
        engine = vllm(peer.url)
        with pytest.raises(
            SidecarMisconfigured, match=r"serves 'some-other-model', not 'tiny-reranker'"
        ) as info:
            await engine.start()
        assert "RERANK_VLLM_MODEL" in str(info.value)
        await engine.close()
        # Behind the router too: a misconfigured primary is an error at start, not a silent fallback.
        router = routed(vllm(peer.url), fallback)
        with pytest.raises(SidecarMisconfigured):
            await router.start()
        await router.close()
        peer.served_models = ["some-other-model", "tiny-reranker"]
        engine = vllm(peer.url)
        await engine.start()
        assert await engine.health() is True
        assert engine.config_problem is None
        await engine.close()


async def test_sidecar_that_comes_up_with_another_model_makes_the_gateway_not_ready(
    make_settings, prompts, fallback
):
    from fastapi.testclient import TestClient

    from gateway.app import create_app

    with http_peer(StandInSidecar, fallback.inner) as peer:
        # Down at start (no /v1/models yet, as a sidecar still loading): the gateway starts on its fallback.
        router = routed(vllm(peer.url), fallback)
        app = create_app(make_settings(vllm_model="tiny-reranker"), engine=router)
        with TestClient(app) as client:
            assert client.get("/ready").status_code == 200
            peer.served_models = ["some-other-model"]
            await router.probe_once()
            ready = client.get("/ready")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "misconfigured"
            assert "serves 'some-other-model', not 'tiny-reranker'" in body["reason"]
            assert body["engines"]["primary"]["healthy"] is False
            assert body["engines"]["config_problem"] == body["reason"]
            assert body["engines"]["last_error"].startswith("misconfigured:")
            # Requests are still answered, by the fallback, while /ready says what is wrong.
            response = client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
            assert response.status_code == 200
            assert response.headers["x-rerank-engine"] == "onnx"
            # Relaunched with the right name: ready again (the breaker lets the primary back after reset_ms).
            peer.served_models = ["tiny-reranker"]
            await router.probe_once()
            ready = client.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["engines"]["config_problem"] is None


def test_breaker_opens_after_threshold_half_opens_after_reset_and_closes_on_success():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_ms=1_000, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.try_acquire()
    breaker.record_success()  # a success resets the count of consecutive failures
    for _ in range(3):
        assert breaker.try_acquire()
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    now[0] = 0.999
    assert not breaker.try_acquire()
    now[0] = 1.0
    assert breaker.try_acquire()  # the single half-open trial
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.try_acquire()  # one trial at a time
    breaker.record_failure()  # the trial failed: open again for a full reset period
    assert breaker.state is CircuitState.OPEN
    now[0] = 1.5
    assert not breaker.try_acquire()
    now[0] = 2.0
    assert breaker.try_acquire()
    breaker.release()  # a trial that proved nothing frees the slot without closing
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


# --- routing ----------------------------------------------------------------------------------------


async def test_down_primary_sends_every_batch_to_onnx_with_no_error(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    router = routed(vllm(f"http://127.0.0.1:{free_port()}"), fallback)
    before = sample(metrics.FALLBACKS, reason="circuit_open")
    await router.start()
    try:
        # The primary was down at start: the circuit opened without waiting for failed batches.
        assert router.circuit_state is CircuitState.OPEN
        results = await asyncio.gather(*(router.score(prompts) for _ in range(8)))
        for r in results:
            assert r.engine == "onnx"
            assert_scores(r.scores, want)
        assert sample(metrics.FALLBACKS, reason="circuit_open") - before == 8
        assert sample(metrics.CIRCUIT_STATE, engine="vllm") == CircuitState.OPEN.value
        status = await router.status()
        assert status["primary"] == {"engine": "vllm", "healthy": False, "precision": "sidecar"}
        assert status["fallback"] == {"engine": "onnx", "healthy": True, "precision": "fp32"}
        assert status["circuit"] == "open"
        assert await router.health() is True  # the fallback can answer
    finally:
        await router.close()


async def test_failing_primary_opens_the_circuit_after_threshold_batches(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    with http_peer() as peer:  # healthy /health, HTTP 500 on every /classify
        router = routed(vllm(peer.url), fallback, failure_threshold=3)
        failures = sample(metrics.FALLBACKS, reason="failure")
        errors = sample(metrics.ENGINE_ERRORS, engine="vllm", kind="failure")
        await router.start()
        try:
            assert router.circuit_state is CircuitState.CLOSED
            for i in range(5):
                r = await router.score(prompts)
                assert r.engine == "onnx"
                assert_scores(r.scores, want)
                expected = CircuitState.OPEN if i >= 2 else CircuitState.CLOSED
                assert router.circuit_state is expected
            # Three batches tried the primary; once open, the circuit kept the next two away from it.
            assert peer.classify_calls == 3
            assert sample(metrics.FALLBACKS, reason="failure") - failures == 3
            assert sample(metrics.ENGINE_ERRORS, engine="vllm", kind="failure") - errors == 3
            status = await router.status()
            assert status["circuit"] == "open"
            assert "HTTP 500" in status["last_error"]
            assert "boom" in status["last_error"]
        finally:
            await router.close()


async def test_batch_that_times_out_on_primary_is_answered_by_onnx(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    with http_peer() as peer:
        peer.hold_classify.clear()  # /health answers, /classify hangs
        router = routed(vllm(peer.url, request_timeout_ms=300), fallback, failure_threshold=2)
        timeouts = sample(metrics.FALLBACKS, reason="timeout")
        await router.start()
        try:
            started = time.monotonic()
            results = [await router.score(prompts) for _ in range(3)]
            assert time.monotonic() - started < HANG_BOUND_S
            for r in results:
                assert r.engine == "onnx"
                assert_scores(r.scores, want)
            assert sample(metrics.FALLBACKS, reason="timeout") - timeouts == 2
            assert router.circuit_state is CircuitState.OPEN
            assert (await router.status())["last_error"].startswith("timeout:")
        finally:
            await router.close()


async def test_hung_sidecar_is_detected_by_the_probe_and_fallback_answers(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    with http_peer() as peer:
        router = routed(vllm(peer.url), fallback, failure_threshold=2, probe_interval_ms=50)
        await router.start()
        try:
            assert router.circuit_state is CircuitState.CLOSED
            peer.close()  # the sidecar goes away and a silent socket takes its port
            silent = SilentServer(peer.port)
            try:
                await wait_for_state(router, CircuitState.OPEN)
                r = await router.score(prompts)
                assert r.engine == "onnx"
                assert_scores(r.scores, want)
                assert (await router.status())["primary"]["healthy"] is False
            finally:
                silent.close()
        finally:
            await router.close()


async def test_batches_waiting_on_a_hung_primary_leave_when_the_probe_opens_the_circuit(
    prompts, fallback, onnx
):
    want = (await onnx.score(prompts)).scores
    with http_peer() as peer:
        peer.hold_classify.clear()  # /classify hangs
        # A request timeout far longer than the bound below: only the opening circuit can free the batch.
        primary = vllm(peer.url, request_timeout_ms=60_000, health_timeout_ms=300)
        router = routed(primary, fallback, failure_threshold=2, probe_interval_ms=50)
        opened = sample(metrics.FALLBACKS, reason="circuit_open")
        await router.start()
        try:
            started = time.monotonic()
            batch = asyncio.ensure_future(router.score(prompts))
            while peer.classify_calls == 0:
                assert time.monotonic() - started < HANG_BOUND_S
                await asyncio.sleep(0.01)
            assert not batch.done()
            peer.health_status = 503  # the probe now sees the sidecar as down
            r = await asyncio.wait_for(batch, HANG_BOUND_S)
            assert r.engine == "onnx"
            assert_scores(r.scores, want)
            assert router.circuit_state is CircuitState.OPEN
            assert sample(metrics.FALLBACKS, reason="circuit_open") - opened == 1
        finally:
            await router.close()


async def test_rejected_batch_falls_back_without_counting_against_the_primary(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    with http_peer() as peer:
        peer.classify = (400, {"error": {"message": "prompt longer than max_model_len"}})
        # A long request timeout: on a busy machine 300 ms can pass before the peer answers, and a timeout
        # would count against the primary (only the rejection is under test here).
        router = routed(vllm(peer.url, request_timeout_ms=10_000), fallback, failure_threshold=1)
        rejected = sample(metrics.FALLBACKS, reason="rejected")
        await router.start()
        try:
            for _ in range(3):
                r = await router.score(prompts)
                assert r.engine == "onnx"
                assert_scores(r.scores, want)
            assert router.circuit_state is CircuitState.CLOSED
            assert peer.classify_calls == 3
            assert sample(metrics.FALLBACKS, reason="rejected") - rejected == 3
        finally:
            await router.close()


async def test_circuit_half_opens_after_reset_and_closes_when_primary_recovers(prompts, fallback, onnx):
    want = (await onnx.score(prompts)).scores
    port = free_port()
    # A long request timeout: the stand-in is slow on a busy machine, and only "down" is under test here.
    router = routed(vllm(f"http://127.0.0.1:{port}", request_timeout_ms=10_000), fallback, reset_ms=300)
    await router.start()
    sidecar = None
    try:
        assert router.circuit_state is CircuitState.OPEN
        assert (await router.score(prompts)).engine == "onnx"
        await asyncio.sleep(0.35)
        # The reset elapsed but the primary is still down: the trial batch fails and reopens the circuit.
        r = await router.score(prompts)
        assert r.engine == "onnx"
        assert router.circuit_state is CircuitState.OPEN
        sidecar = StandInSidecar(port, onnx)  # the primary comes back on the same port
        r = await router.score(prompts)
        assert r.engine == "onnx"  # still inside the new reset period
        assert sidecar.classify_calls == 0
        await asyncio.sleep(0.35)
        r = await router.score(prompts)  # the half-open trial reaches the primary and succeeds
        assert r.engine == "vllm"
        assert_scores(r.scores, want)
        assert router.circuit_state is CircuitState.CLOSED
        assert sample(metrics.CIRCUIT_STATE, engine="vllm") == CircuitState.CLOSED.value
        results = await asyncio.gather(*(router.score(prompts) for _ in range(4)))
        assert {r.engine for r in results} == {"vllm"}
        assert sidecar.classify_calls == 5
    finally:
        await router.close()
        if sidecar is not None:
            sidecar.close()


async def test_probe_closes_the_circuit_when_primary_recovers_without_traffic(prompts, fallback, onnx):
    port = free_port()
    primary = vllm(f"http://127.0.0.1:{port}", request_timeout_ms=10_000, health_timeout_ms=2_000)
    router = routed(primary, fallback, reset_ms=200, probe_interval_ms=50)
    await router.start()
    sidecar = StandInSidecar(port, onnx)
    try:
        await wait_for_state(router, CircuitState.CLOSED)
        assert sidecar.classify_calls == 0  # /health alone closed it
        assert (await router.score(prompts)).engine == "vllm"
        assert (await router.status())["primary"]["healthy"] is True
    finally:
        await router.close()
        sidecar.close()


async def test_router_reports_errors_fallbacks_circuit_and_health_to_its_observer(prompts, onnx):
    observer = RecordingObserver()
    broken = EngineFailure("the fallback broke")
    fallback = RecordingEngine(onnx, fail=lambda n, _: broken if n >= 2 else None)
    with http_peer() as peer:  # healthy /health, HTTP 500 on every /classify
        router = routed(vllm(peer.url), fallback, failure_threshold=2, observer=observer)
        await router.start()
        try:
            assert (await router.score(prompts)).engine == "onnx"
            with pytest.raises(EngineFailure) as info:
                await router.score(prompts)
            assert info.value is broken
            assert broken.reported
            await router.status()
        finally:
            await router.close()
    assert observer.of("error") == [("vllm", "failure"), ("vllm", "failure"), ("onnx", "failure")]
    assert observer.of("fallback") == [("failure",), ("failure",)]
    assert observer.of("circuit") == [("vllm", CircuitState.CLOSED), ("vllm", CircuitState.OPEN)]
    # At start (the primary's probe), then /ready's status of both.
    assert observer.of("health") == [("vllm", True), ("vllm", True), ("onnx", True)]


async def test_a_failing_fallback_is_counted_once_under_its_own_name(prompts, onnx):
    """Behind the scheduler too: the error that leaves the router was reported already, under the fallback."""
    from gateway.scheduler import Scheduler

    fallback = RecordingEngine(onnx, fail=lambda n, _: EngineFailure("the fallback broke"))
    with http_peer() as peer:  # healthy /health, HTTP 500 on every /classify
        router = routed(vllm(peer.url), fallback, failure_threshold=100)
        scheduler = Scheduler(router, max_wait_ms=1.0, observer=metrics.SCHEDULER_OBSERVER)
        await router.start()
        await scheduler.start()
        primary = sample(metrics.ENGINE_ERRORS, engine="vllm", kind="failure")
        secondary = sample(metrics.ENGINE_ERRORS, engine="onnx", kind="failure")
        try:
            for _ in range(3):
                with pytest.raises(EngineFailure, match="the fallback broke"):
                    await scheduler.score(prompts)
        finally:
            await scheduler.close()
            await router.close()
        # One count per failed call, each under the engine that failed (not again under the primary's name).
        assert peer.classify_calls >= 3
        assert sample(metrics.ENGINE_ERRORS, engine="vllm", kind="failure") - primary == peer.classify_calls
        assert sample(metrics.ENGINE_ERRORS, engine="onnx", kind="failure") - secondary == len(fallback.calls)


async def test_fallback_gets_batches_cut_to_its_own_budget(prompt_builder, tiny_model_dir, prompts):
    small = OnnxEngine(tiny_model_dir, quantization="fp32", intra_op_threads=1, max_batch_pairs=4)
    watched = RecordingEngine(small)
    await small.start()
    try:
        docs = [f"document {i} " + "word " * (i * 7 % 30) for i in range(12)]
        many = prompt_builder.build("a query?", docs)
        want = (await small.score(many)).scores
        router = routed(vllm(f"http://127.0.0.1:{free_port()}"), watched)
        await router.start()
        watched.calls.clear()
        try:
            r = await router.score(many)
        finally:
            await router.close()
        assert r.engine == "onnx"
        assert_scores(r.scores, want)
        assert sum(watched.sizes()) == len(many)
        assert max(watched.sizes()) <= 4
    finally:
        await small.close()
