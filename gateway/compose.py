"""The composition root: the one place that turns `Settings` into the model folder, engines and the service.

Engines take plain arguments and report through an `EngineObserver`; this module reads the settings,
fills in each engine's defaults, wires the Prometheus observer in, and is what the app's lifespan, the
CLI commands, the benchmarks and the deployments call. Engine modules are imported lazily: the reference
engine pulls torch, which serving never needs.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
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
    from gateway.config import EngineName, Settings
    from gateway.scheduler import Scheduler
    from gateway.service import RerankLimits, RerankOutcome, RerankService


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


def build_vllm(settings: Settings) -> Engine:
    """The vLLM sidecar engine; with several comma-separated URLs, a pool balancing across them."""
    from engines.vllm_engine import DEFAULT_HEALTH_TIMEOUT_MS, VllmEngine
    from engines.vllm_pool import VllmPool, parse_urls

    if not settings.vllm_url:
        raise ValueError("the vllm engine needs the sidecar's URL: set RERANK_VLLM_URL")
    urls = parse_urls(settings.vllm_url)
    backends = [
        VllmEngine(
            url,
            model=settings.vllm_model or settings.model,
            api_key=settings.vllm_api_key,
            connect_timeout_ms=settings.vllm_connect_timeout_ms,
            request_timeout_ms=settings.vllm_request_timeout_ms,
            health_timeout_ms=min(DEFAULT_HEALTH_TIMEOUT_MS, settings.vllm_request_timeout_ms),
            max_connections=settings.vllm_max_connections,
        )
        for url in urls
    ]
    if len(backends) == 1:
        return backends[0]
    from gateway.metrics import POOL_OBSERVER

    return VllmPool(
        backends,
        failure_threshold=settings.breaker_failure_threshold,
        reset_ms=settings.breaker_reset_ms,
        probe_interval_ms=settings.health_probe_interval_ms,
        observer=POOL_OBSERVER,
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

# Where each of the service's limits is configured, named in its error messages.
LIMIT_SOURCES = {
    "max_documents": "RERANK_MAX_DOCUMENTS_PER_REQUEST",
    "max_query_chars": "RERANK_MAX_QUERY_CHARS",
    "max_document_chars": "RERANK_MAX_DOCUMENT_CHARS",
    "max_chunks_per_doc": "RERANK_MAX_CHUNKS_PER_DOC_LIMIT",
    "chunk_tokens": "RERANK_CHUNK_TOKENS",
    "timeout_s": "RERANK_REQUEST_TIMEOUT_MS",
    "estimated_max": "RERANK_ESTIMATED_MAX",
}


def service_limits(settings: Settings) -> RerankLimits:
    """The service's request limits from the settings (the same for the server and the CLI)."""
    from gateway.service import RerankLimits

    return RerankLimits(
        max_documents=settings.max_documents_per_request,
        max_query_chars=settings.max_query_chars,
        max_document_chars=settings.max_document_chars,
        max_chunks_per_doc=settings.max_chunks_per_doc_limit,
        chunk_tokens=settings.chunk_tokens,
        timeout_s=settings.request_timeout_ms / 1000.0,
        sources=LIMIT_SOURCES,
    )


def count_documents(outcome: RerankOutcome) -> None:
    """The service's outcome as the rerank_documents_{truncated,chunked}_total metrics."""
    from gateway.metrics import DOCUMENTS_CHUNKED, DOCUMENTS_TRUNCATED

    if outcome.documents_truncated:
        DOCUMENTS_TRUNCATED.inc(outcome.documents_truncated)
    if outcome.documents_chunked:
        DOCUMENTS_CHUNKED.inc(outcome.documents_chunked)


def build_service(
    settings: Settings,
    builder: PromptBuilder,
    engine: Engine,
    model_dir: Path | None,
) -> RerankService:
    """The server's rerank service over `engine`: the settings' limits, the model's normalization constant,
    and the documents it truncated or chunked counted in Prometheus."""
    from gateway.service import RerankService

    return RerankService(
        builder,
        engine,
        limits=service_limits(settings),
        estimated_max=estimated_max_of(settings, model_dir),
        on_outcome=count_documents,
    )


# --- the names a request's `model` may use ---------------------------------------------------------------


def served_names(settings: Settings) -> list[str]:
    """Every name a request's `model` may use: the served name first, then the hub id and the aliases.

    RERANK_MODEL counts only when it is what is served (no RERANK_MODEL_PATH) or was set explicitly: a
    default hub id must not be announced for a folder that holds another model.
    """
    names = [settings.public_model_name]
    if settings.model_path is None or "model" in settings.model_fields_set:
        names.append(settings.model)
    names.extend(settings.model_aliases)
    return list(dict.fromkeys(n for n in names if n))


