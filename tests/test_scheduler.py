"""The batching scheduler and admission, on the real ONNX engine serving the tiny prepared model.

The engine is wrapped only to watch it: `RecordingEngine` records the prompts of every call (to count calls
and see batch composition) and can hold a batch at a gate, which plays a deliberately slow engine so the
queue fills deterministically. Every score still comes from onnxruntime, and every batched answer is
compared with the same engine scoring that request alone (fp32 graph: batch-invariant).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import Sequence

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.batching import BatchBudget
from core.contract import Prompt, PromptBuilder
from core.errors import DeadlineExceeded, Overloaded, ShuttingDown
from core.ranking import rank_indices
from engines.base import EngineRejected, EngineUnavailable
from gateway import metrics
from gateway.admission import AdmissionControl, AdmissionMiddleware
from gateway.disconnect import ClientDisconnected, run_until_disconnected
from gateway.errors import GatewayError, from_domain_error
from gateway.scheduler import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, UNMEASURED_RETRY_AFTER_S, Scheduler
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


def scheduler(
    engine, *, max_batch_tokens: int = 1_000_000, max_batch_pairs: int = 1_000, **overrides
) -> Scheduler:
    options = {
        "max_queued_tokens": 10_000_000,
        "max_wait_ms": 20.0,
        "request_timeout_ms": 60_000,
        "budget": BatchBudget(max_batch_tokens, max_batch_pairs, padded=engine.info.padded),
        "observer": metrics.SCHEDULER_OBSERVER,
    }
    options.update(overrides)
    return Scheduler(engine, **options)


def request(builder: PromptBuilder, seed: int, n_docs: int, *, words: int = 6) -> list[Prompt]:
    """One query against `n_docs` documents, all texts unique to `seed`."""
    return builder.build(
        f"question {seed}: {text(seed, 3)}?", [text(seed * 100 + j, words) for j in range(n_docs)]
    )


async def alone(engine: RecordingEngine, prompts: Sequence[Prompt]) -> list[float]:
    """The unbatched answer: the inner engine scoring this request by itself."""
    return (await engine.inner.score(list(prompts))).scores


def assert_close(got: Sequence[float], want: Sequence[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= TOLERANCE, (got, want)


async def hold_in_flight(s: Scheduler, engine: RecordingEngine, prompts: list[Prompt]) -> asyncio.Task:
    """Start a request and wait until its batch sits in the engine, held at the closed gate."""
    engine.gate.clear()
    engine.entered.clear()
    task = asyncio.create_task(s.score(prompts))
    await asyncio.wait_for(engine.entered.wait(), 10)
    return task


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def dropped(reason: str) -> float:
    return sample("rerank_dropped_requests_total", reason=reason)


# --- batching ---------------------------------------------------------------------------------------


async def test_burst_of_requests_is_served_in_fewer_engine_calls_with_each_requests_own_scores(
    engine, builder
):
    requests = [request(builder, seed, 3) for seed in range(12)]
    s = scheduler(engine, max_wait_ms=50)
    try:
        answers = await asyncio.gather(*(s.score(r) for r in requests))
    finally:
        await s.close()
    assert len(engine.calls) < len(requests)
    assert sorted(p.input_ids for p in engine.seen()) == sorted(p.input_ids for r in requests for p in r)
    for prompts, answer in zip(requests, answers, strict=True):
        assert_close(answer.scores, await alone(engine, prompts))
        assert answer.engine == engine.info.name


async def test_batches_are_the_engines_run_size_by_default(engine, builder):
    s = Scheduler(engine, max_wait_ms=0)
    assert s.budget == engine.info.budget
    assert s.max_queued_tokens == 8 * engine.info.max_batch_tokens  # one batch slot on ONNX
    prompts = request(builder, 5, engine.info.max_batch_pairs + 3)
    try:
        answer = await s.score(prompts)
    finally:
        await s.close()
    assert [len(call) for call in engine.calls] == [engine.info.max_batch_pairs, 3]
    assert_close(answer.scores, await alone(engine, prompts))


async def test_batch_flushes_as_soon_as_the_pair_budget_is_full(engine, builder):
    s = scheduler(engine, max_batch_pairs=4, max_wait_ms=60_000)
    singles = [request(builder, seed, 1) for seed in range(4)]
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(s.score(r) for r in singles)), 10)
    finally:
        await s.close()
    assert [len(call) for call in engine.calls] == [4]
    for prompts, answer in zip(singles, answers, strict=True):
        assert_close(answer.scores, await alone(engine, prompts))


async def test_batch_respects_the_padded_token_budget(engine, builder):
    singles = [request(builder, seed, 1) for seed in range(3)] + [request(builder, 3, 1, words=30)]
    longest = max(len(r[0]) for r in singles[:3])
    # Padded cost: the longest row times the rows. Three rows fit exactly, the long fourth does not.
    s = scheduler(engine, max_batch_tokens=longest * 3, max_wait_ms=60_000)
    assert engine.info.padded
    try:
        tasks = [asyncio.create_task(s.score(r)) for r in singles]
        await asyncio.wait_for(asyncio.gather(*tasks[:3]), 10)
        assert not tasks[3].done()  # still waiting for company, not flushed
        assert [len(call) for call in engine.calls] == [3]
        await s.drain(10)  # draining flushes what is left without waiting max_wait_ms
        await asyncio.wait_for(tasks[3], 10)
    finally:
        await s.close()
    for call in engine.calls[:1]:
        assert max(len(p) for p in call) * len(call) <= longest * 3


async def test_lone_request_waits_max_wait_ms_then_flushes(engine, builder):
    prompts = request(builder, 1, 2)
    s = scheduler(engine, max_wait_ms=1_000)
    try:
        task = asyncio.create_task(s.score(prompts))
        await asyncio.sleep(0.1)
        assert engine.calls == []  # budget not full, oldest prompt younger than max_wait_ms
        answer = await asyncio.wait_for(task, 10)
    finally:
        await s.close()
    assert len(engine.calls) == 1
    assert_close(answer.scores, await alone(engine, prompts))


async def test_order_within_a_request_survives_length_sorting(engine, builder):
    lengths = [40, 3, 25, 1, 60, 12, 7, 33]
    prompts = builder.build("how long is this?", [text(500 + i, n) for i, n in enumerate(lengths)])
    s = scheduler(engine, max_wait_ms=0)
    try:
        answer = await s.score(prompts)
    finally:
        await s.close()
    (call,) = engine.calls
    assert [len(p) for p in call] == sorted(len(p) for p in prompts)
    assert [len(p) for p in call] != [len(p) for p in prompts]  # the test really reordered
    assert_close(answer.scores, await alone(engine, prompts))


async def test_only_a_full_batch_is_sent_ahead_to_a_busy_engine(engine, builder):
    s = scheduler(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        held = await hold_in_flight(s, engine, request(builder, 320, 2))
        small = asyncio.create_task(s.score(request(builder, 321, 2)))
        await until(lambda: s.stats()["queued_pairs"] == 2)
        await asyncio.sleep(0.05)
        assert len(engine.calls) == 1  # half a batch waits: it may still gain company or be cancelled
        more = asyncio.create_task(s.score(request(builder, 322, 2)))
        await until(lambda: len(engine.calls) == 2)  # a full one waits at the engine instead
        assert len(engine.calls[1]) == 4
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, small, more), 10)
    finally:
        await s.close()


async def test_identical_pairs_in_one_batch_are_scored_once(engine, builder):
    docs = [text(900, 5), text(901, 9), text(902, 4)]
    first = builder.build("shared query", [docs[0], docs[1], docs[0]])
    second = builder.build("shared query", [docs[1], docs[2]])
    s = scheduler(engine, max_wait_ms=50)
    try:
        a, b = await asyncio.gather(s.score(first), s.score(second))
    finally:
        await s.close()
    (call,) = engine.calls
    assert len(call) == 3
    assert len({p.input_ids for p in call}) == 3
    assert_close(a.scores, await alone(engine, first))
    assert_close(b.scores, await alone(engine, second))
    assert s.stats()["pairs_scored"] == 5
    assert s.stats()["unique_pairs_scored"] == 3


async def test_request_larger_than_a_batch_is_split_and_merged_in_order(engine, builder):
    prompts = request(builder, 7, 10, words=8)
    s = scheduler(engine, max_batch_pairs=4, max_wait_ms=0)
    try:
        answer = await s.score(prompts)
    finally:
        await s.close()
    assert len(engine.calls) >= 3
    assert all(len(call) <= 4 for call in engine.calls)
    want = await alone(engine, prompts)
    assert_close(answer.scores, want)
    assert rank_indices(answer.scores, 3) == rank_indices(want, 3)  # top_n is global, not per batch


async def test_empty_request_needs_no_engine_call(engine):
    s = scheduler(engine)
    try:
        answer = await s.score([])
    finally:
        await s.close()
    assert answer.scores == []
    assert engine.calls == []


# --- fairness -----------------------------------------------------------------------------------------


async def test_small_request_is_answered_within_a_few_batches_behind_a_huge_one(engine, builder):
    huge = request(builder, 600, 40, words=120)  # 40 long prompts, two per batch
    small = request(builder, 601, 2)
    budget = 2 * max(len(p) for p in huge)
    s = scheduler(engine, max_batch_tokens=budget, max_batch_pairs=64, max_wait_ms=0)
    try:
        held = await hold_in_flight(s, engine, huge)  # its first batch runs; 38 prompts stay queued
        small_task = asyncio.create_task(s.score(small))
        await until(lambda: s.stats()["queued_requests"] == 2)
        engine.gate.set()
        await asyncio.wait_for(small_task, 30)
        huge_answer = await asyncio.wait_for(held, 60)
    finally:
        await s.close()
    small_ids = {p.input_ids for p in small}
    (small_call,) = [i for i, call in enumerate(engine.calls) if {p.input_ids for p in call} & small_ids]
    # The held batch, the batch sent ahead before it arrived, at most the one already being formed, then its
    # own: not behind the 38 queued long prompts.
    assert small_call <= 3, [len(c) for c in engine.calls]
    assert_close(small_task.result().scores, await alone(engine, small))
    assert_close(huge_answer.scores, await alone(engine, huge))


async def test_new_requests_and_a_large_served_one_take_turns_starting_batches(engine, builder):
    big = request(builder, 620, 6)
    smalls = [request(builder, 621 + i, 1) for i in range(3)]
    s = scheduler(engine, max_batch_pairs=2, max_wait_ms=0, batches_ahead=0)
    try:
        held = await hold_in_flight(s, engine, big)  # its first batch: 2 of its 6 prompts
        tasks = [asyncio.create_task(s.score(r)) for r in smalls]
        await until(lambda: s.stats()["queued_requests"] == 4)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, *tasks), 10)
    finally:
        await s.close()
    owner = {p.input_ids: "big" for p in big} | {r[0].input_ids: f"s{i}" for i, r in enumerate(smalls)}
    calls = [sorted(owner[p.input_ids] for p in call) for call in engine.calls]
    # The new requests start the next batch (the big one's first batch was its turn), then the big one
    # starts one: a stream of new requests cannot starve it.
    assert calls == [["big", "big"], ["s0", "s1"], ["big", "big"], ["big", "s2"], ["big"]]


async def test_a_prompt_too_long_for_the_rest_of_a_batch_does_not_hold_other_requests(engine, builder):
    long_request = request(builder, 610, 1, words=300)
    shorts = [request(builder, 611 + i, 1) for i in range(3)]
    longest = len(long_request[0])
    assert 3 * max(len(r[0]) for r in shorts) <= longest + 1
    # The long prompt fits a batch alone, but not beside anything (padded cost 2 x longest).
    s = scheduler(engine, max_batch_tokens=longest + 1, max_wait_ms=0, batches_ahead=0)
    try:
        held = await hold_in_flight(s, engine, request(builder, 615, 1))
        tasks = [asyncio.create_task(s.score(r)) for r in (shorts[0], long_request, *shorts[1:])]
        await until(lambda: s.stats()["queued_requests"] == 4)
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, *tasks), 10)
    finally:
        await s.close()
    # The shorts arrived around the long one and run together first; the long one runs alone.
    assert [len(call) for call in engine.calls[1:]] == [3, 1]
    assert engine.calls[2] == tuple(long_request)


# --- cancellation, deadlines, backpressure ------------------------------------------------------------


async def test_cancelled_request_pairs_leave_the_queue_and_never_reach_the_engine(engine, builder):
    blocker, leaver, stayer = (request(builder, seed, 3) for seed in (20, 21, 22))
    s = scheduler(engine, max_wait_ms=0)
    before = dropped("cancelled")
    try:
        held = await hold_in_flight(s, engine, blocker)
        leaving = asyncio.create_task(s.score(leaver))
        staying = asyncio.create_task(s.score(stayer))
        await until(lambda: s.stats()["queued_pairs"] == 6)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        stats = s.stats()
        assert stats["queued_pairs"] == 3
        assert stats["queued_tokens"] == sum(len(p) for p in stayer)
        engine.gate.set()
        await asyncio.wait_for(held, 10)
        answer = await asyncio.wait_for(staying, 10)
    finally:
        await s.close()
    seen = {p.input_ids for p in engine.seen()}
    assert not seen & {p.input_ids for p in leaver}
    assert_close(answer.scores, await alone(engine, stayer))
    assert dropped("cancelled") == before + 1
    assert s.stats()["dropped_pairs"] == 3


class Prompts(list):
    """A request's prompt list that can be watched with a weak reference."""


