"""Request coalescer: batches (query, document) pairs across concurrent requests under a token budget.

One owner task per engine holds a FIFO queue of pairs, each tagged with its request. It forms a batch when
the queued pairs fill the token or pair budget, or when the oldest pair has waited `max_wait_ms` and an
engine slot is free. A batch is deduplicated (identical prompts are scored once), sorted by length and
sent to `engine.score`; each request is resolved once all of its pairs are scored, so a request larger than
one batch is split and merged transparently. Up to `info.max_concurrent_batches` batches run at once; while
they run, the owner already selects and prepares the next one (it is "staged" until a slot frees).

Queued pairs of a request whose caller went away (cancelled task, deadline) are skipped before inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.contract import Prompt
from engines.base import (
    Engine,
    EngineError,
    EngineFailure,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Scored,
)
from gateway import metrics
from gateway.errors import GatewayError, GatewayTimeout, Overloaded, ServiceUnavailable, from_engine_error

if TYPE_CHECKING:
    from gateway.config import Settings

log = logging.getLogger(__name__)

# Retry-After when no batch has been measured yet: long enough for a first batch on a CPU.
UNMEASURED_RETRY_AFTER_S = 1.0
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 300.0
# Throughput is measured over the most recent batches, so it follows load and engine changes.
THROUGHPUT_WINDOW_BATCHES = 32
# Full batches handed to the engine beyond max_concurrent_batches: one waits at the engine while another
# runs, so the engine starts it the moment it is free instead of after a hand-off to the event loop thread
# (which can wait out the GIL's 5 ms switch interval). Only full batches are sent ahead.
PIPELINED_BATCHES = 1
# Padded engines choose each batch among this many batches' worth of the oldest queued pairs.
LOOKAHEAD_BATCHES = 4
# Cancellation messages the coalescer reports as their own DROPPED reason (bounded label values).
KNOWN_CANCEL_REASONS = frozenset({"client_disconnected", "shutdown"})
SHUTTING_DOWN = "the gateway is shutting down; retry on another replica"


class _DedupKey:
    """A prompt's token ids with their hash computed once (tuples do not cache their hash)."""

    __slots__ = ("_hash", "ids")

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.ids = ids
        self._hash = hash(ids)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DedupKey) and self._hash == other._hash and self.ids == other.ids


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's pairs: result slots, what is still queued, and the future the caller awaits."""

    future: asyncio.Future[Scored]
    scores: list[float]
    remaining: int
    queued: int
    queued_tokens: int
    engines: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.future.done()


@dataclass(frozen=True, slots=True)
class _Pair:
    """One queued (query, document) pair, tagged with its request and its index there."""

    request: _Request
    index: int
    prompt: Prompt
    key: _DedupKey
    enqueued_s: float
    seq: int  # arrival order across requests


@dataclass(frozen=True, slots=True)
class _Batch:
    """A prepared batch: unique prompts sorted by length, and the queued pairs each one answers."""

    prompts: tuple[Prompt, ...]
    owners: tuple[tuple[_Pair, ...], ...]
    pairs: int
    tokens: int
    padded_tokens: int


@dataclass(frozen=True, slots=True)
class _BatchRecord:
    """When a finished batch ran and how many tokens it scored, for the throughput estimate."""

    started_s: float
    finished_s: float
    tokens: int
    pairs: int


