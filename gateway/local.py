"""What the `rank` and `batch` commands share: input files, settings from flags, and their results.

Ranking itself is the server's RerankService (same limits, chunking, top_n, normalization), built by
gateway.compose and called in this process, with no HTTP in between. Inputs, the service's limits included,
are checked before the model is loaded, so a typo in a file costs no model load, and every bad input raises
`InputError`, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.service import RerankOutcome, RerankQuery, RerankService

LOCAL_ENGINES = ("onnx", "reference")
DEVICES = ("auto", "cpu", "cuda", "mps")


class InputError(ValueError):
    """A bad command-line input (file, flag or model); the CLI prints it as one line.

    A ValueError rather than gateway.cli.CLIError: under `python -m gateway.cli` the CLI module runs as
    `__main__`, so a CLIError imported from `gateway.cli` is a different class that its handler misses.
    """


# --- input files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One query of a batch, with its documents and options."""

    query: str
    documents: tuple[str, ...]
    instruction: str | None = None
    top_k: int | None = None


def read_json_file(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning every way it can fail into one InputError line."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} {str(p)!r}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{what} {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc


def parse_documents(value: Any, where: str) -> tuple[str, ...]:
    """A non-empty list of strings or of objects with a string `text`, as document texts."""
    if not isinstance(value, list):
        raise InputError(
            f"{where} must be a JSON list of strings or of objects with a 'text' field, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise InputError(f"{where} is an empty list: give at least one document")
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, dict):
            raise InputError(f"{where}: document {i} is an object without a string 'text' field")
        else:
            raise InputError(
                f"{where}: document {i} must be a string or an object with 'text', got {type(item).__name__}"
            )
    return tuple(texts)


def load_documents(path: str | Path) -> tuple[str, ...]:
    """Documents of a docs file: a JSON list of strings or of objects with `text` (or {"documents": list})."""
    data = read_json_file(path, "docs file")
    where = f"docs file {str(path)!r}"
    if isinstance(data, dict) and "documents" in data:
        # A single case file (such as data/hf_harper_lee.json) doubles as a docs file.
        return parse_documents(data["documents"], f"{where} 'documents'")
    return parse_documents(data, where)


def check_query(query: Any, where: str) -> str:
    if not isinstance(query, str):
        raise InputError(f"{where}: the query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise InputError(f"{where}: the query is empty")
    return query


def parse_top_k(value: Any, where: str) -> int | None:
    """None (every document) or an integer >= 1; strings come from the command line."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"{where} must be a whole number >= 1, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise InputError(f"{where} must be at least 1, got {value}")
    return value


def load_cases(
    path: str | Path, *, default_instruction: str | None = None, default_top_k: int | None = None
) -> list[Case]:
    """Cases of a cases file: `{"cases": [{"query", "documents", "instruction"?, "top_k"?}]}`."""
    data = read_json_file(path, "cases file")
    where = f"cases file {str(path)!r}"
    if isinstance(data, dict) and "cases" not in data and "query" in data:
        data = {"cases": [data]}  # one case on its own, such as data/hf_harper_lee.json
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise InputError(f'{where} must be a JSON object {{"cases": [{{"query": ..., "documents": [...]}}]}}')
    if not data["cases"]:
        raise InputError(f"{where} has no cases")
    cases = []
    for i, raw in enumerate(data["cases"]):
        at = f"{where}, case {i}"
        if not isinstance(raw, dict):
            raise InputError(f"{at} must be an object with 'query' and 'documents'")
        for key in ("query", "documents"):
            if key not in raw:
                raise InputError(f"{at} has no {key!r}")
        instruction = raw.get("instruction", default_instruction)
        if instruction is not None and not isinstance(instruction, str):
            raise InputError(f"{at}: 'instruction' must be a string")
        cases.append(
            Case(
                query=check_query(raw["query"], at),
                documents=parse_documents(raw["documents"], f"{at} 'documents'"),
                instruction=instruction or None,
                top_k=parse_top_k(raw.get("top_k", default_top_k), f"{at} 'top_k'"),
            )
        )
    return cases


# --- flags and settings -----------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every local command shares. Engine, device and top-k are checked by hand, not by argparse,
    so a bad value is one error line rather than a usage dump."""
    parser.add_argument(
        "--top-k", default=None, metavar="K", help="Keep the K best documents (default: all)."
    )
    parser.add_argument(
        "--engine",
        default=None,
        metavar="{onnx,reference}",
        help="onnx (default: the prepared int8 or fp32 graph) or reference (the official wrapper).",
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="{auto,cpu,cuda,mps}",
        help="Where the engine runs (default: RERANK_DEVICE or auto).",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="M",
        help="A local model folder (prepared or Hugging Face) or a hub id; "
        "default: RERANK_MODEL_PATH, else RERANK_MODEL.",
    )
    parser.add_argument("--revision", default=None, metavar="R", help="Hub revision (branch, tag or commit).")
    parser.add_argument("--instruction", default=None, metavar="I", help="Instruction added to every query.")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="Add relevance_score = sigmoid(score - estimated_max / 2) to each result.",
    )
    parser.add_argument(
        "--no-documents", action="store_true", help="Leave document texts out of the results."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="Print nothing but the results.")


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or Path(model).expanduser().exists()


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from RERANK_ variables and .env, with the command-line flags on top."""
    from pydantic import ValidationError

    from gateway.config import Settings

    overrides: dict[str, Any] = {}
    if args.model:
        if _looks_like_path(args.model):
            overrides["model_path"] = Path(args.model).expanduser()
        else:
            # A hub id given on the command line wins over a RERANK_MODEL_PATH from the environment.
            overrides["model"] = args.model
            overrides["model_path"] = None
    if args.revision:
        overrides["model_revision"] = args.revision
    if args.device is not None:
        if args.device not in DEVICES:
            raise InputError(f"unknown device {args.device!r}: choose one of {', '.join(DEVICES)}")
        overrides["device"] = args.device
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise InputError(
            f"invalid setting {field} (flag or RERANK_{field.upper()}): {first['msg']}"
        ) from None


def engine_name_from_args(args: argparse.Namespace, settings: Settings) -> str:
    """The local engine: --engine, else RERANK_ENGINE when it is a local one, else onnx."""
    name = args.engine
    if name is None:
        name = settings.engine if settings.engine in LOCAL_ENGINES else "onnx"
    if name not in LOCAL_ENGINES:
        raise InputError(
            f"unknown engine {name!r}: local commands run {' or '.join(LOCAL_ENGINES)} "
            "(use `rerank-gateway serve` for vllm)"
        )
    return name


def check_model_location(settings: Settings) -> None:
    """Fail early, in one line, when the configured local model folder does not exist."""
    path = settings.model_path
    if path is None:
        return
    if not path.exists():
        raise InputError(f"model folder {str(path)!r} does not exist (set by --model or RERANK_MODEL_PATH)")
    if not path.is_dir():
        raise InputError(f"model path {str(path)!r} is not a folder (set by --model or RERANK_MODEL_PATH)")


def info(quiet: bool, message: str) -> None:
    """Progress and facts for people, on stderr, so stdout stays pure JSON."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# --- the service, in this process ------------------------------------------------------------------


def rerank_query(
    query: str,
    documents: Sequence[str],
    *,
    instruction: str | None = None,
    top_k: int | None = None,
    normalize: bool = False,
) -> RerankQuery:
    """The service's query for one command-line ranking (raw scores unless --normalize)."""
    from gateway.service import RerankQuery

    return RerankQuery(
        query=query,
        documents=tuple(documents),
        instruction=instruction or None,
        top_n=top_k,
        raw_scores=not normalize,
    )


def check_limits(settings: Settings, query: RerankQuery, where: str | None = None) -> None:
    """The server's request limits, checked before the model loads; the server's message, with `where`."""
    from core.errors import InputRejected
    from gateway.compose import service_limits

    try:
        service_limits(settings).check(query)
    except InputRejected as exc:
        raise InputError(f"{where}: {exc}" if where else str(exc)) from None


@contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Under --quiet, hold back the chatter of model loading (export progress, library warnings)."""
    if not quiet:
        yield
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


async def open_service(
    settings: Settings, engine_name: str, *, normalize: bool, quiet: bool = True
) -> tuple[RerankService, Path]:
    """The server's RerankService on a started local engine (gateway.compose), and the model folder."""
    from gateway.compose import start_local_service

    check_model_location(settings)
    if engine_name == "onnx" and settings.device not in ("auto", "cpu"):
        info(quiet, f"note: the onnx engine runs on the CPU; --device {settings.device} is for reference")
    started = time.perf_counter()
    with _silenced(quiet):
        service, model_dir = await start_local_service(
            settings,
            engine_name,  # type: ignore[arg-type]
            normalize=normalize,
        )
    info(
        quiet,
        f"loaded {model_dir} on the {engine_name} engine"
        + (f" ({settings.quantization})" if engine_name == "onnx" else "")
        + f" in {time.perf_counter() - started:.1f} s",
    )
    return service, model_dir


def results(
    outcome: RerankOutcome, documents: Sequence[str], *, normalize: bool, return_documents: bool = True
) -> list[dict[str, Any]]:
    """The service's ranking as the CLI prints it: {index, score (raw), relevance_score?, document?}."""
    rows = []
    for r in outcome.ranked:
        row: dict[str, Any] = {"index": r.index, "score": r.raw_score}
        if normalize:
            row["relevance_score"] = r.score
        if return_documents:
            row["document"] = documents[r.index]
        rows.append(row)
    return rows


def run(coro: Any) -> Any:
    """Run one coroutine to completion from synchronous command code."""
    return asyncio.run(coro)


def write_json(data: Any, output: str | None) -> None:
    """JSON to stdout, or to a file when `output` is given."""
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