async def test_abandoned_requests_free_their_queue_memory_at_once(engine, builder):
    s = scheduler(engine, max_wait_ms=0)
    try:
        held = await hold_in_flight(s, engine, request(builder, 699, 2))
        abandoned = [Prompts(request(builder, 700 + i, 8)) for i in range(50)]
        watched = [weakref.ref(r) for r in abandoned]
        tasks = [asyncio.create_task(s.score(r)) for r in abandoned]
        del abandoned
        await until(lambda: s.stats()["queued_pairs"] == 400)
        cancelled = [t.cancel() for t in tasks]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stats = s.stats()
        assert (stats["queued_requests"], stats["queued_pairs"], stats["queued_tokens"]) == (0, 0, 0)
        # The cancellations' tracebacks hold the callers' frames (and so their prompts); the loop's handle
        # that resumed this test holds the gathered outcomes until the next step.
        del tasks, outcomes, cancelled
        await asyncio.sleep(0)
        gc.collect()
        # Nothing in the scheduler still holds the abandoned requests' prompts.
        assert [ref for ref in watched if ref() is not None] == []
        engine.gate.set()
        await asyncio.wait_for(held, 10)
    finally:
        await s.close()
    assert len(engine.calls) == 1


async def test_deadline_passing_in_the_queue_raises_deadline_exceeded(engine, builder):
    blocker, late = request(builder, 40, 2), request(builder, 41, 2)
    s = scheduler(engine, max_wait_ms=0)
    before = dropped("timeout")
    try:
        held = await hold_in_flight(s, engine, blocker)
        with pytest.raises(DeadlineExceeded):
            await s.score(late, deadline_s=time.monotonic() + 0.2)
        assert s.stats()["queued_pairs"] == 0
        engine.gate.set()
        await asyncio.wait_for(held, 10)
        await s.drain(10)
    finally:
        await s.close()
    assert not {p.input_ids for p in engine.seen()} & {p.input_ids for p in late}
    assert dropped("timeout") == before + 1
    assert from_domain_error(DeadlineExceeded("x")).status_code == 503


