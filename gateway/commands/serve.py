"""`rerank-gateway serve`: the HTTP gateway under uvicorn; SIGTERM drains in-flight requests first."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="Serve POST /v1/rerank (Cohere, Jina/vLLM and TEI dialects) over HTTP.",
        description=(
            "Serve the reranker over HTTP. Configuration comes from RERANK_* variables or a .env file "
            "(RERANK_MODEL_PATH: a prepared folder; otherwise RERANK_MODEL is exported on first start). "
            "On SIGTERM the server stops accepting connections and lets in-flight requests finish "
            "(up to RERANK_DRAIN_TIMEOUT_S)."
        ),
    )
    parser.add_argument("--host", default=None, help="Interface to bind (default: RERANK_HOST or 127.0.0.1).")
    parser.add_argument("--port", default=None, type=int, help="Port (default: RERANK_PORT or 8080).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from engines.model_store import resolve_model
    from gateway.app import create_app
    from gateway.config import get_settings

    settings = get_settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    if not 0 <= settings.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {settings.port}")
    # Resolved before uvicorn starts, so a missing model is one clear error line, not a lifespan traceback.
    model_dir = resolve_model(settings)
    app = create_app(settings, model_dir=model_dir)
    # uvicorn drains on SIGTERM, restores the handler it found, then re-raises the signal. With SIGTERM
    # ignored beforehand that re-raise is a no-op, so a completed drain exits 0 instead of dying by signal
    # 15 (uvicorn still catches SIGTERM itself while it serves).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
    )
    return 0
