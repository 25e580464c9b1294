"""Where a served model comes from: a prepared folder, a plain HF folder, or the hub (exported once, cached).

Above engines/model_store.py (the prepared folder's format) and engines/export.py (which writes one): a
folder that is not prepared yet is exported into the cache, under a file lock, atomically. Exporting
(torch, transformers) is imported only when an export actually has to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engines.base import ModelPreparationError
from engines.model_store import MANIFEST_NAME, PREPARE_HINT, is_hf_dir, is_prepared_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Which model to serve and where prepared copies are kept (gateway.compose builds it from settings)."""

    # Hub id, used when `model_path` is None.
    model: str
    revision: str | None
    cache_dir: Path
    # A prepared folder, or an HF folder that is exported into the cache once.
    model_path: Path | None = None
    # May a hub model missing from the cache be downloaded and exported?
    auto_export: bool = True
    estimated_max: float | None = None
    quantization: str = "fp32"


def export_available() -> bool:
    """True when the export extra (torch, transformers, onnx) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "onnx"))


def slug(text: str) -> str:
    """`text` as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-") or "model"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that several workers starting at once export a model only once.

    The lock file is removed on release, so no empty `.lock` is left in the cache; a waiter that was granted
    the lock on a file removed meanwhile takes it again on the current one, so two holders never overlap.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(str(path) + ".lock")
    while True:
        fh = open(lock_path, "a")  # noqa: SIM115 - held across the yield below
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _export_into_cache(
    source: str,
    target: Path,
    *,
    revision: str | None,
    hub_cache: Path | None,
    estimated_max: float | None = None,
    quantization: str = "fp32",
) -> Path:
    """Export `source` into `target` atomically (a half-written folder is never served)."""
    if not export_available():
        raise ModelPreparationError(
            f"no prepared copy of {source} at {target}, and this installation cannot export one (torch, "
            f"transformers and onnx are not installed); {PREPARE_HINT}"
        )
    from engines.export import export_model

    with file_lock(target):
        if is_prepared_dir(target):
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("exporting %s into %s (first start only; this takes a few minutes)", source, target)

        def say(msg: str) -> None:  # the export writes into `tmp`: its lines name the folder it becomes
            print(f"[export] {msg.replace(str(tmp), str(target))}", file=sys.stderr, flush=True)

        try:
            export_model(
                source,
                tmp,
                revision=revision,
                quantize="int8" if quantization == "int8" else "none",
                cache_dir=hub_cache,
                estimated_max=estimated_max,
                say=say,
            )
        finally:
            if hub_cache is not None:
                remove_hub_locks(hub_cache, source)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def remove_hub_locks(hub_cache: Path, repo_id: str) -> None:
    """Remove the empty lock files huggingface_hub leaves for `repo_id` in the gateway's own hub cache.

    Called under this model's file_lock, so no other export of it is downloading; other models' locks stay.
    """
    locks = Path(hub_cache) / ".locks" / f"models--{repo_id.replace('/', '--')}"
    if not locks.is_dir():
        return
    for lock in locks.glob("*.lock"):
        if lock.is_file() and lock.stat().st_size == 0:
            lock.unlink(missing_ok=True)
    for folder in (locks, locks.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def hub_cache_target(source: ModelSource) -> Path:
    """Where the prepared copy of the hub model `source.model` at `source.revision` is kept."""
    revision = slug(source.revision or "default")
    return Path(source.cache_dir) / "prepared" / f"{slug(source.model)}@{revision}"


def resolve_model(source: ModelSource) -> Path:
    """The prepared model folder to serve, exporting it into the cache first when needed and allowed."""
    if source.model_path is not None:
        path = Path(source.model_path).expanduser()
        if not path.is_dir():
            raise ModelPreparationError(f"RERANK_MODEL_PATH={path} is not a folder; {PREPARE_HINT}")
        if is_prepared_dir(path):
            return path
        if is_hf_dir(path):
            resolved = path.resolve()
            key = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
            target = Path(source.cache_dir) / "prepared" / f"local--{slug(resolved.name)}-{key}"
            if is_prepared_dir(target):
                return target
            return _export_into_cache(
                str(resolved),
                target,
                revision=None,
                hub_cache=None,
                estimated_max=source.estimated_max,
                quantization=source.quantization,
            )
        raise ModelPreparationError(
            f"RERANK_MODEL_PATH={path} is neither a prepared model folder ({MANIFEST_NAME}) nor a "
            f"Hugging Face model folder (config.json and weights); {PREPARE_HINT}"
        )

    target = hub_cache_target(source)
    if is_prepared_dir(target):
        return target
    if not source.auto_export:
        raise ModelPreparationError(
            f"no prepared copy of {source.model} in {target.parent} and RERANK_AUTO_EXPORT is off; "
            f"{PREPARE_HINT}"
        )
    return _export_into_cache(
        source.model,
        target,
        revision=source.revision,
        hub_cache=Path(source.cache_dir) / "hub",
        estimated_max=source.estimated_max,
        quantization=source.quantization,
    )