async def test_request_timeout_ms_is_the_default_deadline(engine, builder):
    s = scheduler(engine, max_wait_ms=0, request_timeout_ms=200)
    try:
        held = await hold_in_flight(s, engine, request(builder, 42, 2))
        with pytest.raises(DeadlineExceeded):
            await s.score(request(builder, 43, 2))
        engine.gate.set()
        # The held request's own 200 ms deadline passed while the engine was held.
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(held, 10)
    finally:
        await s.close()


async def test_full_queue_is_overloaded_with_retry_after_from_the_measured_drain_rate(engine, builder):
    first, queued_req, refused = request(builder, 50, 4), request(builder, 51, 6), request(builder, 52, 4)
    limit = sum(len(p) for p in queued_req) + 1  # the queued request fits, one more does not
    s = scheduler(engine, max_wait_ms=0, max_queued_tokens=limit)
    try:
        held = await hold_in_flight(s, engine, first)  # running: not queued
        queued = asyncio.create_task(s.score(queued_req))
        await until(lambda: s.stats()["queued_pairs"] == 6)
        with pytest.raises(Overloaded) as info:
            await s.score(refused)
        assert info.value.retry_after_s == UNMEASURED_RETRY_AFTER_S  # nothing measured yet: the floor
        http = from_domain_error(info.value)
        assert http.status_code == 429
        assert int(http.headers()["Retry-After"]) >= 1
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, queued), 10)

        # Measured now: Retry-After is the queued tokens over the measured token throughput.
        held = await hold_in_flight(s, engine, request(builder, 53, 4))
        queued = asyncio.create_task(s.score(request(builder, 54, 6)))
        await until(lambda: s.stats()["queued_pairs"] == 6)
        with pytest.raises(Overloaded) as info:
            await s.score(request(builder, 55, 4))
        stats = s.stats()
        assert stats["throughput_tokens_per_s"] > 0
        expected = stats["queued_tokens"] / stats["throughput_tokens_per_s"]
        assert info.value.retry_after_s == pytest.approx(
            min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, expected))
        )
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, queued), 10)
    finally:
        await s.close()
    assert s.stats()["rejected_requests"] == 2


