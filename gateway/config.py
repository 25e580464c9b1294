"""Settings: environment variables with the RERANK_ prefix, or a .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "mixedbread-ai/mxbai-rerank-base-v2"
EngineName = Literal["onnx", "reference", "vllm"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "rerank-gateway"


class Settings(BaseSettings):
    """Every knob of the gateway. Names carry units."""

    # An empty variable (compose passes `RERANK_MODEL_PATH=` through) means "unset", not "the current folder".
    model_config = SettingsConfigDict(
        env_prefix="RERANK_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    # --- model -----------------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="Hub id of the model (used when model_path is unset).")
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    model_path: Path | None = Field(
        None, description="A prepared local model folder (rerank-gateway export)."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where exported models are kept.")
    served_model_name: str | None = Field(
        None, description="Name clients use in `model`; defaults to `model`."
    )
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Other names accepted in a request's `model` (comma separated)."
    )
    estimated_max: float | None = Field(
        None, description="Normalization constant; from the model id if unset."
    )
    max_length: int = Field(8192, ge=1, description="The contract's max_length (query + document tokens).")
    quantization: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Which ONNX graph to serve: fp32 (the official scores, the default) or int8 (faster "
        "where the CPU has VNNI; its measured fidelity is in the manifest and the README).",
    )
    auto_export: bool = Field(
        True, description="Export the hub model on first start if no prepared copy exists."
    )
    verify_hashes: bool = Field(
        True, description="Check every model file's sha256 against the manifest at load."
    )

    # --- engines ---------------------------------------------------------------------------------
    engine: EngineName | None = Field(
        None, description="Primary engine; vllm when vllm_url is set, else onnx."
    )
    fallback_engine: EngineName | Literal["none"] | None = Field(
        None, description="Engine that answers when the primary fails; onnx when the primary is vllm."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    reference_model: str | None = Field(
        None,
        description="HF folder or hub id the reference engine loads; defaults to model_path when that is "
        "an HF folder, else the prepared model's export source, else `model`.",
    )
    onnx_intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose (one per core).")
    onnx_inter_op_threads: int = Field(1, ge=0)
    vllm_url: str | None = Field(
        None,
        description="Base URL of the vLLM sidecar, e.g. http://vllm:8000; several comma-separated URLs make "
        "a pool (each batch to the backend with the fewest tokens in flight, retried on another on failure).",
    )
    vllm_model: str | None = Field(None, description="Model name the sidecar serves; defaults to `model`.")
    vllm_api_key: str | None = None
    vllm_connect_timeout_ms: int = Field(2_000, ge=1)
    vllm_request_timeout_ms: int = Field(30_000, ge=1)
    vllm_max_connections: int = Field(64, ge=1)

    # --- routing: health probe and circuit breaker -------------------------------------------------
    health_probe_interval_ms: int = Field(2_000, ge=50)
    breaker_failure_threshold: int = Field(3, ge=1, description="Consecutive failures that open the circuit.")
    breaker_reset_ms: int = Field(5_000, ge=1, description="Open time before a half-open probe.")

    # --- scheduler and admission (None = derived from the engine) ------------------------------------
    coalesce: bool = Field(True, description="Batch pairs across concurrent requests (the scheduler).")
    max_batch_tokens: int | None = Field(None, ge=1, description="One engine run's token budget.")
    max_batch_pairs: int | None = Field(None, ge=1, description="One engine run's prompts.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long a partial batch waits for company.")
    max_queued_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens the scheduler queue may hold (beyond it, 429 with Retry-After); default: 8 "
        "engine runs per concurrent batch (65,536 for ONNX).",
    )
    max_active_requests: int = Field(
        128,
        ge=1,
        description="Rerank requests inside the app at once (read, parsed, queued or scored); beyond it, "
        "429 before the body is read.",
    )
    max_queue_delay_ms: float = Field(
        1_000.0,
        gt=0,
        description="Once throughput is measured, the queue refuses work (429) while what it holds takes "
        "longer than this to score.",
    )
    request_timeout_ms: int = Field(60_000, ge=1, description="A request's deadline in the queue (503).")
    drain_timeout_s: float = Field(30.0, ge=0)

    # --- HTTP edge -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted Bearer keys (comma separated); empty disables auth."
    )
    metrics_require_auth: bool = False
    max_documents_per_request: int = Field(1_000, ge=1)
    max_document_chars: int = Field(100_000, ge=1)
    max_query_chars: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(20_000_000, ge=1)
    max_chunks_per_doc_limit: int = Field(
        64, ge=1, description="Upper bound on a request's max_chunks_per_doc."
    )
    chunk_tokens: int = Field(
        512, ge=16, description="Document tokens per chunk when a request asks for chunking."
    )
    log_level: str = "info"

    # --- connections (gateway/http_server.py) -------------------------------------------------------
    header_read_timeout_s: float = Field(
        10.0, gt=0, description="A request's headers must arrive within this time of its first byte (408)."
    )
    body_read_timeout_s: float = Field(
        60.0, gt=0, description="A request's whole body must arrive within this time of its headers (408)."
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle keep-alive connection is closed after this."
    )
    max_header_bytes: int = Field(
        16_384, ge=1_024, description="Request line plus headers; larger requests get 431."
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Open client connections; past it the longest-idle connection is closed to make room "
        "(503 when every one is busy). Default: 1000, or fewer to stay under the open-files limit.",
    )

    @field_validator("model_aliases", "api_keys", mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @property
    def primary_engine(self) -> EngineName:
        if self.engine:
            return self.engine
        return "vllm" if self.vllm_url else "onnx"

    @property
    def fallback(self) -> EngineName | None:
        if self.fallback_engine == "none":
            return None
        if self.fallback_engine:
            return None if self.fallback_engine == self.primary_engine else self.fallback_engine
        return "onnx" if self.primary_engine == "vllm" else None

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model


@lru_cache
def get_settings() -> Settings:
    """Settings read once per process; tests build their own `Settings(...)` instead."""
    return Settings()
