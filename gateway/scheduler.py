"""The batching scheduler: a token-budgeted queue of requests, served fairly in engine-run-sized batches.

- Admission: `score` refuses work (Overloaded, with a Retry-After from the measured drain rate) when the
  queued tokens would pass `max_queued_tokens`, or when the queue already holds more than the engine drains
  within a request's deadline. The HTTP edge asks the same numbers (`is_full`) before it reads a body.
- The queue holds requests, each with its prompts not yet sent. A caller that goes away (cancelled,
  deadline) takes its entries out at once, so the queue's memory follows the live queue.
- Fairness: a batch is filled request by request; batches start alternately with the requests not served
  yet (arrival order) and with those already served (round robin: a request that gave prompts moves to the
  back). A request too large for the rest of a batch is skipped for that batch, so a 2-document request is
  not held behind 1,000 long prompts of another one.
- A full batch is also sent ahead to a busy engine while batches are short (AHEAD_UNDER_S).
- Batches are the engine's run size (`EngineInfo.budget`, cost by `core.batching.batch_cost`; each request's
  prompts are taken in the order `core.batching.plan_batches` gives), so a cancelled request's work stops at
  the next run. Identical prompts in a batch are scored once. A batch the engine rejects is retried request
  by request, so one bad prompt fails only the request that sent it.

The scheduler raises domain errors (`core.errors`) and engine errors (`engines.base`), never HTTP errors, and
reports what it does through a `SchedulerObserver` (the HTTP edge turns that into Prometheus metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.batching import BatchBudget, batch_cost, plan_batches
from core.contract import Prompt
from core.errors import DeadlineExceeded, Overloaded, ShuttingDown
from engines.base import (
    Engine,
    EngineError,
    EngineFailure,
    EngineRejected,
    Scored,
    error_kind,
)

log = logging.getLogger(__name__)

# Retry-After when no batch has been measured yet: long enough for a first batch on a CPU.
UNMEASURED_RETRY_AFTER_S = 1.0
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
# Throughput is measured over the most recent batches, so it follows load and engine changes.
THROUGHPUT_WINDOW_BATCHES = 32
# A full batch is sent ahead to a busy engine only while batches take less than this: the hop back to the
# event loop it saves (up to the GIL's 5 ms switch interval) matters for short batches, and a long batch sent
# ahead would make a newly arrived small request wait for two long batches instead of one.
AHEAD_UNDER_S = 0.05
# Weight of each admitted request in the moving mean of request sizes (admission's estimate for requests
# still being read and tokenized).
MEAN_REQUEST_WEIGHT = 0.05
# Default queue budget: this many full engine runs per concurrent batch slot.
DEFAULT_QUEUED_RUNS = 8
# Cancellation reasons counted as their own `dropped` reason (bounded label values).
KNOWN_CANCEL_REASONS = frozenset({"client_disconnected", "shutdown"})


class SchedulerObserver(Protocol):
    """What the scheduler reports; gateway.metrics implements it with Prometheus metrics."""

    def queue_changed(self, engine: str, entries: int, tokens: int) -> None:
        """The queue now holds `entries` prompts of `tokens` tokens."""

    def batch_started(self, engine: str, waited_s: Sequence[float]) -> None:
        """A batch went to the engine; how long each of its entries waited in the queue."""

    def batch_finished(
        self, engine: str, *, rows: int, tokens: int, padded_tokens: int, padded: bool, seconds: float
    ) -> None:
        """A batch of `rows` unique prompts (`tokens` real tokens) was scored in `seconds`."""

    def request_dropped(self, reason: str) -> None:
        """A request left before all its prompts were scored (timeout, cancelled, client_disconnected...)."""

    def request_rejected(self, reason: str) -> None:
        """A request was refused at admission (queue_tokens, drain_time)."""

    def engine_failed(self, engine: str, kind: str) -> None:
        """An engine call failed (unavailable, timeout, rejected, failure)."""


class NullObserver:
    """Reports nowhere (tests, benchmarks, library use)."""

    def queue_changed(self, engine: str, entries: int, tokens: int) -> None:
        pass

    def batch_started(self, engine: str, waited_s: Sequence[float]) -> None:
        pass

    def batch_finished(
        self, engine: str, *, rows: int, tokens: int, padded_tokens: int, padded: bool, seconds: float
    ) -> None:
        pass

    def request_dropped(self, reason: str) -> None:
        pass

    def request_rejected(self, reason: str) -> None:
        pass

    def engine_failed(self, engine: str, kind: str) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's prompts: what is still queued, the result slots, and the future the caller awaits."""

    prompts: Sequence[Prompt]
    future: asyncio.Future[Scored]
    pending: deque[int]  # indices not yet sent to the engine, in plan order
    queued_tokens: int
    enqueued_s: float
    scores: list[float]
    remaining: int  # prompts not yet scored
    engines: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.future.done()