async def test_queue_refuses_work_it_cannot_drain_within_max_queue_delay_ms(engine, builder):
    s = scheduler(engine, max_wait_ms=0, max_queue_delay_ms=1.0)
    try:
        await s.score(request(builder, 57, 2))  # measures a throughput
        assert s.throughput_tokens_per_s() > 0
        held = await hold_in_flight(s, engine, request(builder, 58, 2))
        queued = asyncio.create_task(s.score(request(builder, 59, 64, words=40)))
        await until(lambda: s.stats()["queued_pairs"] == 64)
        assert s.drain_time_s() > 0.001
        assert s.is_full()  # what admission asks before reading a body
        before = sample("rerank_rejected_requests_total", reason="drain_time")
        with pytest.raises(Overloaded, match="RERANK_MAX_QUEUE_DELAY_MS"):
            await s.score(request(builder, 60, 1))
        assert sample("rerank_rejected_requests_total", reason="drain_time") == before + 1
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(held, queued), 30)
        assert not s.is_full()  # the queue drained
        # Requests still being read and tokenized count as the mean admitted request: a burst is refused
        # before its bodies are parsed, not after.
        assert s.callers == 0
        assert s.is_full(arriving=100)
    finally:
        await s.close()


async def test_a_request_larger_than_the_queue_limit_is_taken_when_the_queue_is_empty(engine, builder):
    prompts = request(builder, 56, 6)
    s = scheduler(engine, max_wait_ms=0, max_queued_tokens=4, max_batch_pairs=4)
    try:
        answer = await asyncio.wait_for(s.score(prompts), 10)
    finally:
        await s.close()
    assert_close(answer.scores, await alone(engine, prompts))


