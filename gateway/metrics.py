"""Every Prometheus metric of the gateway, defined once: `rerank_<noun>_<unit>` with fixed labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engines.base import CircuitState

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

REQUESTS = Counter(
    "rerank_requests_total",
    "HTTP rerank requests by dialect, route and status code.",
    ["dialect", "route", "status"],
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    "rerank_requests_in_flight",
    "HTTP requests being handled now (all routes).",
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "rerank_request_duration_seconds",
    "End-to-end latency of HTTP requests by dialect (`other` for non-rerank routes), until the last byte.",
    ["dialect"],
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
QUEUE_LATENCY = Histogram(
    "rerank_queue_duration_seconds",
    "Time a pair waited in the scheduler queue before its batch started.",
    ["engine"],
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
INFERENCE_LATENCY = Histogram(
    "rerank_inference_duration_seconds",
    "Time an engine took to score one batch.",
    ["engine"],
    buckets=_LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "rerank_batch_size_pairs",
    "Pairs per engine batch.",
    ["engine"],
    buckets=_SIZE_BUCKETS,
    registry=REGISTRY,
)
BATCH_TOKENS = Histogram(
    "rerank_batch_tokens",
    "Real (unpadded) tokens per engine batch.",
    ["engine"],
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
PADDING_WASTE = Histogram(
    "rerank_batch_padding_ratio",
    "Share of a padded batch's token slots that are padding (0..1).",
    ["engine"],
    buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "rerank_queue_depth_pairs",
    "Pairs waiting in the scheduler queue.",
    ["engine"],
    registry=REGISTRY,
)
DOCUMENTS_TRUNCATED = Counter(
    "rerank_documents_truncated_total",
    "Documents cut by the scoring contract or a per-document token cap.",
    registry=REGISTRY,
)
DOCUMENTS_CHUNKED = Counter(
    "rerank_documents_chunked_total",
    "Documents split into several chunks (score = max over chunks).",
    registry=REGISTRY,
)
ENGINE_HEALTHY = Gauge(
    "rerank_engine_healthy_bool",
    "1 when the engine's last health check passed.",
    ["engine"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "rerank_circuit_state",
    "Circuit breaker state per engine: 0 closed, 1 half-open, 2 open.",
    ["engine"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "rerank_fallbacks_total",
    "Batches answered by the fallback engine, by reason.",
    ["reason"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "rerank_dropped_requests_total",
    "Requests whose queued pairs were dropped before inference, by reason.",
    ["reason"],
    registry=REGISTRY,
)
ENGINE_ERRORS = Counter(
    "rerank_engine_errors_total",
    "Engine failures by engine and kind (unavailable, timeout, failure).",
    ["engine", "kind"],
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "rerank_connections_closed_total",
    "Client connections closed by the server before a request reached the app, by reason "
    "(header_timeout, headers_too_large, evicted_idle, over_capacity).",
    ["reason"],
    registry=REGISTRY,
)


class PrometheusEngineObserver:
    """The engine layer's events (engines.base.EngineObserver) as the rerank_* metrics above."""

    def engine_error(self, engine: str, kind: str) -> None:
        ENGINE_ERRORS.labels(engine, kind).inc()

    def fallback(self, reason: str) -> None:
        FALLBACKS.labels(reason).inc()

    def circuit_changed(self, engine: str, state: CircuitState) -> None:
        CIRCUIT_STATE.labels(engine).set(state.value)

    def engine_health(self, engine: str, healthy: bool) -> None:
        ENGINE_HEALTHY.labels(engine).set(int(healthy))


ENGINE_OBSERVER = PrometheusEngineObserver()

# The vLLM backend pool (RERANK_VLLM_URL with several URLs): one label value per configured backend.
BACKEND_BATCHES = Counter(
    "rerank_vllm_backend_batches_total",
    "Batches sent to each vLLM backend of the pool, by outcome (ok, timeout, unavailable, failure, "
    "rejected).",
    ["backend", "outcome"],
    registry=REGISTRY,
)
BACKEND_PROMPTS = Counter(
    "rerank_vllm_backend_prompts_total",
    "Prompts scored by each vLLM backend of the pool.",
    ["backend"],
    registry=REGISTRY,
)
BACKEND_OUTSTANDING_TOKENS = Gauge(
    "rerank_vllm_backend_outstanding_tokens",
    "Tokens in flight on each vLLM backend (the pool sends a batch to the backend with the fewest).",
    ["backend"],
    registry=REGISTRY,
)
BACKEND_HEALTHY = Gauge(
    "rerank_vllm_backend_healthy",
    "1 when the vLLM backend's last health check passed.",
    ["backend"],
    registry=REGISTRY,
)
BACKEND_CIRCUIT = Gauge(
    "rerank_vllm_backend_circuit_state",
    "Each vLLM backend's circuit breaker: 0 closed, 1 half-open, 2 open.",
    ["backend"],
    registry=REGISTRY,
)


class PrometheusPoolObserver:
    """The vLLM pool's per-backend events (engines.vllm_pool.PoolObserver) as rerank_vllm_backend_*."""

    def backend_batch(self, backend: str, prompts: int, tokens: int, outcome: str) -> None:
        BACKEND_BATCHES.labels(backend, outcome).inc()
        if outcome == "ok":
            BACKEND_PROMPTS.labels(backend).inc(prompts)

    def backend_state(self, backend: str, healthy: bool, circuit: CircuitState) -> None:
        BACKEND_HEALTHY.labels(backend).set(int(healthy))
        BACKEND_CIRCUIT.labels(backend).set(circuit.value)

    def backend_outstanding(self, backend: str, tokens: int) -> None:
        BACKEND_OUTSTANDING_TOKENS.labels(backend).set(tokens)


POOL_OBSERVER = PrometheusPoolObserver()

QUEUE_TOKENS = Gauge(
    "rerank_queue_depth_tokens",
    "Tokens waiting in the scheduler queue (what RERANK_MAX_QUEUED_TOKENS bounds).",
    ["engine"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "rerank_rejected_requests_total",
    "Requests answered 429 by admission, by reason (active_requests, queue_full before the body is read; "
    "queue_tokens, drain_time once the request is tokenized).",
    ["reason"],
    registry=REGISTRY,
)


class PrometheusSchedulerObserver:
    """The scheduler's events (gateway.scheduler.SchedulerObserver) as the rerank_* metrics above."""

    def queue_changed(self, engine: str, entries: int, tokens: int) -> None:
        QUEUE_DEPTH.labels(engine).set(entries)
        QUEUE_TOKENS.labels(engine).set(tokens)

    def batch_started(self, engine: str, waited_s) -> None:
        histogram = QUEUE_LATENCY.labels(engine)
        for wait_s in waited_s:
            histogram.observe(wait_s)

    def batch_finished(
        self, engine: str, *, rows: int, tokens: int, padded_tokens: int, padded: bool, seconds: float
    ) -> None:
        INFERENCE_LATENCY.labels(engine).observe(seconds)
        BATCH_SIZE.labels(engine).observe(rows)
        BATCH_TOKENS.labels(engine).observe(tokens)
        if padded and padded_tokens:
            PADDING_WASTE.labels(engine).observe(1.0 - tokens / padded_tokens)

    def request_dropped(self, reason: str) -> None:
        DROPPED.labels(reason).inc()

    def request_rejected(self, reason: str) -> None:
        REJECTED.labels(reason).inc()

    def engine_failed(self, engine: str, kind: str) -> None:
        ENGINE_ERRORS.labels(engine, kind).inc()


SCHEDULER_OBSERVER = PrometheusSchedulerObserver()