@dataclass(slots=True)
class _Batch:
    """Unique prompts sorted by length, and the (request, index) entries each one answers."""

    prompts: list[Prompt]
    owners: list[list[tuple[_Request, int]]]
    entries: int
    tokens: int  # entry tokens, duplicates counted (what left the queue)

    @property
    def padded_tokens(self) -> int:
        return len(self.prompts[-1]) * len(self.prompts)

    def requests(self) -> list[_Request]:
        return list(dict.fromkeys(r for group in self.owners for r, _ in group))


def _make_batch(groups: dict[tuple[int, ...], list[tuple[_Request, int]]]) -> _Batch:
    rows = sorted(groups.values(), key=lambda group: len(group[0][0].prompts[group[0][1]]))
    prompts = [group[0][0].prompts[group[0][1]] for group in rows]
    tokens = sum(len(r.prompts[i]) for group in rows for r, i in group)
    return _Batch(prompts, rows, sum(len(g) for g in rows), tokens)


@dataclass(frozen=True, slots=True)
class _BatchRecord:
    started_s: float
    finished_s: float
    tokens: int


class Scheduler:
    """Queues `score` calls' prompts and serves them in fair, engine-run-sized batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_queued_tokens: int | None = None,
        max_wait_ms: float = 2.0,
        request_timeout_ms: int = 60_000,
        max_queue_delay_ms: float | None = None,
        budget: BatchBudget | None = None,
        batches_ahead: int = 1,
        observer: SchedulerObserver | None = None,
    ) -> None:
        """`budget` defaults to the engine's run budget; `max_queued_tokens` to DEFAULT_QUEUED_RUNS of it
        per concurrent batch. Once a throughput is measured, the queue also refuses work while what it holds
        takes longer than `max_queue_delay_ms` to drain (unset: the request timeout). `batches_ahead` full
        batches may wait at a busy engine, so it starts the next one the moment it is free (a partial batch
        waits in the queue, where it can still gain company)."""
        info = engine.info
        self.budget = budget or info.budget
        self.max_concurrent_batches = max(1, info.max_concurrent_batches)
        if max_queued_tokens is None:
            max_queued_tokens = DEFAULT_QUEUED_RUNS * self.budget.max_tokens * self.max_concurrent_batches
        for name, value in (
            ("max_queued_tokens", max_queued_tokens),
            ("request_timeout_ms", request_timeout_ms),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_wait_ms < 0 or batches_ahead < 0:
            raise ValueError("max_wait_ms and batches_ahead must be 0 or more")
        self._engine = engine
        self.engine_name = info.name
        self.max_queued_tokens = max_queued_tokens
        self.max_wait_ms = float(max_wait_ms)
        self.request_timeout_ms = request_timeout_ms
        delay_ms = min(max_queue_delay_ms or request_timeout_ms, request_timeout_ms)
        self.max_queue_delay_s = delay_ms / 1000.0
        self.batches_ahead = batches_ahead
        self._observer: SchedulerObserver = observer or NullObserver()

        # Requests with entries still queued: those never served yet (in arrival order), and those served
        # at least once (in round-robin order: a request that gave prompts to a batch moves to the back).
        self._fresh: OrderedDict[_Request, None] = OrderedDict()
        self._served: OrderedDict[_Request, None] = OrderedDict()
        # Whether the last batch started with a request not served before, and which one (its id only: a
        # reference would keep a withdrawn request's prompts alive).
        self._last_started_fresh = False
        self._last_starter = 0
        self._queued_entries = 0
        self._queued_tokens = 0
        self._running = 0
        self._draining = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

        self._history: deque[_BatchRecord] = deque(maxlen=THROUGHPUT_WINDOW_BATCHES)
        self._throughput: float | None = None  # recomputed when a batch ends: admission reads it per request
        self._mean_request_tokens = 0.0  # moving mean over admitted requests
        self._callers = 0
        self._last_batch_s = 0.0
        self._batches = 0
        self._failed_batches = 0
        self._entries_scored = 0
        self._unique_scored = 0
        self._dropped_entries = 0
        self._rejected = 0
        self._fill_sum = 0.0
        self._padding_sum = 0.0
        self._observer.queue_changed(self.engine_name, 0, 0)

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to start: batches are launched by arrivals, finished batches and a flush timer."""

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work and finish what is queued and running, waiting at most `timeout_s`."""
        self._draining = True
        self._pump()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            log.warning(
                "drain timed out after %.1f s with %d prompts queued and %d batches running",
                timeout_s,
                self._queued_entries,
                self._running,
            )

    async def close(self) -> None:
        """Stop: running batches are cancelled, queued requests fail with ShuttingDown."""
        self._draining = self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel("shutdown")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        error = ShuttingDown("the gateway is shutting down; retry on another replica")
        for request in [*self._fresh, *self._served]:
            self._fail_request(request, error)
        self._check_idle()

    # --- the caller's side -------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def callers(self) -> int:
        """`score` calls in progress (queued, or waiting on a running batch)."""
        return self._callers

    def is_full(self, arriving: int = 0) -> bool:
        """True when no request could be admitted now (the cheap check the HTTP edge makes first).

        `arriving` requests are on their way (read, parsed, tokenized, not yet queued): each counts as the
        mean request admitted so far, so that a burst is not admitted past the queue only to be refused
        after its tokenization.
        """
        if self._draining:
            return True
        tokens = self._queued_tokens + arriving * self._mean_request_tokens
        if tokens >= self.max_queued_tokens:
            return True
        throughput = self._throughput
        return throughput is not None and tokens / throughput > self.max_queue_delay_s

    def admit(self, tokens: int) -> None:
        """Raise Overloaded unless a request of `tokens` tokens fits the queue now."""
        queued = self._queued_tokens
        if not queued:
            return  # an empty queue takes any request, or one larger than the queue could never run
        if queued + tokens > self.max_queued_tokens:
            self._reject("queue_tokens")
            raise Overloaded(
                f"the queue holds {queued} tokens and this request adds {tokens}, over the limit of "
                f"{self.max_queued_tokens} (RERANK_MAX_QUEUED_TOKENS); retry later or send fewer documents",
                retry_after_s=self.retry_after_s(),
            )
        drain_s = self.drain_time_s()
        if drain_s is not None and drain_s > self.max_queue_delay_s:
            self._reject("drain_time")
            raise Overloaded(
                f"the queued work takes about {drain_s:.2f} s at the measured rate, longer than a request "
                f"may wait in the queue ({self.max_queue_delay_s * 1000:.0f} ms, RERANK_MAX_QUEUE_DELAY_MS); "
                "retry later",
                retry_after_s=self.retry_after_s(),
            )

    async def score(self, prompts: Sequence[Prompt], *, deadline_s: float | None = None) -> Scored:
        """Raw scores for `prompts` in their order, batched with other callers' prompts.

        `deadline_s` is an absolute `time.monotonic()` time; unset, it is now + request_timeout_ms.
        """
        if self._draining:
            raise ShuttingDown("the gateway is shutting down and takes no new work; retry shortly")
        if not prompts:
            return Scored(scores=[], engine=self.engine_name)
        now = time.monotonic()
        if deadline_s is None:
            deadline_s = now + self.request_timeout_ms / 1000.0
        if deadline_s <= now:
            raise DeadlineExceeded("the request's deadline passed before it could be queued")
        lengths = [len(p) for p in prompts]
        tokens = sum(lengths)
        self.admit(tokens)
        order = deque(i for run in plan_batches(lengths, self.budget) for i in run)
        n = len(prompts)
        request = _Request(
            prompts=prompts,
            future=asyncio.get_running_loop().create_future(),
            pending=order,
            queued_tokens=tokens,
            enqueued_s=now,
            scores=[0.0] * n,
            remaining=n,
        )
        self._fresh[request] = None
        self._queued_entries += n
        self._queued_tokens += tokens
        self._idle.clear()
        self._queue_changed()
        self._mean_request_tokens += (tokens - self._mean_request_tokens) * MEAN_REQUEST_WEIGHT
        self._callers += 1
        self._pump()
        try:
            return await asyncio.wait_for(request.future, timeout=deadline_s - time.monotonic())
        except asyncio.TimeoutError:
            self._withdraw(request, "timeout")
            raise DeadlineExceeded(
                "the request was not scored before its deadline "
                f"(request_timeout_ms={self.request_timeout_ms} unless the caller set one); "
                "retry later or send fewer documents"
            ) from None
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args and exc.args[0] in KNOWN_CANCEL_REASONS else "cancelled"
            self._withdraw(request, reason)
            raise
        finally:
            self._callers -= 1

    def throughput_tokens_per_s(self) -> float | None:
        """Tokens scored per second of engine time over the recent batches, or None before the first."""
        return self._throughput

    def drain_time_s(self) -> float | None:
        """How long the queued tokens take at the measured throughput (None before any measurement)."""
        throughput = self.throughput_tokens_per_s()
        return None if throughput is None else self._queued_tokens / throughput

    def retry_after_s(self) -> float:
        """The drain time, clamped (a floor when nothing is measured yet)."""
        drain_s = self.drain_time_s()
        if drain_s is None:
            return UNMEASURED_RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, drain_s))

    def stats(self) -> dict:
        """Queue, running batches, measured throughput and batch quality."""
        batches = max(1, self._batches)
        return {
            "engine": self.engine_name,
            "accepting": not self._draining,
            "draining": self._draining,
            "queued_requests": len(self._fresh) + len(self._served),
            "callers": self._callers,
            "queued_pairs": self._queued_entries,
            "queued_tokens": self._queued_tokens,
            "max_queued_tokens": self.max_queued_tokens,
            "max_queue_delay_ms": self.max_queue_delay_s * 1000.0,
            "running_batches": self._running,
            "max_concurrent_batches": self.max_concurrent_batches,
            "max_batch_tokens": self.budget.max_tokens,
            "max_batch_pairs": self.budget.max_rows,
            "max_wait_ms": self.max_wait_ms,
            "throughput_tokens_per_s": self.throughput_tokens_per_s(),
            "retry_after_s": self.retry_after_s(),
            "batches": self._batches,
            "failed_batches": self._failed_batches,
            "pairs_scored": self._entries_scored,
            "unique_pairs_scored": self._unique_scored,
            "dropped_pairs": self._dropped_entries,
            "rejected_requests": self._rejected,
            "mean_batch_fill": self._fill_sum / batches,
            "mean_padding_ratio": self._padding_sum / batches,
        }

    # --- queue bookkeeping ---------------------------------------------------------------------------

    def _queue_changed(self) -> None:
        self._observer.queue_changed(self.engine_name, self._queued_entries, self._queued_tokens)

    def _reject(self, reason: str) -> None:
        self._rejected += 1
        self._observer.request_rejected(reason)

    def _withdraw(self, request: _Request, reason: str | None) -> None:
        """Take a request's queued entries out of the queue (its running ones are ignored when they end)."""
        if request in self._fresh or request in self._served:
            self._fresh.pop(request, None)
            self._served.pop(request, None)
            left = len(request.pending)
            self._queued_entries -= left
            self._queued_tokens -= request.queued_tokens
            self._dropped_entries += left if reason else 0
            request.pending.clear()
            request.queued_tokens = 0
            self._queue_changed()
            self._check_idle()
        if reason is not None:
            self._observer.request_dropped(reason)

    def _fail_request(self, request: _Request, error: BaseException) -> None:
        self._withdraw(request, None)
        if request.live:
            request.future.set_exception(error)

    def _check_idle(self) -> None:
        if not self._fresh and not self._served and not self._running:
            self._idle.set()

    def _busy_s(self) -> float:
        """Engine time over the recent batches (overlapping batches counted once)."""
        busy_s = 0.0
        end_s = -math.inf
        for record in sorted(self._history, key=lambda r: r.started_s):
            start_s = max(record.started_s, end_s)
            if record.finished_s > start_s:
                busy_s += record.finished_s - start_s
            end_s = max(end_s, record.finished_s)
        return busy_s

    # --- forming and launching batches ---------------------------------------------------------------

    def _pump(self) -> None:
        """Launch every batch that should start now; otherwise arm the flush timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while (self._fresh or self._served) and not self._closed:
            running = self._running
            ahead = self.batches_ahead if self._short_batches() else 0
            if running >= self.max_concurrent_batches + ahead:
                return
            full = (
                self._queued_tokens >= self.budget.max_tokens or self._queued_entries >= self.budget.max_rows
            )
            if running >= self.max_concurrent_batches and not full:
                return  # a finishing batch pumps again
            if not (full or self._draining):
                oldest_s = min(r.enqueued_s for r in (*self._fresh, *self._served))
                wait_s = oldest_s + self.max_wait_ms / 1000.0 - time.monotonic()
                if wait_s > 0:
                    self._timer = asyncio.get_running_loop().call_later(wait_s, self._pump)
                    return
            self._launch(self._take())

    def _short_batches(self) -> bool:
        """Whether the last batch, and a full batch at the measured rate, take less than AHEAD_UNDER_S."""
        throughput = self._throughput
        full_s = self.budget.max_tokens / throughput if throughput else 0.0
        return max(self._last_batch_s, full_s) < AHEAD_UNDER_S

    def _take(self) -> _Batch:
        """The next batch: requests in turn, each giving prompts while they fit the run budget.

        Batches start alternately with the requests never served yet (so a small request that just came is
        not held behind a quantum of every large one) and with those already served (so a stream of new
        requests cannot starve a large one).
        """
        budget = self.budget
        lengths: list[int] = []
        groups: dict[tuple[int, ...], list[tuple[_Request, int]]] = {}
        served: list[_Request] = []
        fresh, served_before = list(self._fresh), list(self._served)
        # Served requests take the next start after a fresh one did, unless that fresh one is their head
        # (a request's first batch was its own turn).
        fresh_had_turn = (
            bool(fresh and served_before)
            and self._last_started_fresh
            and id(served_before[0]) != self._last_starter
        )
        order = served_before + fresh if fresh_had_turn else fresh + served_before
        self._last_started_fresh = bool(fresh) and order[0] is fresh[0]
        self._last_starter = id(order[0])
        for request in order:
            gave = False
            while request.pending:
                i = request.pending[0]
                prompt = request.prompts[i]
                group = groups.get(prompt.input_ids)
                if group is None:  # a duplicate costs nothing
                    if len(lengths) >= budget.max_rows:
                        break
                    lengths.append(len(prompt))
                    # The first prompt always goes: one longer than the whole budget runs alone.
                    if len(lengths) > 1 and batch_cost(lengths, budget.padded) > budget.max_tokens:
                        lengths.pop()
                        break
                    group = groups[prompt.input_ids] = []
                request.pending.popleft()
                request.queued_tokens -= len(prompt)
                group.append((request, i))
                gave = True
            if gave:
                served.append(request)
            if len(lengths) >= budget.max_rows:
                break
        for request in served:
            self._fresh.pop(request, None)
            self._served.pop(request, None)
            if request.pending:
                self._served[request] = None
        batch = _make_batch(groups)
        self._queued_entries -= batch.entries
        self._queued_tokens -= batch.tokens
        self._queue_changed()
        return batch

    def _launch(self, batch: _Batch) -> None:
        started_s = time.monotonic()
        self._observer.batch_started(
            self.engine_name, [started_s - r.enqueued_s for group in batch.owners for r, _ in group]
        )
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(batch, started_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch, started_s: float) -> None:
        released = False

        def release() -> None:
            # The engine gets its next batch before this one's callers are answered.
            nonlocal released
            if not released:
                released = True
                self._running -= 1
                self._pump()

        try:
            await self._score(batch, started_s, isolate=True, on_scored=release)
        finally:
            release()
            self._check_idle()

    async def _score(
        self, batch: _Batch, started_s: float, *, isolate: bool, on_scored: Callable[[], None] | None = None
    ) -> None:
        try:
            scored = await self._engine.score(batch.prompts)
            if len(scored.scores) != len(batch.prompts):
                raise EngineFailure(
                    f"{self.engine_name} returned {len(scored.scores)} scores "
                    f"for {len(batch.prompts)} prompts"
                )
        except EngineRejected as exc:
            self._engine_failed(exc)
            requests = batch.requests() if isolate else []
            if len(requests) < 2:
                self._fail_batch(batch, exc)
                return
            # One request's prompt was refused: retry each request alone so the others still get answers.
            for request in requests:
                groups: dict[tuple[int, ...], list[tuple[_Request, int]]] = {}
                for group in batch.owners:
                    for r, i in group:
                        if r is request:
                            groups.setdefault(r.prompts[i].input_ids, []).append((r, i))
                if request.live:
                    await self._score(_make_batch(groups), time.monotonic(), isolate=False)
            return
        except EngineError as exc:
            self._engine_failed(exc)
            log.warning("a batch of %d prompts failed on %s: %s", len(batch.prompts), self.engine_name, exc)
            self._fail_batch(batch, exc)
            return
        except asyncio.CancelledError:
            self._fail_batch(batch, ShuttingDown("the gateway is shutting down; retry on another replica"))
            raise
        except Exception as exc:  # an engine broke its contract: fail its batch, keep serving others
            failure = EngineFailure(f"{self.engine_name} raised {type(exc).__name__}: {exc}")
            self._engine_failed(failure)
            log.exception("engine %s raised a non-engine error", self.engine_name)
            self._fail_batch(batch, failure)
            return
        self._record(batch, started_s, time.monotonic())
        if on_scored is not None:
            on_scored()
        for score, group in zip(scored.scores, batch.owners, strict=True):
            for request, i in group:
                if not request.live:
                    continue
                request.scores[i] = float(score)
                if scored.engine not in request.engines:
                    request.engines.append(scored.engine)
                request.remaining -= 1
                if request.remaining == 0:
                    request.future.set_result(Scored(scores=request.scores, engine=",".join(request.engines)))

    def _fail_batch(self, batch: _Batch, error: BaseException) -> None:
        self._failed_batches += 1
        for request in batch.requests():
            self._fail_request(request, error)

    def _engine_failed(self, exc: EngineError) -> None:
        if not exc.reported:  # a router reported it already, under the engine that failed
            self._observer.engine_failed(self.engine_name, error_kind(exc))

    def _record(self, batch: _Batch, started_s: float, finished_s: float) -> None:
        self._history.append(_BatchRecord(started_s, finished_s, batch.tokens))
        self._last_batch_s = finished_s - started_s
        busy_s = self._busy_s()
        self._throughput = sum(r.tokens for r in self._history) / busy_s if busy_s else None
        self._batches += 1
        self._entries_scored += batch.entries
        self._unique_scored += len(batch.prompts)
        rows = len(batch.prompts)
        real = sum(len(p) for p in batch.prompts)
        cost = batch_cost([len(p) for p in batch.prompts], self.budget.padded)
        self._fill_sum += min(1.0, max(cost / self.budget.max_tokens, rows / self.budget.max_rows))
        self._padding_sum += 1.0 - real / cost if self.budget.padded else 0.0
        self._observer.batch_finished(
            self.engine_name,
            rows=rows,
            tokens=real,
            padded_tokens=batch.padded_tokens,
            padded=self.budget.padded,
            seconds=finished_s - started_s,
        )


__all__ = ["NullObserver", "Scheduler", "SchedulerObserver"]