# --- engine errors ---------------------------------------------------------------------------------


async def test_failed_batch_fails_only_its_own_requests(onnx_engine, builder):
    engine = RecordingEngine(
        onnx_engine, fail=lambda n, _: EngineUnavailable("sidecar down") if n == 1 else None
    )
    first, second = request(builder, 60, 4), request(builder, 61, 4)
    s = scheduler(engine, max_wait_ms=0)
    labels = {"engine": engine.info.name, "kind": "unavailable"}
    before = sample("rerank_engine_errors_total", **labels)
    try:
        held = await hold_in_flight(s, engine, first)  # the first batch, which will fail
        later = asyncio.create_task(s.score(second))
        await until(lambda: s.stats()["queued_pairs"] == 4)
        engine.gate.set()
        results = await asyncio.gather(held, later, return_exceptions=True)
    finally:
        await s.close()
    assert [len(call) for call in engine.calls] == [4, 4]
    assert isinstance(results[0], EngineUnavailable)
    assert_close(results[1].scores, await alone(engine, second))
    assert sample("rerank_engine_errors_total", **labels) == before + 1


async def test_a_prompt_the_engine_rejects_fails_only_the_request_that_sent_it(onnx_engine, builder):
    poison = "POISON DOCUMENT"

    def reject(_: int, prompts: Sequence[Prompt]) -> Exception | None:
        return EngineRejected("prompt too long") if any(p.document == poison for p in prompts) else None

    engine = RecordingEngine(onnx_engine, fail=reject)
    bad = builder.build("q", [text(70, 4), poison])
    good = request(builder, 71, 3)
    s = scheduler(engine, max_wait_ms=50)
    try:
        results = await asyncio.gather(s.score(bad), s.score(good), return_exceptions=True)
    finally:
        await s.close()
    assert len(engine.calls[0]) == 5  # they shared a batch first
    assert isinstance(results[0], EngineRejected)
    assert_close(results[1].scores, await alone(engine, good))