class Coalescer:
    """Batches pairs from concurrent `score` calls into well-filled engine batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_tokens: int,
        max_batch_pairs: int,
        max_wait_ms: float,
        max_queued_pairs: int,
        request_timeout_ms: int,
    ) -> None:
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_pairs", max_batch_pairs),
            ("max_queued_pairs", max_queued_pairs),
            ("request_timeout_ms", request_timeout_ms),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        self._engine = engine
        info = engine.info
        self.engine_name = info.name
        self.padded = info.padded
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_wait_ms = float(max_wait_ms)
        self.max_queued_pairs = max_queued_pairs
        self.request_timeout_ms = request_timeout_ms
        self.max_concurrent_batches = max(1, info.max_concurrent_batches)

        self._queue: deque[_Pair] = deque()
        self._queued_pairs = 0
        self._queued_tokens = 0
        self._in_flight = 0
        self._in_flight_pairs = 0
        self._draining = False
        self._closing = False
        self._owner: asyncio.Task[None] | None = None
        self._staged: _Batch | None = None
        self._staged_arrivals = 0
        self._arrivals = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None

        self._history: deque[_BatchRecord] = deque(maxlen=THROUGHPUT_WINDOW_BATCHES)
        self._batches = 0
        self._engine_calls_failed = 0
        self._pairs_scored = 0
        self._unique_scored = 0
        self._fill_sum = 0.0
        self._padding_sum = 0.0
        self._dropped_pairs = 0

        self._m_depth = metrics.QUEUE_DEPTH.labels(engine=info.name)
        self._m_queue_latency = metrics.QUEUE_LATENCY.labels(engine=info.name)
        self._m_inference = metrics.INFERENCE_LATENCY.labels(engine=info.name)
        self._m_batch_size = metrics.BATCH_SIZE.labels(engine=info.name)
        self._m_batch_tokens = metrics.BATCH_TOKENS.labels(engine=info.name)
        self._m_padding = metrics.PADDING_WASTE.labels(engine=info.name)
        self._m_depth.set(0)

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings) -> Coalescer:
        """A coalescer with the settings' limits; unset batch budgets fall back to the engine's own."""
        info = engine.info
        return cls(
            engine,
            max_batch_tokens=settings.max_batch_tokens or info.max_batch_tokens,
            max_batch_pairs=settings.max_batch_pairs or info.max_batch_pairs,
            max_wait_ms=settings.max_wait_ms,
            max_queued_pairs=settings.max_queued_pairs,
            request_timeout_ms=settings.request_timeout_ms,
        )

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the owner task (idempotent). The engine itself is started by whoever owns it."""
        self._ensure_owner()

    def _ensure_owner(self) -> None:
        if self._owner is not None and not self._owner.done():
            return
        if self._wake is None:
            self._wake = asyncio.Event()
            self._settled = asyncio.Event()
            self._settled.set()
        self._owner = asyncio.get_running_loop().create_task(self._run_owner(), name="coalescer-owner")
        self._owner.add_done_callback(self._owner_done)

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting work and finish what is queued and in flight, waiting at most `timeout_s`."""
        self._draining = True
        if self._wake is None:
            return
        self._wake.set()
        assert self._settled is not None
        try:
            await asyncio.wait_for(self._settled.wait(), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            log.warning(
                "drain timed out after %.1f s with %d pairs queued and %d batches in flight",
                timeout_s,
                self._queued_pairs,
                self._in_flight,
            )

    async def close(self) -> None:
        """Stop the owner; requests still queued or in flight fail with ServiceUnavailable."""
        self._draining = True
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        tasks = [t for t in (self._owner, *self._batch_tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel("shutdown")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_queued(ServiceUnavailable(SHUTTING_DOWN))
        self._owner = None

    # --- the caller's side ---------------------------------------------------------------------------

    async def score(self, prompts: Sequence[Prompt], *, deadline_s: float | None = None) -> Scored:
        """Raw scores for `prompts` in their order, batched with other callers' pairs.

        `deadline_s` is an absolute `time.monotonic()` time; unset, the deadline is now + request_timeout_ms.
        """
        if self._draining:
            raise ServiceUnavailable("the gateway is shutting down and accepts no new work; retry shortly")
        if not prompts:
            return Scored(scores=[], engine=self.engine_name)
        self._ensure_owner()
        now = time.monotonic()
        if deadline_s is None:
            deadline_s = now + self.request_timeout_ms / 1000.0
        if deadline_s <= now:
            raise GatewayTimeout("the request's deadline passed before it could be queued")
        n = len(prompts)
        # An empty queue takes any request, or a request larger than the queue could never be served.
        if self._queued_pairs and self._queued_pairs + n > self.max_queued_pairs:
            raise Overloaded(
                f"the queue holds {self._queued_pairs} pairs and this request adds {n}, over the limit of "
                f"{self.max_queued_pairs}; retry later or send fewer documents",
                retry_after_s=self.retry_after_s(),
            )

        loop = asyncio.get_running_loop()
        tokens = sum(len(p) for p in prompts)
        request = _Request(
            future=loop.create_future(), scores=[0.0] * n, remaining=n, queued=n, queued_tokens=tokens
        )
        self._queue.extend(
            _Pair(request, i, prompt, _DedupKey(prompt.input_ids), now, self._arrivals + i)
            for i, prompt in enumerate(prompts)
        )
        self._arrivals += n
        self._queued_pairs += n
        self._queued_tokens += tokens
        self._m_depth.set(self._queued_pairs)
        assert self._wake is not None
        assert self._settled is not None
        self._settled.clear()
        self._wake.set()

        try:
            return await asyncio.wait_for(request.future, timeout=deadline_s - time.monotonic())
        except asyncio.TimeoutError:
            self._abandon(request, "timeout")
            raise GatewayTimeout(
                "the request was not scored before its deadline "
                f"(request_timeout_ms={self.request_timeout_ms} unless the caller set one); "
                "retry later or send fewer documents"
            ) from None
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args and exc.args[0] in KNOWN_CANCEL_REASONS else "cancelled"
            self._abandon(request, reason)
            raise

    def retry_after_s(self) -> float:
        """How long the queued tokens take at the measured throughput (a floor when nothing is measured)."""
        throughput = self.throughput_tokens_per_s()
        if throughput is None:
            return UNMEASURED_RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, self._queued_tokens / throughput))

    def throughput_tokens_per_s(self) -> float | None:
        """Real tokens scored per second over the recent batches (concurrent batches overlap), or None."""
        busy_s = self._busy_s()
        if not busy_s:
            return None
        return sum(r.tokens for r in self._history) / busy_s

    def _busy_s(self) -> float:
        """Time the engine was busy over the recent batches (overlapping batches counted once)."""
        busy_s = 0.0
        end_s = -math.inf
        for record in sorted(self._history, key=lambda r: r.started_s):
            start_s = max(record.started_s, end_s)
            if record.finished_s > start_s:
                busy_s += record.finished_s - start_s
            end_s = max(end_s, record.finished_s)
        return busy_s

    def stats(self) -> dict:
        """Queue depth, in-flight work, measured throughput and batch quality, for /ready and Retry-After."""
        throughput = self.throughput_tokens_per_s()
        busy_s = self._busy_s()
        pairs_per_s = sum(r.pairs for r in self._history) / busy_s if busy_s else None
        batches = max(1, self._batches)
        return {
            "engine": self.engine_name,
            "accepting": not self._draining,
            "draining": self._draining,
            "queued_pairs": self._queued_pairs,
            "queued_tokens": self._queued_tokens,
            "max_queued_pairs": self.max_queued_pairs,
            "staged_pairs": self._staged.pairs if self._staged is not None else 0,
            "in_flight_batches": self._in_flight,
            "in_flight_pairs": self._in_flight_pairs,
            "max_concurrent_batches": self.max_concurrent_batches,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_pairs": self.max_batch_pairs,
            "max_wait_ms": self.max_wait_ms,
            "throughput_tokens_per_s": throughput,
            "throughput_pairs_per_s": pairs_per_s,
            "retry_after_s": self.retry_after_s(),
            "batches": self._batches,
            "failed_batches": self._engine_calls_failed,
            "pairs_scored": self._pairs_scored,
            "unique_pairs_scored": self._unique_scored,
            "dropped_pairs": self._dropped_pairs,
            "mean_batch_pairs": self._unique_scored / batches,
            "mean_batch_fill": self._fill_sum / batches,
            "mean_padding_ratio": self._padding_sum / batches,
        }

    def _abandon(self, request: _Request, reason: str) -> None:
        """The caller is gone: its still-queued pairs will be skipped, and are counted as dropped."""
        if not request.future.done():
            request.future.cancel()
        self._release(request, reason)

    def _release(self, request: _Request, reason: str) -> None:
        if request.queued:
            self._dropped_pairs += request.queued
            metrics.DROPPED.labels(reason=reason).inc()
            self._queued_pairs -= request.queued
            self._queued_tokens -= request.queued_tokens
            request.queued = 0
            request.queued_tokens = 0
            self._m_depth.set(self._queued_pairs)
        self._check_settled()

    def _fail(self, request: _Request, error: GatewayError, reason: str) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._release(request, reason)

    def _check_settled(self) -> None:
        if self._settled is not None and self._queued_pairs == 0 and self._in_flight == 0:
            self._settled.set()
        if self._wake is not None:
            self._wake.set()

    # --- the owner task ---------------------------------------------------------------------------

    def _cost(self, longest: int, rows: int, tokens: int) -> int:
        # Padded engines pay for every row at the longest row's length.
        return longest * rows if self.padded else tokens

    def _prune_head(self) -> None:
        while self._queue and not self._queue[0].request.live:
            self._queue.popleft()

    def _budget_full(self) -> bool:
        """True when the live queued pairs fill a batch (duplicates counted, so it may flush a bit early)."""
        if self._queued_pairs >= self.max_batch_pairs:
            return True
        longest = rows = tokens = 0
        for pair in self._queue:
            if not pair.request.live:
                continue
            n = len(pair.prompt)
            longest, rows, tokens = max(longest, n), rows + 1, tokens + n
            if self._cost(longest, rows, tokens) >= self.max_batch_tokens:
                return True
        return False

    def _select(self) -> _Batch | None:
        """Pop the next batch's pairs (always the oldest one, and at least one) and prepare them."""
        return self._select_similar_lengths() if self.padded else self._select_fifo()

    def _select_fifo(self) -> _Batch | None:
        """The oldest live pairs that fit the budget: right when padding costs nothing."""
        groups: dict[_DedupKey, list[_Pair]] = {}
        longest = tokens = 0
        while self._queue:
            pair = self._queue[0]
            if not pair.request.live:
                self._queue.popleft()
                continue
            group = groups.get(pair.key)
            if group is not None:  # a duplicate costs nothing
                group.append(self._queue.popleft())
                continue
            n = len(pair.prompt)
            rows = len(groups) + 1
            if groups and (
                rows > self.max_batch_pairs
                or self._cost(max(longest, n), rows, tokens + n) > self.max_batch_tokens
            ):
                break
            groups[pair.key] = [self._queue.popleft()]
            longest, tokens = max(longest, n), tokens + n
        return self._prepare(groups) if groups else None

    def _select_similar_lengths(self) -> _Batch | None:
        """For padded engines: the oldest pair plus the most pairs of nearby length that fit the budget.

        Pairs are looked at in a window of the oldest few batches' worth, sorted by length; the batch is
        the contiguous length range around the oldest pair holding the most rows. When everything queued
        fits, that is everything (as FIFO would take). Under load it cuts padding, and since every batch
        takes the oldest pair, no pair waits behind more than its position in the queue.
        """
        window = LOOKAHEAD_BATCHES * self.max_batch_pairs
        groups: dict[_DedupKey, list[_Pair]] = {}
        scanned = 0  # only the head of the queue is looked at, so a long queue costs no more
        for pair in self._queue:
            if pair.request.live:
                group = groups.get(pair.key)
                if group is not None:
                    group.append(pair)
                elif len(groups) < window:
                    groups[pair.key] = [pair]
                else:
                    break
            scanned += 1
        if not groups:
            for _ in range(scanned):
                self._queue.popleft()
            return None
        keys = list(groups)  # oldest first
        rank = {key: i for i, key in enumerate(keys)}
        by_length = sorted(keys, key=lambda k: (len(k.ids), rank[k]))
        lengths = [len(k.ids) for k in by_length]
        anchor = by_length.index(keys[0])
        budget, max_rows, n = self.max_batch_tokens, self.max_batch_pairs, len(by_length)
        prefix = [0, *itertools.accumulate(lengths)]

        def fits(lo: int, hi: int) -> bool:
            return hi - lo < max_rows and lengths[hi] * (hi - lo + 1) <= budget

        # Two pointers: a lower `lo` adds rows, so the highest `hi` that fits can only come down.
        hi = anchor
        while hi + 1 < n and fits(anchor, hi + 1):
            hi += 1
        best, best_key = (anchor, hi), (0, 0)
        for lo in range(anchor, -1, -1):
            while hi > anchor and not fits(lo, hi):
                hi -= 1
            if lo < anchor and not fits(lo, hi):
                break
            rows = hi - lo + 1
            # Most rows first; among equals, the least padding.
            key = (rows, -(lengths[hi] * rows - (prefix[hi + 1] - prefix[lo])))
            if key > best_key:
                best, best_key = (lo, hi), key
        chosen = {key: groups[key] for key in sorted(by_length[best[0] : best[1] + 1], key=rank.__getitem__)}
        taken = {id(pair) for group in chosen.values() for pair in group}
        head = [self._queue.popleft() for _ in range(scanned)]
        self._queue.extendleft(reversed([p for p in head if p.request.live and id(p) not in taken]))
        return self._prepare(chosen)

    def _prepare(self, groups: dict[_DedupKey, list[_Pair]]) -> _Batch | None:
        live = [[p for p in group if p.request.live] for group in groups.values()]
        live = [group for group in live if group]
        if not live:
            return None
        # Sorting by length lets an engine that micro-batches pad each slice to similar lengths.
        live.sort(key=lambda group: len(group[0].prompt))
        prompts = tuple(group[0].prompt for group in live)
        tokens = sum(len(p) for p in prompts)
        return _Batch(
            prompts=prompts,
            owners=tuple(tuple(group) for group in live),
            pairs=sum(len(group) for group in live),
            tokens=tokens,
            padded_tokens=len(prompts[-1]) * len(prompts),
        )

    async def _run_owner(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        wake = self._wake
        while not self._closing:
            wake.clear()
            self._prune_head()
            if not self._queue:
                self._check_settled()
                wake.clear()
                await wake.wait()
                continue
            slot_free = self._in_flight < self.max_concurrent_batches
            waited_ms = (time.monotonic() - self._queue[0].enqueued_s) * 1000.0
            if self._budget_full() or (slot_free and (self._draining or waited_ms >= self.max_wait_ms)):
                batch = self._select()
                if batch is not None:
                    # Staged: prepared while earlier batches run, launched the moment a slot frees
                    # (by the batch that frees it, before it resolves its own requests).
                    self._staged, self._staged_arrivals = batch, self._arrivals
                    self._launch_staged()
                    while self._staged is not None and not self._closing:
                        wake.clear()
                        await wake.wait()
                        self._launch_staged()
                continue
            timer = None
            if slot_free:
                timer = loop.call_later(max(0.0, (self.max_wait_ms - waited_ms) / 1000.0), wake.set)
            try:
                await wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _launch_staged(self) -> None:
        """Launch the staged batch if a slot is free; re-plan it first if more pairs came meanwhile."""
        batch = self._staged
        if (
            batch is None
            or self._closing
            or self._in_flight >= self.max_concurrent_batches + PIPELINED_BATCHES
        ):
            return
        self._staged = None
        if self.padded and self._arrivals != self._staged_arrivals:
            # Choosing again among all queued pairs finds closer lengths.
            self._unstage(batch)
            batch = self._select()
        if batch is not None:
            self._launch(batch)
        if self._wake is not None:
            self._wake.set()

    def _unstage(self, batch: _Batch) -> None:
        """Put a staged batch's pairs back in the queue, in arrival order."""
        staged = sorted((p for group in batch.owners for p in group), key=lambda p: p.seq)
        self._queue = deque(heapq.merge(staged, self._queue, key=lambda p: p.seq))

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("the coalescer owner task failed", exc_info=task.exception())
        self._fail_queued(ServiceUnavailable("the request coalescer failed; retry the request"))

    def _fail_queued(self, error: GatewayError) -> None:
        if self._staged is not None:
            self._fail_batch(self._staged, error, "shutdown")
            self._staged = None
        while self._queue:
            pair = self._queue.popleft()
            self._fail(pair.request, error, "shutdown")

    def _launch(self, batch: _Batch) -> None:
        if any(not p.request.live for group in batch.owners for p in group):
            # A caller left while the batch was staged: its pairs never reach the engine.
            refreshed = self._prepare({group[0].key: list(group) for group in batch.owners})
            if refreshed is None:
                return
            batch = refreshed
        started_s = time.monotonic()
        for group in batch.owners:
            for pair in group:
                request = pair.request
                request.queued -= 1
                request.queued_tokens -= len(pair.prompt)
                self._m_queue_latency.observe(started_s - pair.enqueued_s)
        self._queued_pairs -= batch.pairs
        self._queued_tokens -= sum(len(p.prompt) for group in batch.owners for p in group)
        self._m_depth.set(self._queued_pairs)
        self._in_flight += 1
        self._in_flight_pairs += batch.pairs
        task = asyncio.get_running_loop().create_task(self._execute(batch, started_s))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _execute(self, batch: _Batch, started_s: float) -> None:
        released = False

        def release_slot() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight -= 1
                self._in_flight_pairs -= batch.pairs
                # The engine gets its next batch before this one's requests are resolved.
                self._launch_staged()

        try:
            await self._score_batch(batch, started_s, isolate=True, on_scored=release_slot)
        finally:
            release_slot()
            self._check_settled()

    async def _score_batch(
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
            self._count_engine_error(exc)
            sub_batches = self._split_by_request(batch) if isolate else []
            if len(sub_batches) < 2:
                self._fail_batch(batch, from_engine_error(exc), "engine_error")
                return
            # One request's prompt was refused: retry each request alone so the others still get answers.
            for sub in sub_batches:
                if any(p.request.live for group in sub.owners for p in group):
                    await self._score_batch(sub, time.monotonic(), isolate=False)
            return
        except EngineError as exc:
            self._count_engine_error(exc)
            log.warning("batch of %d pairs failed on %s: %s", len(batch.prompts), self.engine_name, exc)
            self._fail_batch(batch, from_engine_error(exc), "engine_error")
            return
        except asyncio.CancelledError:
            self._fail_batch(batch, ServiceUnavailable(SHUTTING_DOWN), "shutdown")
            raise
        except Exception as exc:  # an engine broke its contract: fail its batch, keep serving others
            self._count_engine_error(EngineFailure(str(exc)))
            log.exception("engine %s raised a non-engine error", self.engine_name)
            self._fail_batch(batch, from_engine_error(EngineFailure(str(exc))), "engine_error")
            return
        self._record(batch, started_s, time.monotonic())
        if on_scored is not None:
            on_scored()
        for score, group in zip(scored.scores, batch.owners, strict=True):
            for pair in group:
                request = pair.request
                if not request.live:
                    continue
                request.scores[pair.index] = float(score)
                if scored.engine not in request.engines:
                    request.engines.append(scored.engine)
                request.remaining -= 1
                if request.remaining == 0:
                    request.future.set_result(Scored(scores=request.scores, engine=",".join(request.engines)))

    def _count_engine_error(self, exc: EngineError) -> None:
        self._engine_calls_failed += 1
        if not exc.reported:  # a router counted it already, under the engine that failed
            metrics.ENGINE_ERRORS.labels(engine=self.engine_name, kind=_error_kind(exc)).inc()

    def _split_by_request(self, batch: _Batch) -> list[_Batch]:
        """One batch per request, holding only that request's pairs."""
        per_request: dict[_Request, dict[_DedupKey, list[_Pair]]] = {}
        for group in batch.owners:
            for pair in group:
                per_request.setdefault(pair.request, {}).setdefault(pair.key, []).append(pair)
        return [sub for groups in per_request.values() if (sub := self._prepare(groups)) is not None]

    def _fail_batch(self, batch: _Batch, error: GatewayError, reason: str) -> None:
        for group in batch.owners:
            for pair in group:
                self._fail(pair.request, error, reason)

    def _record(self, batch: _Batch, started_s: float, finished_s: float) -> None:
        self._history.append(_BatchRecord(started_s, finished_s, batch.tokens, len(batch.prompts)))
        self._batches += 1
        self._pairs_scored += batch.pairs
        self._unique_scored += len(batch.prompts)
        cost = batch.padded_tokens if self.padded else batch.tokens
        fill = max(cost / self.max_batch_tokens, len(batch.prompts) / self.max_batch_pairs)
        self._fill_sum += min(1.0, fill)
        padding = 1.0 - batch.tokens / batch.padded_tokens if self.padded else 0.0
        self._padding_sum += padding
        self._m_inference.observe(finished_s - started_s)
        self._m_batch_size.observe(len(batch.prompts))
        self._m_batch_tokens.observe(batch.tokens)
        if self.padded:
            self._m_padding.observe(padding)


def _error_kind(exc: EngineError) -> str:
    if isinstance(exc, EngineTimeout):
        return "timeout"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, EngineRejected):
        return "rejected"
    return "failure"


__all__ = ["Coalescer"]