def manifest_model_name(model_dir: Path) -> str | None:
    """The name a prepared folder's manifest gives its model: the hub id, or a local source's folder name."""
    from engines.model_store import load_manifest

    try:
        source = load_manifest(model_dir).source
    except (ModelPreparationError, OSError, ValueError):
        return None  # the engine reports a broken folder itself, with a better message
    if not isinstance(source, str) or not source.strip():
        return None
    source = source.strip()
    # A hub id is `owner/name`; anything else is a path on the exporting machine: its last part names it.
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and "\\" not in source
    return source if is_hub_id else (PurePath(source.replace("\\", "/")).name or None)


def with_served_name(settings: Settings, model_dir: Path) -> Settings:
    """Settings naming the served model: RERANK_SERVED_MODEL_NAME, else the manifest's source, else the id."""
    if settings.served_model_name:
        return settings
    name = manifest_model_name(model_dir)
    if not name or name == settings.model:
        return settings
    return settings.model_copy(update={"served_model_name": name})


def check_model_name(settings: Settings, name: str | None) -> None:
    """ModelNotFound (404) unless `name` is absent or one of the served names."""
    from gateway.errors import ModelNotFound, clip

    if name is None:
        return
    names = served_names(settings)
    if name not in names:
        raise ModelNotFound(
            f"model {clip(name)} is not served here: use {names[0]!r} or leave `model` out"
            + (f" (also accepted: {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else "")
            + "; more names can be added with RERANK_MODEL_ALIASES",
            param="model",
            code="model_not_found",
        )


# --- the scheduler --------------------------------------------------------------------------------------


def build_scheduler(settings: Settings, engine: Engine) -> Scheduler:
    """The batching scheduler in front of `engine`, reporting to the Prometheus metrics."""
    from gateway.metrics import SCHEDULER_OBSERVER
    from gateway.scheduler import Scheduler

    return Scheduler(
        engine,
        max_queued_tokens=settings.max_queued_tokens,
        max_wait_ms=settings.max_wait_ms,
        request_timeout_ms=settings.request_timeout_ms,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        observer=SCHEDULER_OBSERVER,
    )


# --- the CLI's local service (`rank`, `batch`) ------------------------------------------------------------

# What the prompt builder reads; the wrapper downloads the weights into the same hub cache.
TOKENIZER_PATTERNS = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def hub_tokenizer_dir(model_id: str, revision: str | None) -> Path:
    """Config and tokenizer files of a hub model, fetched into the standard Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=list(TOKENIZER_PATTERNS)))
    except (OSError, ValueError) as exc:  # hub errors (offline, 404, auth) are OSErrors
        raise ModelPreparationError(
            f"could not fetch {model_id!r} from the Hugging Face hub ({type(exc).__name__}); without hub "
            "access, copy the model's Hugging Face folder here and pass it with --model"
        ) from exc


def local_model_dir(settings: Settings, engine_name: str) -> Path:
    """The folder a local engine loads: a prepared one, or the reference engine's HF weights as they are."""
    if engine_name == "reference":
        # The wrapper loads the torch weights itself: exporting ONNX graphs first would be wasted minutes.
        source = reference_source(settings, None)
        if Path(source).expanduser().is_dir():
            return Path(source).expanduser()
        if settings.model_path is None:
            return hub_tokenizer_dir(source, reference_revision(settings))
    return resolve_model(settings)


async def start_local_service(
    settings: Settings, engine_name: EngineName, *, normalize: bool
) -> tuple[RerankService, Path]:
    """A started engine behind the same RerankService as the server (same limits, chunking, top_n), for the
    CLI: no scheduler, no metrics and no deadline. Returns the service and the model folder it loaded."""
    from dataclasses import replace

    from core.contract import PromptBuilder
    from gateway.service import RerankService

    model_dir = local_model_dir(settings, engine_name)
    builder = PromptBuilder.from_dir(model_dir, max_length=settings.max_length)
    # Raw scores need no constant: a model of unknown shape can still be ranked without --normalize.
    estimated_max = estimated_max_of(settings, model_dir) if normalize else None
    engine = build_engine(engine_name, settings, model_dir)
    limits = replace(service_limits(settings), timeout_s=None)
    service = RerankService(builder, engine, limits=limits, estimated_max=estimated_max)
    await engine.start()
    return service, model_dir