# --- drain, stats, metrics ---------------------------------------------------------------------------


async def test_drain_refuses_new_work_and_finishes_queued_and_running(engine, builder):
    first, ahead, second = request(builder, 80, 3), request(builder, 83, 3), request(builder, 81, 2)
    s = scheduler(engine, max_wait_ms=60_000, max_batch_pairs=3)
    try:
        held = await hold_in_flight(s, engine, first)
        sent_ahead = asyncio.create_task(s.score(ahead))
        await until(lambda: len(engine.calls) == 2)
        queued = asyncio.create_task(s.score(second))
        await until(lambda: s.stats()["queued_pairs"] == 2)
        draining = asyncio.create_task(s.drain(30))
        await until(lambda: s.stats()["draining"])
        assert s.is_full()  # admission refuses before any work
        with pytest.raises(ShuttingDown):
            await s.score(request(builder, 82, 1))
        assert not draining.done()
        engine.gate.set()
        await asyncio.wait_for(draining, 30)
        assert all(t.done() for t in (held, sent_ahead, queued))
    finally:
        await s.close()
    assert_close(held.result().scores, await alone(engine, first))
    assert_close(sent_ahead.result().scores, await alone(engine, ahead))
    assert_close(queued.result().scores, await alone(engine, second))


async def test_close_fails_queued_requests_with_shutting_down(engine, builder):
    s = scheduler(engine, max_wait_ms=0)
    held = await hold_in_flight(s, engine, request(builder, 85, 2))
    queued = asyncio.create_task(s.score(request(builder, 86, 2)))
    await until(lambda: s.stats()["queued_pairs"] == 2)
    await s.close()
    engine.gate.set()
    results = await asyncio.gather(held, queued, return_exceptions=True)
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert from_domain_error(ShuttingDown("x")).status_code == 503


async def test_stats_and_metrics_report_batches_and_throughput(engine, builder):
    name = engine.info.name
    batches_before = sample("rerank_batch_size_pairs_count", engine=name)
    s = scheduler(engine, max_wait_ms=50)
    try:
        await asyncio.gather(*(s.score(request(builder, seed, 2)) for seed in range(90, 94)))
        stats = s.stats()
    finally:
        await s.close()
    assert stats["batches"] == len(engine.calls)
    assert stats["pairs_scored"] == 8
    assert stats["queued_pairs"] == 0
    assert stats["throughput_tokens_per_s"] > 0
    assert 0 < stats["mean_batch_fill"] <= 1
    assert 0 <= stats["mean_padding_ratio"] < 1
    assert sample("rerank_batch_size_pairs_count", engine=name) == batches_before + len(engine.calls)
    assert sample("rerank_queue_depth_tokens", engine=name) == 0


# --- cancelling on client disconnect through a real ASGI app -------------------------------------------


def disconnect_app(s: Scheduler, builder: PromptBuilder) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    @app.post("/score")
    async def score(request: Request, body: dict) -> dict:
        prompts = builder.build(body["query"], body["documents"])
        scored = await run_until_disconnected(request, s.score(prompts))
        return {"scores": scored.scores}

    return app


def http_scope(path: str, body: bytes, method: str = "POST") -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 18201),
        "server": ("127.0.0.1", 18200),
    }


async def test_client_disconnect_removes_its_queued_pairs(engine, builder):
    s = scheduler(engine, max_wait_ms=0)
    app = disconnect_app(s, builder)
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

    before = dropped("client_disconnected")
    try:
        held = await hold_in_flight(s, engine, request(builder, 97, 2))
        call = asyncio.create_task(app(http_scope("/score", body), receive, send))
        await until(lambda: s.stats()["queued_pairs"] == 2)
        left.set()
        await asyncio.wait_for(call, 10)
        assert s.stats()["queued_pairs"] == 0
        engine.gate.set()
        await asyncio.wait_for(held, 10)
    finally:
        await s.close()
    assert sent[0]["status"] == ClientDisconnected.status_code
    assert len(engine.calls) == 1
    assert dropped("client_disconnected") == before + 1


