"""`rerank-gateway prepare`: make the configured model servable, the way `serve` would on first start.

It runs the gateway's own model resolution (gateway.compose.resolve_model) on the RERANK_* settings:
a prepared RERANK_MODEL_PATH is checked, an HF folder or the hub id RERANK_MODEL@RERANK_MODEL_REVISION is
exported and int8-quantized into RERANK_CACHE_DIR once. It prints the prepared folder. Containers and
Modal run it before the gateway starts, so the gateway image itself never needs torch.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="Export the configured model into the cache if needed and print the prepared folder.",
        description=(
            "Resolve the model `serve` would serve (RERANK_MODEL_PATH, else RERANK_MODEL at "
            "RERANK_MODEL_REVISION, exported into RERANK_CACHE_DIR on first use) and print its folder."
        ),
    )
    parser.add_argument("--model", default=None, help="Hub id (overrides RERANK_MODEL).")
    parser.add_argument("--revision", default=None, help="Hub revision (overrides RERANK_MODEL_REVISION).")
    parser.add_argument(
        "--model-path", default=None, type=Path, help="Prepared or HF folder (overrides RERANK_MODEL_PATH)."
    )
    parser.add_argument(
        "--cache-dir", default=None, type=Path, help="Export cache (overrides RERANK_CACHE_DIR)."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.base import ModelPreparationError
    from gateway.commands.serve import log_project_at
    from gateway.compose import resolve_model
    from gateway.config import Settings

    overrides = {
        field: value
        for field, value in (
            ("model", args.model),
            ("model_revision", args.revision),
            ("model_path", args.model_path),
            ("cache_dir", args.cache_dir),
        )
        if value is not None
    }
    settings = Settings(**overrides)
    log_project_at(settings.log_level)  # "exporting ... (first start only)" is an INFO line
    try:
        # stdout carries the folder alone (`RERANK_MODEL_PATH=$(rerank-gateway prepare)`); the export's
        # progress and verification lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            folder = resolve_model(settings)
    except ModelPreparationError as exc:
        if args.model_path is None:
            raise
        # The resolver names the setting; this user typed the flag.
        raise ModelPreparationError(
            re.sub(r"^RERANK_MODEL_PATH=", "--model-path ", str(exc), count=1)
        ) from exc.__cause__
    print(folder)
    return 0
