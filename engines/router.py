"""Primary engine with a fallback: a background health probe and a circuit breaker decide where batches go.

- closed: batches go to the primary; `failure_threshold` consecutive failures or timeouts (batches or
  probes) open the circuit.
- open: batches go to the fallback; after `reset_ms` the next probe or batch is a half-open trial.
- half-open: one trial tests the primary (other batches keep using the fallback); success closes the
  circuit, failure opens it again for another `reset_ms`.
A batch that fails or times out on the primary is retried once on the fallback, so callers see no error;
`Scored.engine` says which engine answered. When the circuit opens, batches still waiting on the primary
(a hung sidecar) move to the fallback at once instead of waiting for their own timeout.

Budgets: the router reports the primary's EngineInfo (the scheduler sends vLLM large slices, several at
once) and re-slices a batch to the fallback's own budget, with the fallback's concurrency, when it falls
back, so a large vLLM slice never becomes one huge padded ONNX batch.

Errors, fallbacks, circuit changes and health checks go to an `EngineObserver` (the app passes the
Prometheus one from gateway.metrics); an error is reported once, under the engine that raised it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from core.batching import plan_batches
from core.contract import Prompt
from engines.base import (
    NULL_OBSERVER,
    CircuitState,
    Engine,
    EngineError,
    EngineFailure,
    EngineInfo,
    EngineObserver,
    EngineRejected,
    Scored,
    error_kind,
    stop_task,
)

__all__ = ["CircuitBreaker", "CircuitState", "RoutedEngine"]

log = logging.getLogger(__name__)


class _CircuitOpened(Exception):
    """The circuit opened while a batch was waiting on the primary."""


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open trial."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_ms: int,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_ms / 1000
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            log.info("circuit %s -> %s", self._state.name.lower(), state.name.lower())
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def try_acquire(self) -> bool:
        """May a call go to the primary now? In open state past reset_ms, this grants the one trial."""
        if self._state is CircuitState.CLOSED:
            return True
        if self._trial_out:
            return False
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at < self.reset_s:
            return False
        self._set(CircuitState.HALF_OPEN)
        self._trial_out = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._trial_out = False
        self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_out = False
        if self._state is not CircuitState.CLOSED or self._failures >= self.failure_threshold:
            self.trip()

    def trip(self) -> None:
        """Open now (also restarts the reset timer)."""
        self._opened_at = self._clock()
        self._trial_out = False
        self._set(CircuitState.OPEN)

    def release(self) -> None:
        """End a granted call that proved nothing either way (cancelled, or the batch was refused)."""
        if self._state is CircuitState.HALF_OPEN and self._trial_out:
            self._trial_out = False


class RoutedEngine:
    """An Engine that sends batches to `primary` while its circuit allows, else to `fallback`."""

    def __init__(
        self,
        primary: Engine,
        fallback: Engine,
        *,
        failure_threshold: int = 3,
        reset_ms: int = 5_000,
        probe_interval_ms: int = 2_000,
        clock: Callable[[], float] = time.monotonic,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.observer = observer
        self.probe_interval_s = probe_interval_ms / 1000
        self._primary_name = primary.info.name
        self._fallback_name = fallback.info.name
        # Set when the circuit opens, so batches still waiting on a hung primary leave at once.
        self._opened = asyncio.Event()
        self.breaker = CircuitBreaker(
            failure_threshold=failure_threshold,
            reset_ms=reset_ms,
            clock=clock,
            on_change=self._on_circuit_change,
        )
        observer.circuit_changed(self._primary_name, CircuitState.CLOSED)
        self._fallback_slots = asyncio.Semaphore(max(1, fallback.info.max_concurrent_batches))
        self._probe_task: asyncio.Task[None] | None = None
        self._primary_healthy: bool | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._started = False

    def _on_circuit_change(self, state: CircuitState) -> None:
        self.observer.circuit_changed(self._primary_name, state)
        if state is CircuitState.OPEN:
            opened, self._opened = self._opened, asyncio.Event()
            opened.set()

    @property
    def info(self) -> EngineInfo:
        return self.primary.info

    @property
    def circuit_state(self) -> CircuitState:
        return self.breaker.state

    def __repr__(self) -> str:
        return f"RoutedEngine({self.primary!r} -> {self.fallback!r})"

    async def start(self) -> None:
        """Start the fallback (must work), then the primary (may be down), then the probe."""
        if self._started:
            return
        await self.fallback.start()
        try:
            await self.primary.start()
        except EngineError as exc:
            if self.config_problem is not None:
                # Up but misconfigured (a sidecar serving another model): fail loudly, do not fall back.
                raise
            self._note_error(exc)
        # A primary that is down at start-up (a sidecar still loading) takes no batches until it is up.
        if not await self._check_primary():
            self.breaker.trip()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="rerank-health-probe")
        self._started = True

    async def close(self) -> None:
        task, self._probe_task = self._probe_task, None
        await stop_task(task)
        self._started = False
        try:
            await self.primary.close()
        finally:
            await self.fallback.close()

    @property
    def config_problem(self) -> str | None:
        """Why the primary cannot serve although it is up (it serves another model), or None."""
        problem = getattr(self.primary, "config_problem", None)
        return problem if isinstance(problem, str) else None

    async def health(self) -> bool:
        """True when some engine can score now: the fallback, or the primary behind a closed circuit."""
        if self.breaker.state is CircuitState.CLOSED and self._primary_healthy:
            return True
        return await self.fallback.health()

    async def status(self) -> dict[str, Any]:
        """Both engines' health, the circuit state and the last primary error, for /ready."""
        primary_ok, fallback_ok = await asyncio.gather(self.primary.health(), self.fallback.health())
        self.observer.engine_health(self._primary_name, primary_ok)
        self.observer.engine_health(self._fallback_name, fallback_ok)
        primary: dict[str, Any] = {
            "engine": self._primary_name,
            "healthy": primary_ok,
            "precision": self.primary.info.precision,
        }
        backend_status = getattr(self.primary, "backend_status", None)
        if callable(backend_status):  # a pool of vLLM backends: each one's state
            primary["backends"] = backend_status()
        return {
            "primary": primary,
            "fallback": {
                "engine": self._fallback_name,
                "healthy": fallback_ok,
                "precision": self.fallback.info.precision,
            },
            "circuit": self.breaker.state.name.lower(),
            "config_problem": self.config_problem,
            "consecutive_failures": self.breaker.consecutive_failures,
            "last_error": self._last_error,
            "last_error_age_s": (
                None if self._last_error_at is None else round(time.monotonic() - self._last_error_at, 3)
            ),
        }

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        if not prompts:
            return Scored([], self._primary_name)
        if not self.breaker.try_acquire():
            return await self._fall_back(prompts, "circuit_open")
        try:
            result = await self._primary_until_opened(prompts)
        except _CircuitOpened:
            # The probe (or other batches) declared the primary down while this batch waited on it.
            return await self._fall_back(prompts, "circuit_open")
        except EngineRejected as exc:
            # The sidecar is fine; this batch is not servable there (e.g. longer than its max_model_len).
            self.breaker.release()
            self._note_error(exc)
            return await self._fall_back(prompts, "rejected")
        except EngineError as exc:
            self.breaker.record_failure()
            self._note_error(exc)
            return await self._fall_back(prompts, error_kind(exc))
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success()
        return Scored(result.scores, result.engine)

    async def _primary_until_opened(self, prompts: Sequence[Prompt]) -> Scored:
        """The primary's answer, or _CircuitOpened as soon as the circuit opens (no waiting for a timeout)."""
        opened = self._opened
        call = asyncio.ensure_future(self.primary.score(prompts))
        waiter = asyncio.ensure_future(opened.wait())
        try:
            await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished = call.done()
            waiter.cancel()
            if not finished:
                call.cancel()
        if not finished:
            raise _CircuitOpened
        return call.result()

    def _note_error(self, exc: EngineError) -> None:
        kind = error_kind(exc)
        self.observer.engine_error(self._primary_name, kind)
        self._last_error = f"{kind}: {exc}"
        self._last_error_at = time.monotonic()
        log.warning(
            "%s engine %s, falling back to %s: %s", self._primary_name, kind, self._fallback_name, exc
        )

    async def _fall_back(self, prompts: Sequence[Prompt], reason: str) -> Scored:
        self.observer.fallback(reason)
        slices = plan_batches([len(p) for p in prompts], self.fallback.info.budget)
        try:
            if len(slices) == 1:
                return await self._fallback_slice(prompts)
            tasks = [asyncio.ensure_future(self._fallback_slice([prompts[i] for i in idx])) for idx in slices]
            try:
                results = await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
        except EngineError as exc:
            # Counted here, once, under the engine that failed: callers see the error as already reported.
            if not exc.reported:
                self.observer.engine_error(self._fallback_name, error_kind(exc))
                exc.reported = True
            raise
        scores = [0.0] * len(prompts)
        for idx, res in zip(slices, results, strict=True):
            for i, s in zip(idx, res.scores, strict=True):
                scores[i] = s
        return Scored(scores, results[0].engine)

    async def _fallback_slice(self, prompts: Sequence[Prompt]) -> Scored:
        async with self._fallback_slots:
            res = await self.fallback.score(prompts)
        if len(res.scores) != len(prompts):
            raise EngineFailure(f"{self._fallback_name} returned {len(res.scores)} scores for {len(prompts)}")
        return res

    async def _check_primary(self) -> bool:
        try:
            ok = bool(await self.primary.health())
        except EngineError as exc:
            self._note_error(exc)
            ok = False
        self._primary_healthy = ok
        self.observer.engine_health(self._primary_name, ok)
        return ok

    async def probe_once(self) -> None:
        """One health probe: it counts as a failure when unhealthy, and serves as the half-open trial."""
        state = self.breaker.state
        trial = state is not CircuitState.CLOSED and self.breaker.try_acquire()
        try:
            ok = await self._check_primary()
        except BaseException:
            if trial:
                self.breaker.release()
            raise
        if trial:
            if ok:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        elif state is CircuitState.CLOSED and not ok:
            # A success here proves /health, not scoring: it does not reset the batch failure count.
            self.breaker.record_failure()
            self._last_error = "unavailable: health probe failed"
            self._last_error_at = time.monotonic()
        if not ok and self.config_problem is not None:
            # Not a blip: every batch would fail until someone relaunches the sidecar. Open at once.
            self.breaker.trip()
            self._last_error = f"misconfigured: {self.config_problem}"
            self._last_error_at = time.monotonic()
        self.observer.engine_health(self._fallback_name, await self.fallback.health())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the probe must outlive any one bad check (it is logged)
                log.exception("health probe of %s failed unexpectedly", self._primary_name)
