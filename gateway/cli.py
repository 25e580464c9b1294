"""`rerank-gateway`: one CLI, one module per subcommand under gateway/commands/.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func`. Modules import
their heavy dependencies inside `func`, so `--help` stays fast and serving never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from engines.base import EngineError, ModelPreparationError

COMMAND_MODULES = (
    "gateway.commands.serve",
    "gateway.commands.rank",
    "gateway.commands.batch",
    "gateway.commands.client",
    "gateway.commands.export",
    "gateway.commands.prepare",
    "gateway.commands.vllm",
    "gateway.commands.bench",
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-gateway",
        description="Serve and run the mxbai-rerank-v2 rerankers (ONNX on CPU, vLLM on GPU).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging and full tracebacks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("rerank-gateway: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ModelPreparationError, EngineError, FileNotFoundError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"rerank-gateway {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if args.verbose:
            raise
        print(
            f"rerank-gateway {args.command}: error: the Python package {exc.name!r} is missing; "
            "install the extra this command needs (see README: pip install 'rerank-gateway[export]' "
            "or '[reference]' or '[bench]')",
            file=sys.stderr,
        )
        return 2
    return int(result or 0)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so `CLIError` is one class everywhere.
    from gateway.cli import main as _main

    sys.exit(_main())
