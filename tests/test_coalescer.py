"""The request coalescer, on the real ONNX engine serving the tiny prepared model.

The engine is wrapped only to watch it: `RecordingEngine` records the prompts of every call (to count calls
and see batch composition) and can hold a batch at a gate, which plays a deliberately slow engine so the
queue fills deterministically. Every score still comes from onnxruntime, and every coalesced answer is
compared with the same engine scoring that request alone (fp32 graph: int8 dynamic quantization scales
activations per batch, so its scores depend on batch mates).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.contract import Prompt, PromptBuilder
from core.ranking import rank_indices
from engines.base import EngineRejected, EngineUnavailable
from gateway import metrics
from gateway.coalescer import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, UNMEASURED_RETRY_AFTER_S, Coalescer
from gateway.disconnect import ClientDisconnected, run_until_disconnected
from gateway.errors import (
    GatewayError,
    GatewayTimeout,
    Overloaded,
    ServiceUnavailable,
    UpstreamFailure,
)
from tests.fakes import RecordingEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOLERANCE = 1e-5
VOCABULARY = (
    "bread flour yeast oven crust dough salt water sugar butter milk egg knead proof bake slice toast "
    "grain rye wheat starter loaf crumb steam rack pan timer cool wrap fresh stale freezer paper"
)


def text(seed: int, n_words: int) -> str:
    """A deterministic document of `n_words` words; different seeds give different texts."""
    words = VOCABULARY.split()
    return " ".join(words[(seed * 7 + i * (seed % 5 + 1)) % len(words)] for i in range(n_words)) + f" #{seed}"


@pytest.fixture
def engine(onnx_engine) -> RecordingEngine:
    return RecordingEngine(onnx_engine)


@pytest.fixture
def builder(prompt_builder: PromptBuilder) -> PromptBuilder:
    return prompt_builder


def coalescer(engine, **overrides) -> Coalescer:
    options = {
        "max_batch_tokens": 1_000_000,
        "max_batch_pairs": 1_000,
        "max_wait_ms": 20.0,
        "max_queued_pairs": 10_000,
        "request_timeout_ms": 60_000,
    }
    options.update(overrides)
    return Coalescer(engine, **options)


def request(builder: PromptBuilder, seed: int, n_docs: int, *, words: int = 6) -> list[Prompt]:
    """One query against `n_docs` documents, all texts unique to `seed`."""
    return builder.build(
        f"question {seed}: {text(seed, 3)}?", [text(seed * 100 + j, words) for j in range(n_docs)]
    )


async def alone(engine: RecordingEngine, prompts: Sequence[Prompt]) -> list[float]:
    """The uncoalesced answer: the inner engine scoring this request by itself."""
    return (await engine.inner.score(list(prompts))).scores


def assert_close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= TOLERANCE, (got, want)


async def hold_in_flight(c: Coalescer, engine: RecordingEngine, prompts: list[Prompt]) -> asyncio.Task:
    """Start a request and wait until its batch sits in the engine, held at the closed gate."""
    engine.gate.clear()
    engine.entered.clear()
    task = asyncio.create_task(c.score(prompts))
    await asyncio.wait_for(engine.entered.wait(), 10)
    return task


async def fill_engine(c: Coalescer, engine: RecordingEngine, first: list[Prompt], full: list[Prompt]):
    """Hold one batch running and one full batch sent ahead (pipelined), so the next batch must queue."""
    held = await hold_in_flight(c, engine, first)
    ahead = asyncio.create_task(c.score(full))
    await until(lambda: len(engine.calls) == 2)
    return held, ahead


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def dropped(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("rerank_dropped_requests_total", {"reason": reason}) or 0.0


# --- batching ---------------------------------------------------------------------------------------


async def test_burst_of_requests_is_served_in_fewer_engine_calls_with_each_requests_own_scores(
    engine, builder
):
    requests = [request(builder, seed, 3) for seed in range(12)]
    c = coalescer(engine, max_wait_ms=50)
    try:
        answers = await asyncio.gather(*(c.score(r) for r in requests))
    finally:
        await c.close()
    assert len(engine.calls) < len(requests)
    assert sorted(p.input_ids for p in engine.seen()) == sorted(p.input_ids for r in requests for p in r)
    for prompts, answer in zip(requests, answers, strict=True):
        assert_close(answer.scores, await alone(engine, prompts))
        assert answer.engine == engine.info.name


async def test_batch_flushes_as_soon_as_the_pair_budget_is_full(engine, builder):
    c = coalescer(engine, max_batch_pairs=4, max_wait_ms=60_000)
    singles = [request(builder, seed, 1) for seed in range(4)]
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(c.score(r) for r in singles)), 10)
    finally:
        await c.close()
    assert [len(call) for call in engine.calls] == [4]
    for prompts, answer in zip(singles, answers, strict=True):
        assert_close(answer.scores, await alone(engine, prompts))


async def test_batch_flushes_when_the_padded_token_budget_is_full(engine, builder):
    singles = [request(builder, seed, 1) for seed in range(3)] + [request(builder, 3, 1, words=30)]
    longest = max(len(r[0]) for r in singles[:3])
    # Padded cost: the longest row times the rows. Three rows fit exactly, a fourth does not.
    c = coalescer(engine, max_batch_tokens=longest * 3, max_wait_ms=60_000)
    assert engine.info.padded
    try:
        tasks = [asyncio.create_task(c.score(r)) for r in singles]
        await asyncio.wait_for(asyncio.gather(*tasks[:3]), 10)
        assert not tasks[3].done()  # still waiting for company, not flushed
        assert [len(call) for call in engine.calls] == [3]
        await c.drain(10)  # draining flushes what is left without waiting max_wait_ms
        await asyncio.wait_for(tasks[3], 10)
    finally:
        await c.close()
    for call in engine.calls:
        assert max(len(p) for p in call) * len(call) <= longest * 3


async def test_lone_request_waits_max_wait_ms_then_flushes(engine, builder):
    prompts = request(builder, 1, 2)
    c = coalescer(engine, max_wait_ms=1_000)
    try:
        task = asyncio.create_task(c.score(prompts))
        await asyncio.sleep(0.1)
        assert engine.calls == []  # budget not full, oldest pair younger than max_wait_ms
        answer = await asyncio.wait_for(task, 10)
    finally:
        await c.close()
    assert len(engine.calls) == 1
    assert_close(answer.scores, await alone(engine, prompts))


async def test_order_within_a_request_survives_length_sorting(engine, builder):
    lengths = [40, 3, 25, 1, 60, 12, 7, 33]
    prompts = builder.build("how long is this?", [text(500 + i, n) for i, n in enumerate(lengths)])
    c = coalescer(engine, max_wait_ms=0)
    try:
        answer = await c.score(prompts)
    finally:
        await c.close()
    (call,) = engine.calls
    assert [len(p) for p in call] == sorted(len(p) for p in prompts)
    assert [len(p) for p in call] != [len(p) for p in prompts]  # the test really reordered
    assert_close(answer.scores, await alone(engine, prompts))


async def test_queued_pairs_of_similar_length_are_batched_together_oldest_first(engine, builder):
    short = [builder.build(f"q{i}", [text(300 + i, 3)]) for i in range(4)]
    long = [builder.build(f"q{i}", [text(400 + i, 40)]) for i in range(4)]
    arrivals = [r for pair in zip(short, long, strict=True) for r in pair]  # short, long, short, long...
    c = coalescer(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        busy = await fill_engine(c, engine, request(builder, 310, 2), request(builder, 311, 4))
        tasks = []
        for prompts in arrivals:
            tasks.append(asyncio.create_task(c.score(prompts)))
            await until(lambda n=len(tasks): c.stats()["queued_pairs"] >= n)  # staged pairs count as queued
        engine.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await asyncio.wait_for(asyncio.gather(*busy), 10)
    finally:
        await c.close()
    names = {r[0].input_ids: f"short{i}" for i, r in enumerate(short)}
    names.update({r[0].input_ids: f"long{i}" for i, r in enumerate(long)})
    later = [sorted(names[p.input_ids] for p in call) for call in engine.calls[2:]]
    assert later == [[f"short{i}" for i in range(4)], [f"long{i}" for i in range(4)]]
    for prompts, answer in zip(arrivals, answers, strict=True):
        assert_close(answer.scores, await alone(engine, prompts))


async def test_only_a_full_batch_is_sent_ahead_to_a_busy_engine(engine, builder):
    c = coalescer(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        held = await hold_in_flight(c, engine, request(builder, 320, 2))
        small = asyncio.create_task(c.score(request(builder, 321, 2)))
        await until(lambda: c.stats()["queued_pairs"] == 2)
        await asyncio.sleep(0.05)
        assert len(engine.calls) == 1  # half a batch waits: it may still gain company or be cancelled
        more = asyncio.create_task(c.score(request(builder, 322, 2)))
        await until(lambda: len(engine.calls) == 2)  # a full one waits at the engine instead
        assert len(engine.calls[1]) == 4
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, small, more), 10)
    finally:
        await c.close()


async def test_identical_pairs_in_one_batch_are_scored_once(engine, builder):
    docs = [text(900, 5), text(901, 9), text(902, 4)]
    first = builder.build("shared query", [docs[0], docs[1], docs[0]])
    second = builder.build("shared query", [docs[1], docs[2]])
    c = coalescer(engine, max_wait_ms=50)
    try:
        a, b = await asyncio.gather(c.score(first), c.score(second))
    finally:
        await c.close()
    (call,) = engine.calls
    assert len(call) == 3
    assert len({p.input_ids for p in call}) == 3
    assert_close(a.scores, await alone(engine, first))
    assert_close(b.scores, await alone(engine, second))
    assert c.stats()["pairs_scored"] == 5
    assert c.stats()["unique_pairs_scored"] == 3


async def test_request_larger_than_a_batch_is_split_and_merged_in_order(engine, builder):
    prompts = request(builder, 7, 10, words=8)
    c = coalescer(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        answer = await c.score(prompts)
    finally:
        await c.close()
    assert len(engine.calls) >= 3
    assert all(len(call) <= 4 for call in engine.calls)
    want = await alone(engine, prompts)
    assert_close(answer.scores, want)
    assert rank_indices(answer.scores, 3) == rank_indices(want, 3)  # top_n is global, not per batch


async def test_empty_request_needs_no_engine_call(engine):
    c = coalescer(engine)
    try:
        answer = await c.score([])
    finally:
        await c.close()
    assert answer.scores == []
    assert engine.calls == []


# --- cancellation, deadlines, backpressure ------------------------------------------------------------


async def test_cancelled_request_pairs_never_reach_the_engine(engine, builder):
    blocker, leaver, stayer = (request(builder, seed, 3) for seed in (20, 21, 22))
    c = coalescer(engine, max_wait_ms=0)
    before = dropped("cancelled")
    try:
        held = await hold_in_flight(c, engine, blocker)
        leaving = asyncio.create_task(c.score(leaver))
        staying = asyncio.create_task(c.score(stayer))
        await until(lambda: c.stats()["queued_pairs"] == 6)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert c.stats()["queued_pairs"] == 3
        engine.gate.set()
        await asyncio.wait_for(held, 10)
        answer = await asyncio.wait_for(staying, 10)
    finally:
        await c.close()
    seen = {p.input_ids for p in engine.seen()}
    assert not seen & {p.input_ids for p in leaver}
    assert_close(answer.scores, await alone(engine, stayer))
    assert dropped("cancelled") == before + 1
    assert c.stats()["dropped_pairs"] == 3


async def test_cancelled_pairs_already_staged_as_the_next_batch_are_skipped(engine, builder):
    leaver = request(builder, 31, 4)
    c = coalescer(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        busy = await fill_engine(c, engine, request(builder, 30, 4), request(builder, 32, 4))
        leaving = asyncio.create_task(c.score(leaver))
        await until(lambda: c.stats()["staged_pairs"] == 4)  # a full budget is prepared while the engine runs
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(*busy), 10)
        await c.drain(10)
    finally:
        await c.close()
    assert len(engine.calls) == 2
    assert c.stats()["queued_pairs"] == 0


async def test_deadline_passing_in_the_queue_gives_gateway_timeout(engine, builder):
    blocker, late = request(builder, 40, 2), request(builder, 41, 2)
    c = coalescer(engine, max_wait_ms=0)
    before = dropped("timeout")
    try:
        held = await hold_in_flight(c, engine, blocker)
        with pytest.raises(GatewayTimeout):
            await c.score(late, deadline_s=time.monotonic() + 0.2)
        engine.gate.set()
        await asyncio.wait_for(held, 10)
        await c.drain(10)
    finally:
        await c.close()
    assert not {p.input_ids for p in engine.seen()} & {p.input_ids for p in late}
    assert dropped("timeout") == before + 1
    assert GatewayTimeout("x").status_code == 503


async def test_request_timeout_ms_is_the_default_deadline(engine, builder):
    c = coalescer(engine, max_wait_ms=0, request_timeout_ms=200)
    try:
        held = await hold_in_flight(c, engine, request(builder, 42, 2))
        with pytest.raises(GatewayTimeout):
            await c.score(request(builder, 43, 2))
        engine.gate.set()
        # The held request's own 200 ms deadline passed while the engine was held.
        with pytest.raises(GatewayTimeout):
            await asyncio.wait_for(held, 10)
    finally:
        await c.close()


async def test_full_queue_answers_overloaded_with_retry_after(engine, builder):
    c = coalescer(engine, max_wait_ms=0, max_queued_pairs=8)
    try:
        held = await hold_in_flight(c, engine, request(builder, 50, 4))  # in flight: not queued
        queued = asyncio.create_task(c.score(request(builder, 51, 6)))
        await until(lambda: c.stats()["queued_pairs"] == 6)
        with pytest.raises(Overloaded) as info:
            await c.score(request(builder, 52, 4))
        # Nothing measured yet: the floor.
        assert info.value.retry_after_s == UNMEASURED_RETRY_AFTER_S
        assert info.value.status_code == 429
        assert int(info.value.headers()["Retry-After"]) >= 1
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, queued), 10)

        # Measured now: Retry-After is the queued tokens over the measured token throughput.
        held = await hold_in_flight(c, engine, request(builder, 53, 4))
        queued = asyncio.create_task(c.score(request(builder, 54, 6)))
        await until(lambda: c.stats()["queued_pairs"] == 6)
        with pytest.raises(Overloaded) as info:
            await c.score(request(builder, 55, 4))
        stats = c.stats()
        assert stats["throughput_tokens_per_s"] > 0
        expected = stats["queued_tokens"] / stats["throughput_tokens_per_s"]
        assert info.value.retry_after_s == pytest.approx(
            min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, expected))
        )
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, queued), 10)
    finally:
        await c.close()


async def test_a_request_larger_than_the_queue_limit_is_taken_when_the_queue_is_empty(engine, builder):
    prompts = request(builder, 56, 6)
    c = coalescer(engine, max_wait_ms=0, max_queued_pairs=4, max_batch_pairs=4)
    try:
        answer = await asyncio.wait_for(c.score(prompts), 10)
    finally:
        await c.close()
    assert_close(answer.scores, await alone(engine, prompts))


# --- engine errors ---------------------------------------------------------------------------------


async def test_failed_batch_fails_only_its_own_requests(onnx_engine, builder):
    engine = RecordingEngine(
        onnx_engine, fail=lambda n, _: EngineUnavailable("sidecar down") if n == 1 else None
    )
    first, second = request(builder, 60, 4), request(builder, 61, 4)
    c = coalescer(engine, max_wait_ms=0)
    labels = {"engine": engine.info.name, "kind": "unavailable"}
    before = metrics.REGISTRY.get_sample_value("rerank_engine_errors_total", labels) or 0.0
    try:
        held = await hold_in_flight(c, engine, first)  # the first batch, which will fail
        later = asyncio.create_task(c.score(second))
        await until(lambda: c.stats()["queued_pairs"] == 4)
        engine.gate.set()
        results = await asyncio.gather(held, later, return_exceptions=True)
    finally:
        await c.close()
    assert [len(call) for call in engine.calls] == [4, 4]
    assert isinstance(results[0], ServiceUnavailable)
    assert_close(results[1].scores, await alone(engine, second))
    assert metrics.REGISTRY.get_sample_value("rerank_engine_errors_total", labels) == before + 1


async def test_a_prompt_the_engine_rejects_fails_only_the_request_that_sent_it(onnx_engine, builder):
    poison = "POISON DOCUMENT"

    def reject(_: int, prompts: Sequence[Prompt]) -> Exception | None:
        return EngineRejected("prompt too long") if any(p.document == poison for p in prompts) else None

    engine = RecordingEngine(onnx_engine, fail=reject)
    bad = builder.build("q", [text(70, 4), poison])
    good = request(builder, 71, 3)
    c = coalescer(engine, max_wait_ms=50)
    try:
        results = await asyncio.gather(c.score(bad), c.score(good), return_exceptions=True)
    finally:
        await c.close()
    assert len(engine.calls[0]) == 5  # they shared a batch first
    assert isinstance(results[0], UpstreamFailure)
    assert_close(results[1].scores, await alone(engine, good))


# --- drain, settings, stats ----------------------------------------------------------------------


async def test_drain_refuses_new_work_and_finishes_queued_and_in_flight(engine, builder):
    first, ahead, second = request(builder, 80, 3), request(builder, 83, 3), request(builder, 81, 2)
    c = coalescer(engine, max_wait_ms=60_000, max_batch_pairs=3)
    try:
        held, sent_ahead = await fill_engine(c, engine, first, ahead)
        queued = asyncio.create_task(c.score(second))
        await until(lambda: c.stats()["queued_pairs"] == 2)
        draining = asyncio.create_task(c.drain(30))
        await until(lambda: c.stats()["draining"])
        with pytest.raises(ServiceUnavailable):
            await c.score(request(builder, 82, 1))
        assert not draining.done()
        engine.gate.set()
        await asyncio.wait_for(draining, 30)
        assert held.done()
        assert sent_ahead.done()
        assert queued.done()
    finally:
        await c.close()
    assert_close(held.result().scores, await alone(engine, first))
    assert_close(sent_ahead.result().scores, await alone(engine, ahead))
    assert_close(queued.result().scores, await alone(engine, second))


async def test_from_settings_takes_engine_budgets_unless_set(engine, make_settings):
    info = engine.info
    default = Coalescer.from_settings(engine, make_settings())
    assert (default.max_batch_tokens, default.max_batch_pairs) == (
        info.max_batch_tokens,
        info.max_batch_pairs,
    )
    assert default.max_concurrent_batches == info.max_concurrent_batches
    custom = Coalescer.from_settings(
        engine, make_settings(max_batch_tokens=777, max_batch_pairs=5, max_wait_ms=7.5, max_queued_pairs=9)
    )
    assert (custom.max_batch_tokens, custom.max_batch_pairs, custom.max_wait_ms, custom.max_queued_pairs) == (
        777,
        5,
        7.5,
        9,
    )


async def test_stats_report_batches_and_throughput(engine, builder):
    c = coalescer(engine, max_wait_ms=50)
    try:
        await asyncio.gather(*(c.score(request(builder, seed, 2)) for seed in range(90, 94)))
        stats = c.stats()
    finally:
        await c.close()
    assert stats["batches"] == len(engine.calls)
    assert stats["pairs_scored"] == 8
    assert stats["queued_pairs"] == 0
    assert stats["throughput_tokens_per_s"] > 0
    assert 0 < stats["mean_batch_fill"] <= 1
    assert 0 <= stats["mean_padding_ratio"] < 1


# --- cancelling on client disconnect through a real ASGI app -------------------------------------------


def disconnect_app(c: Coalescer, builder: PromptBuilder) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    @app.post("/score")
    async def score(request: Request, body: dict) -> dict:
        prompts = builder.build(body["query"], body["documents"])
        scored = await run_until_disconnected(request, c.score(prompts))
        return {"scores": scored.scores}

    return app


async def test_client_disconnect_cancels_its_queued_pairs(engine, builder):
    c = coalescer(engine, max_wait_ms=0)
    app = disconnect_app(c, builder)
    body = json.dumps({"query": "gone", "documents": [text(95, 4), text(96, 4)]}).encode()
    left = asyncio.Event()
    sent: list[dict] = []
    pending_body = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if pending_body:
            return pending_body.pop()
        await left.wait()  # the client hangs up here
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/score",
        "raw_path": b"/score",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 18201),
        "server": ("127.0.0.1", 18200),
    }
    before = dropped("client_disconnected")
    try:
        held = await hold_in_flight(c, engine, request(builder, 97, 2))
        call = asyncio.create_task(app(scope, receive, send))
        await until(lambda: c.stats()["queued_pairs"] == 2)
        left.set()
        await asyncio.wait_for(call, 10)
        engine.gate.set()
        await asyncio.wait_for(held, 10)
    finally:
        await c.close()
    assert sent[0]["status"] == ClientDisconnected.status_code
    assert len(engine.calls) == 1
    assert dropped("client_disconnected") == before + 1


async def test_connected_client_gets_its_answer_through_the_disconnect_helper(engine, builder):
    c = coalescer(engine, max_wait_ms=0)
    documents = [text(98, 3), text(99, 5)]
    try:
        transport = httpx.ASGITransport(app=disconnect_app(c, builder))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/score", json={"query": "here", "documents": documents})
    finally:
        await c.close()
    assert response.status_code == 200
    assert_close(response.json()["scores"], await alone(engine, builder.build("here", documents)))
