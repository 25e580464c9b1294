"""The composition root: the one place that turns `Settings` into the model folder, engines and the service.

Engines take plain arguments and report through an `EngineObserver`; this module reads the settings,
fills in each engine's defaults, wires the Prometheus observer in, and is what the app's lifespan, the
CLI commands, the benchmarks and the deployments call. Engine modules are imported lazily: the reference
engine pulls torch, which serving never needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from engines.base import NULL_OBSERVER, Engine, EngineObserver, ModelPreparationError
from engines.model_store import MANIFEST_NAME
from engines.resolve import ModelSource
from engines.resolve import resolve_model as resolve_source

if TYPE_CHECKING:
    from core.contract import PromptBuilder
    from engines.onnx_engine import OnnxEngine
    from engines.reference import ReferenceEngine
    from engines.router import RoutedEngine
    from engines.vllm_engine import VllmEngine
    from gateway.config import EngineName, Settings
    from gateway.service import RerankService


# --- the model folder ---------------------------------------------------------------------------------


def model_source(settings: Settings) -> ModelSource:
    """The model the settings name, and where prepared copies are kept."""
    return ModelSource(
        model=settings.model,
        revision=settings.model_revision,
        cache_dir=Path(settings.cache_dir),
        model_path=settings.model_path,
        auto_export=settings.auto_export,
        estimated_max=settings.estimated_max,
        quantization=settings.quantization,
    )


def resolve_model(settings: Settings) -> Path:
    """The prepared model folder to serve, exported into the cache first when needed and allowed."""
    return resolve_source(model_source(settings))


def estimated_max_of(settings: Settings, model_dir: Path | None) -> float:
    """Normalization constant: settings, else the prepared model's manifest, else the model itself.

    An HF folder (the reference engine's) is recognised by its config's shape; a model whose constant cannot
    be told is a ModelPreparationError naming RERANK_ESTIMATED_MAX, never a silent guess.
    """
    from core.contract import ESTIMATED_MAX, resolve_estimated_max

    if settings.estimated_max is not None:
        return settings.estimated_max
    if model_dir is not None and (model_dir / MANIFEST_NAME).is_file():
        try:
            value = json.loads((model_dir / MANIFEST_NAME).read_text()).get("estimated_max")
        except (OSError, ValueError):
            value = None
        if isinstance(value, (int, float)):
            return float(value)
    hub_id = settings.model if settings.model_path is None else None
    if model_dir is not None and (model_dir / "config.json").is_file():
        try:
            config = json.loads((model_dir / "config.json").read_text())
            return resolve_estimated_max(config=config, hub_id=hub_id)[0]
        except (OSError, ValueError) as exc:
            raise ModelPreparationError(str(exc)) from exc
    if settings.model in ESTIMATED_MAX:
        return ESTIMATED_MAX[settings.model]
    raise ModelPreparationError(
        f"cannot tell the normalization constant of {settings.model}; set RERANK_ESTIMATED_MAX "
        "(9.0 for base-v2 models, 12.0 for large-v2)"
    )


# --- engines --------------------------------------------------------------------------------------------


def build_onnx(settings: Settings, model_dir: Path) -> OnnxEngine:
    from engines.onnx_engine import DEFAULT_MAX_BATCH_PAIRS, DEFAULT_MAX_BATCH_TOKENS, OnnxEngine

    return OnnxEngine(
        model_dir,
        quantization=settings.quantization,
        intra_op_threads=settings.onnx_intra_op_threads,
        inter_op_threads=settings.onnx_inter_op_threads,
        max_batch_tokens=settings.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
        max_batch_pairs=settings.max_batch_pairs or DEFAULT_MAX_BATCH_PAIRS,
        verify_hashes=settings.verify_hashes,
    )


def reference_source(settings: Settings, model_dir: Path | None) -> str:
    """The HF weights the reference engine loads (see Settings.reference_model)."""
    from engines.reference import reference_source as source

    return source(
        model_dir,
        reference_model=settings.reference_model,
        model_path=settings.model_path,
        hub_model=settings.model,
    )


def reference_revision(settings: Settings) -> str | None:
    """The hub revision of the reference weights: RERANK_MODEL_REVISION, unless another model is named."""
    return None if settings.reference_model else settings.model_revision


def build_reference(settings: Settings, model_dir: Path | None) -> ReferenceEngine:
    from engines.reference import DEFAULT_MAX_BATCH_PAIRS, DEFAULT_MAX_BATCH_TOKENS, ReferenceEngine

    return ReferenceEngine(
        reference_source(settings, model_dir),
        device=settings.device,
        max_length=settings.max_length,
        revision=reference_revision(settings),
        max_batch_tokens=settings.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
        max_batch_pairs=settings.max_batch_pairs or DEFAULT_MAX_BATCH_PAIRS,
    )


def build_vllm(settings: Settings) -> VllmEngine:
    from engines.vllm_engine import DEFAULT_HEALTH_TIMEOUT_MS, VllmEngine

    if not settings.vllm_url:
        raise ValueError("the vllm engine needs the sidecar's URL: set RERANK_VLLM_URL")
    return VllmEngine(
        settings.vllm_url,
        model=settings.vllm_model or settings.model,
        api_key=settings.vllm_api_key,
        connect_timeout_ms=settings.vllm_connect_timeout_ms,
        request_timeout_ms=settings.vllm_request_timeout_ms,
        health_timeout_ms=min(DEFAULT_HEALTH_TIMEOUT_MS, settings.vllm_request_timeout_ms),
        max_connections=settings.vllm_max_connections,
    )


def build_engine(name: EngineName, settings: Settings, model_dir: Path | None) -> Engine:
    """One engine by name. `model_dir` is the prepared model folder (None only for vllm)."""
    if name == "onnx":
        if model_dir is None:
            raise ValueError("the onnx engine needs a prepared model folder")
        return build_onnx(settings, model_dir)
    if name == "reference":
        return build_reference(settings, model_dir)
    if name == "vllm":
        return build_vllm(settings)
    raise ValueError(f"unknown engine {name!r}: choose onnx, reference or vllm")


def build_router(
    primary: Engine, fallback: Engine, settings: Settings, observer: EngineObserver = NULL_OBSERVER
) -> RoutedEngine:
    from engines.router import RoutedEngine

    return RoutedEngine(
        primary,
        fallback,
        failure_threshold=settings.breaker_failure_threshold,
        reset_ms=settings.breaker_reset_ms,
        probe_interval_ms=settings.health_probe_interval_ms,
        observer=observer,
    )


def build_serving_engine(
    settings: Settings, model_dir: Path | None, observer: EngineObserver | None = None
) -> Engine:
    """The primary engine, behind a router with the fallback when one is configured.

    The router reports to `observer`, by default the Prometheus metrics (gateway.metrics).
    """
    primary = build_engine(settings.primary_engine, settings, model_dir)
    fallback_name = settings.fallback
    if fallback_name is None:
        return primary
    if observer is None:
        from gateway.metrics import ENGINE_OBSERVER

        observer = ENGINE_OBSERVER
    fallback = build_engine(fallback_name, settings, model_dir)
    return build_router(primary, fallback, settings, observer)


# --- the service ----------------------------------------------------------------------------------------


def build_service(
    settings: Settings, builder: PromptBuilder, engine: Engine, model_dir: Path | None
) -> RerankService:
    """The rerank service over `engine`, with the model's normalization constant."""
    from gateway.service import RerankService

    return RerankService(settings, builder, engine, estimated_max=estimated_max_of(settings, model_dir))