async def test_connected_client_gets_its_answer_through_the_disconnect_helper(engine, builder):
    s = scheduler(engine, max_wait_ms=0)
    documents = [text(98, 3), text(99, 5)]
    try:
        transport = httpx.ASGITransport(app=disconnect_app(s, builder))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/score", json={"query": "here", "documents": documents})
    finally:
        await s.close()
    assert response.status_code == 200
    assert_close(response.json()["scores"], await alone(engine, builder.build("here", documents)))


# --- admission in the real app: 429 before the body is read, probes never blocked -------------------


class Served:
    """The gateway app (its lifespan run) over a watched engine, called as ASGI."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    async def call_unread(
        self, path: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> tuple[list[dict], int]:
        """POST `body` as raw ASGI; returns the messages sent and how often the app asked for the body."""
        reads = 0
        sent: list[dict] = []

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = http_scope(path, body)
        scope["headers"] = [*scope["headers"], *headers]
        await self.app(scope, receive, send)
        return sent, reads

    async def hold_one_queue_one(
        self, engine: RecordingEngine, seed: int
    ) -> tuple[list[asyncio.Task], Scheduler]:
        """One request held in the engine, a second one waiting in the (then non-empty) queue."""
        engine.gate.clear()
        engine.entered.clear()
        running = asyncio.create_task(self.client.post("/v1/rerank", json=rerank_body(seed, 2)))
        await asyncio.wait_for(engine.entered.wait(), 10)
        # An empty queue takes any request: this one waits in the queue.
        queued = asyncio.create_task(self.client.post("/rerank", json=rerank_body(seed + 1, 2)))
        scheduler = self.app.state.admission.queue
        await until(lambda: scheduler.queued_tokens > 0)
        return [running, queued], scheduler


@pytest_asyncio.fixture(loop_scope="module")
async def served(engine, tiny_model_dir, make_settings):
    from gateway.app import create_app

    apps: list[tuple[FastAPI, object]] = []

    async def make(**overrides) -> Served:
        settings = make_settings(estimated_max=12.0, max_wait_ms=0, **overrides)
        app = create_app(settings, model_dir=tiny_model_dir, engine=engine)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        apps.append((app, lifespan))
        return Served(app)

    yield make
    engine.gate.set()
    for _, lifespan in reversed(apps):
        await lifespan.__aexit__(None, None, None)


def rerank_body(seed: int, n_docs: int) -> dict:
    return {"query": f"question {seed}", "documents": [text(seed * 10 + j, 5) for j in range(n_docs)]}


async def test_requests_over_max_active_requests_get_429_before_the_body_is_read(served, engine):
    server = await served(max_active_requests=2)
    before = sample("rerank_rejected_requests_total", reason="active_requests")
    engine.gate.clear()
    engine.entered.clear()
    inside = [asyncio.create_task(server.client.post("/v1/rerank", json=rerank_body(s, 3))) for s in (1, 2)]
    await asyncio.wait_for(engine.entered.wait(), 10)
    await until(lambda: server.app.state.admission.active == 2)

    started = time.perf_counter()
    sent, reads = await server.call_unread("/v1/rerank", json.dumps(rerank_body(3, 3)).encode())
    elapsed_s = time.perf_counter() - started
    assert reads == 0  # refused before the body was read
    assert sent[0]["status"] == 429
    headers = dict(sent[0]["headers"])
    assert int(headers[b"retry-after"]) >= 1
    error = json.loads(sent[1]["body"])["error"]
    assert (error["type"], error["code"]) == ("overloaded", "overloaded")
    assert "RERANK_MAX_ACTIVE_REQUESTS" in error["message"]
    assert elapsed_s < 1.0  # a bound for "it did not wait for the engine", not a speed target
    assert sample("rerank_rejected_requests_total", reason="active_requests") == before + 1

    # Probes and scrapes are never admission-controlled, and answer while the engine is held.
    for path in ("/health", "/metrics"):
        response = await asyncio.wait_for(server.client.get(path), 5)
        assert response.status_code == 200, path
    engine.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*inside), 30)
    assert [r.status_code for r in responses] == [200, 200]
    assert server.app.state.admission.active == 0


async def test_a_full_queue_answers_429_before_the_body_is_read(served, engine):
    server = await served(max_queued_tokens=1)
    before = sample("rerank_rejected_requests_total", reason="queue_full")
    busy, _ = await server.hold_one_queue_one(engine, 11)

    sent, reads = await server.call_unread("/v2/rerank", json.dumps(rerank_body(13, 2)).encode())
    assert (sent[0]["status"], reads) == (429, 0)
    assert "RERANK_MAX_QUEUED_TOKENS" in json.loads(sent[1]["body"])["error"]["message"]
    assert sample("rerank_rejected_requests_total", reason="queue_full") == before + 1
    assert (await server.client.get("/ready")).status_code == 200
    engine.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*busy), 30)
    assert [r.status_code for r in responses] == [200, 200]


async def test_every_dialects_route_is_admission_controlled_and_refused_in_its_own_shape(served, engine):
    from gateway import dialects

    server = await served(max_queued_tokens=1)
    busy, _ = await server.hold_one_queue_one(engine, 31)
    body = json.dumps(rerank_body(33, 2)).encode()
    for path in dialects.PATHS:
        sent, reads = await server.call_unread(path, body)
        assert (sent[0]["status"], reads) == (429, 0), path
        payload = json.loads(sent[1]["body"])
        assert payload == dialects.route_dialect(path, {}).error_body(from_body_error(payload, path)), path
    # TEI clients are told apart by the body, which is not read: the dialect header picks TEI's shape.
    sent, _ = await server.call_unread("/rerank", body, ((b"x-rerank-dialect", b"tei"),))
    payload = json.loads(sent[1]["body"])
    assert payload["error_type"] == "Overloaded"
    assert "RERANK_MAX_QUEUED_TOKENS" in payload["error"]
    engine.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*busy), 30)
    assert [r.status_code for r in responses] == [200, 200]


def from_body_error(payload: dict, path: str):
    """The Overloaded error a 429 body was rendered from (its message is the one the body carries)."""
    from gateway.errors import Overloaded as HttpOverloaded

    message = payload["error"]["message"] if isinstance(payload["error"], dict) else payload["error"]
    assert "RERANK_MAX_QUEUED_TOKENS" in message, path
    return HttpOverloaded(message, retry_after_s=1.0)


async def test_an_overloaded_scheduler_answers_429_in_the_error_shape(served, engine):
    server = await served(max_queued_tokens=1)
    busy, scheduler = await server.hold_one_queue_one(engine, 21)
    # Past the middleware's cheap check (as if the request had entered just before), the scheduler refuses.
    with pytest.raises(Overloaded):
        scheduler.admit(1)
    server.app.state.admission.queue = None
    response = await server.client.post("/v1/rerank", json=rerank_body(23, 2))
    server.app.state.admission.queue = scheduler
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "overloaded"
    assert int(response.headers["retry-after"]) >= 1
    engine.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*busy), 30)
    assert [r.status_code for r in responses] == [200, 200]


# --- the admission middleware's count ------------------------------------------------------------------

RERANK_SCOPE = {"type": "http", "method": "POST", "path": "/v1/rerank", "headers": []}


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_a_request_stops_counting_as_active_when_its_answer_goes_out():
    """A client that sends its next request the moment it has an answer must not find the finished request
    still counted as arriving: a sequential client got 429 from an empty queue that way (vllm tier, CI)."""
    control = AdmissionControl(max_active_requests=4)
    seen: list[tuple[str, int]] = []

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        await send({"type": "http.response.body", "body": b"}"})
        seen.append(("returned", control.active))  # the app still runs after its answer went out

    async def send(message) -> None:
        seen.append((message["type"], control.active))

    await AdmissionMiddleware(app, control=control)(RERANK_SCOPE, _receive, send)
    assert seen == [
        ("http.response.start", 1),
        ("http.response.body", 1),
        ("http.response.body", 0),
        ("returned", 0),
    ]
    assert control.active == 0


async def test_a_request_whose_app_fails_stops_counting_too():
    control = AdmissionControl(max_active_requests=4)

    async def app(scope, receive, send) -> None:
        raise RuntimeError("boom")

    async def send(message) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(RuntimeError, match="boom"):
        await AdmissionMiddleware(app, control=control)(RERANK_SCOPE, _receive, send)
    assert control.active == 0
