"""`rerank-gateway serve`: the HTTP gateway under uvicorn; SIGTERM drains in-flight requests first."""

from __future__ import annotations

import argparse
import logging

# The project's own loggers. They log at RERANK_LOG_LEVEL (default info: start-up, ready, engine state);
# the CLI keeps the root logger, and so every library, at WARNING.
PROJECT_LOGGERS = ("gateway", "engines", "core")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="Serve POST /v1/rerank (Cohere, Jina/vLLM and TEI dialects) over HTTP.",
        description=(
            "Serve the reranker over HTTP. Configuration comes from RERANK_* variables or a .env file "
            "(RERANK_MODEL_PATH: a prepared folder; otherwise RERANK_MODEL is exported on first start). "
            "On SIGTERM the server stops accepting connections and lets in-flight requests finish "
            "(up to RERANK_DRAIN_TIMEOUT_S; what is left then gets 503 with Retry-After)."
        ),
    )
    parser.add_argument("--host", default=None, help="Interface to bind (default: RERANK_HOST or 127.0.0.1).")
    parser.add_argument("--port", default=None, type=int, help="Port (default: RERANK_PORT or 8080).")
    parser.set_defaults(func=run)


def log_project_at(level: str) -> None:
    """Show the project's own log lines from `level` up (a name such as info or warning)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"RERANK_LOG_LEVEL={level!r}: use debug, info, warning or error")
    # Never quieter than the root logger (--verbose sets it to DEBUG).
    level = min(numeric, logging.getLogger().getEffectiveLevel())
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def run(args: argparse.Namespace) -> int:
    from engines.model_store import verify_model_dir
    from gateway.app import create_app
    from gateway.compose import resolve_model
    from gateway.config import get_settings
    from gateway.http_server import serve_app

    settings = get_settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    if not 0 <= settings.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {settings.port}")
    log_project_at(settings.log_level)
    # Resolved and checked before uvicorn starts, so a missing or corrupt model is the same one error line
    # as `rank` prints, not a lifespan traceback.
    model_dir = resolve_model(settings)
    if "onnx" in (settings.primary_engine, settings.fallback):
        verify_model_dir(model_dir, settings.quantization, settings.verify_hashes)
        # Just checked, hashes included: the engine need not read every file a second time at load.
        settings = settings.model_copy(update={"verify_hashes": False})
    app = create_app(settings, model_dir=model_dir)
    return serve_app(app, settings)
