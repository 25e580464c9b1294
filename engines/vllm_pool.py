"""A pool of vLLM sidecars behind one Engine: least outstanding tokens, a breaker and a probe per backend.

The gateway only balances across the backends it is given (RERANK_VLLM_URL, comma-separated); replicating,
scheduling and autoscaling them is the orchestrator's job (deploy/kubernetes/). Each batch goes to the
healthy backend with the fewest tokens in flight; a backend that fails a batch has that batch retried on
another, and counts a failure on its own circuit breaker. Only when every backend has failed the batch (or
every circuit is open) does the pool raise, and the router above it answers from the CPU engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from core.contract import Prompt
from engines.base import (
    CircuitState,
    EngineError,
    EngineInfo,
    EngineRejected,
    EngineUnavailable,
    Scored,
    error_kind,
    stop_task,
)
from engines.router import CircuitBreaker
from engines.vllm_engine import NAME, VllmEngine

log = logging.getLogger(__name__)


class PoolObserver(Protocol):
    """What the pool reports per backend (the HTTP edge turns it into metrics)."""

    def backend_batch(self, backend: str, prompts: int, tokens: int, outcome: str) -> None: ...

    def backend_state(self, backend: str, healthy: bool, circuit: CircuitState) -> None: ...

    def backend_outstanding(self, backend: str, tokens: int) -> None: ...


class _NoObserver:
    def backend_batch(self, backend: str, prompts: int, tokens: int, outcome: str) -> None:
        pass

    def backend_state(self, backend: str, healthy: bool, circuit: CircuitState) -> None:
        pass

    def backend_outstanding(self, backend: str, tokens: int) -> None:
        pass


def parse_urls(value: str) -> list[str]:
    """The backends of a comma-separated RERANK_VLLM_URL, each checked, in order, without duplicates."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("RERANK_VLLM_URL holds no URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"vLLM URL {url!r} must look like http://host:port")
    seen = [u for i, u in enumerate(urls) if u in urls[:i]]
    if seen:
        raise ValueError(f"RERANK_VLLM_URL lists {seen[0]!r} twice")
    return urls


def backend_label(url: str) -> str:
    """The metrics label of a backend: host:port (fixed by configuration, so the label set is bounded)."""
    return urlsplit(url).netloc or url


@dataclass
class _Backend:
    engine: VllmEngine
    label: str
    breaker: CircuitBreaker
    outstanding_tokens: int = 0
    healthy: bool | None = None
    batches: int = 0
    prompts: int = 0
    failures: int = 0
    # When it was last picked (a counter): ties in outstanding tokens go to the least recently used.
    last_pick: int = 0
    last_error: str | None = None
    last_error_at: float | None = field(default=None)


class VllmPool:
    """An Engine over several vLLM sidecars serving the same model."""

    def __init__(
        self,
        backends: Sequence[VllmEngine],
        *,
        failure_threshold: int = 3,
        reset_ms: int = 5_000,
        probe_interval_ms: int = 2_000,
        observer: PoolObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not backends:
            raise ValueError("a vLLM pool needs at least one backend")
        self._observer: PoolObserver = observer or _NoObserver()
        self._backends: list[_Backend] = []
        for engine in backends:
            label = backend_label(engine.base_url)
            backend = _Backend(engine=engine, label=label, breaker=None)  # type: ignore[arg-type]
            backend.breaker = CircuitBreaker(
                failure_threshold=failure_threshold,
                reset_ms=reset_ms,
                clock=clock,
                on_change=lambda state, b=backend: self._report_state(b),
            )
            self._backends.append(backend)
        labels = [b.label for b in self._backends]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two vLLM backends share an address: {labels}")
        first = backends[0].info
        self._info = EngineInfo(
            name=NAME,
            padded=False,
            max_batch_tokens=first.max_batch_tokens,
            max_batch_pairs=first.max_batch_pairs,
            # Every backend batches internally: the scheduler may keep all of them busy at once.
            max_concurrent_batches=sum(b.info.max_concurrent_batches for b in backends),
            precision=first.precision,
        )
        self.probe_interval_s = probe_interval_ms / 1000
        self._picks = 0
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def backends(self) -> list[str]:
        return [b.label for b in self._backends]

    def __repr__(self) -> str:
        return f"VllmPool({', '.join(b.engine.base_url for b in self._backends)})"

    @property
    def config_problem(self) -> str | None:
        """The first backend that is up but serves another model (every batch there would fail)."""
        for b in self._backends:
            if b.engine.config_problem is not None:
                return b.engine.config_problem
        return None

    async def start(self) -> None:
        """Start every backend; one that is up but misconfigured fails the start (loudly), one that is
        down only starts with its circuit open."""
        results = await asyncio.gather(*(b.engine.start() for b in self._backends), return_exceptions=True)
        for b, res in zip(self._backends, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, EngineError):
                raise res
            if isinstance(res, EngineError) and b.engine.config_problem is not None:
                raise res
            if isinstance(res, EngineError):
                self._note_error(b, res)
        await asyncio.gather(*(self._probe(b, at_start=True) for b in self._backends))
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_loop(), name="rerank-vllm-pool-probe")

    async def close(self) -> None:
        task, self._probe_task = self._probe_task, None
        await stop_task(task)
        await asyncio.gather(*(b.engine.close() for b in self._backends), return_exceptions=True)

    async def health(self) -> bool:
        """True when some backend is healthy behind a closed circuit."""
        return any(b.healthy and b.breaker.state is CircuitState.CLOSED for b in self._backends)

    def backend_status(self) -> list[dict[str, Any]]:
        """Each backend's state, for /ready."""
        now = time.monotonic()
        return [
            {
                "url": b.engine.base_url,
                "healthy": bool(b.healthy),
                "circuit": b.breaker.state.name.lower(),
                "outstanding_tokens": b.outstanding_tokens,
                "batches": b.batches,
                "prompts": b.prompts,
                "failures": b.failures,
                "config_problem": b.engine.config_problem,
                "last_error": b.last_error,
                "last_error_age_s": None if b.last_error_at is None else round(now - b.last_error_at, 3),
            }
            for b in self._backends
        ]

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        if not prompts:
            return Scored([], NAME)
        tokens = sum(len(p) for p in prompts)
        tried: set[int] = set()
        errors: list[str] = []
        last: EngineError | None = None
        while True:
            backend = self._pick(tried)
            if backend is None:
                break
            tried.add(id(backend))
            backend.outstanding_tokens += tokens
            self._observer.backend_outstanding(backend.label, backend.outstanding_tokens)
            try:
                result = await backend.engine.score(prompts)
            except EngineRejected:
                # Not servable on any backend (they serve the same model): no retry, no breaker change.
                backend.breaker.release()
                self._observer.backend_batch(backend.label, len(prompts), tokens, "rejected")
                raise
            except EngineError as exc:
                backend.breaker.record_failure()
                self._note_error(backend, exc)
                self._observer.backend_batch(backend.label, len(prompts), tokens, error_kind(exc))
                errors.append(f"{backend.label}: {exc}")
                last = exc
                continue
            except BaseException:
                backend.breaker.release()
                raise
            finally:
                backend.outstanding_tokens -= tokens
                self._observer.backend_outstanding(backend.label, backend.outstanding_tokens)
            backend.breaker.record_success()
            backend.batches += 1
            backend.prompts += len(prompts)
            self._observer.backend_batch(backend.label, len(prompts), tokens, "ok")
            return Scored(result.scores, NAME)
        if not errors:
            raise EngineUnavailable(f"every vLLM backend's circuit is open ({', '.join(self.backends)})")
        raise EngineUnavailable(f"every vLLM backend failed this batch: {'; '.join(errors)}") from last

    def _pick(self, tried: set[int]) -> _Backend | None:
        """The untried backend with the fewest outstanding tokens whose circuit lets a call through.

        Ties go to the least recently picked, so a sequential stream alternates between idle backends.
        """
        candidates = sorted(
            (b for b in self._backends if id(b) not in tried),
            key=lambda b: (b.breaker.state is not CircuitState.CLOSED, b.outstanding_tokens, b.last_pick),
        )
        for b in candidates:
            if b.breaker.try_acquire():
                self._picks += 1
                b.last_pick = self._picks
                return b
        return None

    def _note_error(self, backend: _Backend, exc: EngineError) -> None:
        backend.failures += 1
        backend.last_error = f"{error_kind(exc)}: {exc}"
        backend.last_error_at = time.monotonic()
        log.warning("vLLM backend %s %s: %s", backend.label, error_kind(exc), exc)

    def _report_state(self, backend: _Backend) -> None:
        self._observer.backend_state(backend.label, bool(backend.healthy), backend.breaker.state)

    async def _probe(self, backend: _Backend, *, at_start: bool = False) -> None:
        """One health check of one backend; it is the half-open trial of an open circuit."""
        state = backend.breaker.state
        trial = state is not CircuitState.CLOSED and backend.breaker.try_acquire()
        try:
            ok = bool(await backend.engine.health())
        except EngineError as exc:
            self._note_error(backend, exc)
            ok = False
        except BaseException:
            if trial:
                backend.breaker.release()
            raise
        if ok and backend.healthy is False:
            log.info("vLLM backend %s is healthy again", backend.label)
        backend.healthy = ok
        if trial:
            if ok:
                backend.breaker.record_success()
            else:
                backend.breaker.record_failure()
        elif not ok and (at_start or backend.engine.config_problem is not None):
            backend.breaker.trip()  # down at start, or up serving another model: no batches until it heals
        elif not ok:
            backend.breaker.record_failure()
        self._report_state(backend)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await asyncio.gather(*(self._probe(b) for b in self._backends))
            except asyncio.CancelledError:
                raise
            except Exception:  # the probe must outlive any one bad check (it is logged)
                log.exception("health probe of the vLLM pool failed unexpectedly")
