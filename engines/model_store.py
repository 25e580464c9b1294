"""The prepared model folder: its manifest, and the checks made before an engine loads anything.

A prepared folder is what `rerank-gateway export` writes: ONNX graphs, tokenizer, config and
`rerank_manifest.json`. The manifest records every file's size and sha256 and the scoring contract the
graphs were exported for; `verify_model_dir` checks them. engines/export.py writes such folders and
engines/resolve.py finds or exports one; this module imports neither (it needs no torch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.contract import CONTRACT_VERSION
from engines.base import ModelPreparationError

MANIFEST_NAME = "rerank_manifest.json"
MANIFEST_FORMAT = 1
# Files every prepared folder carries besides the graphs: the contract needs both at serving time.
REQUIRED_SIDE_FILES = ("config.json", "tokenizer.json")
QUANTIZATIONS = ("fp32", "int8")
WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin")

PREPARE_HINT = (
    "prepare it once with `rerank-gateway export <hub id or HF folder> --out DIR` "
    "(needs the export extra: pip install 'rerank-gateway[export]') and point RERANK_MODEL_PATH at DIR"
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a prepared folder, as recorded at export."""

    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What `rerank-gateway export` recorded about a prepared folder."""

    source: str
    revision: str | None
    contract_version: str
    # quantization name ("fp32", "int8") -> the graph file, then its external-data files.
    graphs: dict[str, tuple[str, ...]]
    files: dict[str, FileEntry]
    yes_id: int
    no_id: int
    pad_id: int
    estimated_max: float
    max_position_embeddings: int
    # quantization name -> what export recorded of it: scheme, measured fidelity, the bound it passed.
    precision: dict[str, dict]
    raw: dict
    # quantization name -> the chunked-prefill graph (long prompts) and its data files; absent in folders
    # exported before it existed, which are served one-shot.
    chunk_graphs: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def graph_file(self, quantization: str) -> str:
        """The .onnx file of one quantization (external data files sit next to it)."""
        if quantization not in self.graphs:
            have = ", ".join(sorted(self.graphs)) or "none"
            raise ModelPreparationError(
                f"this prepared model has no {quantization} graph (it has: {have}); re-export with "
                f"`rerank-gateway export {self.source} --quantize "
                f"{'int8' if quantization == 'int8' else 'none'}` or set RERANK_QUANTIZATION to one it has"
            )
        return self.graphs[quantization][0]


def sha256_file(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks (graphs are up to a few GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(size_bytes=path.stat().st_size, sha256=sha256_file(path))


def load_manifest(model_dir: str | Path) -> Manifest:
    """Read and validate `rerank_manifest.json`; a missing or malformed one is a ModelPreparationError."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ModelPreparationError(f"model folder {model_dir} does not exist; {PREPARE_HINT}")
    if not path.is_file():
        raise ModelPreparationError(
            f"{model_dir} is not a prepared model folder (no {MANIFEST_NAME}); {PREPARE_HINT}"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        files = {
            name: FileEntry(size_bytes=int(e["size_bytes"]), sha256=str(e["sha256"]))
            for name, e in raw["files"].items()
        }
        return Manifest(
            source=str(raw["source"]),
            revision=raw.get("revision"),
            contract_version=str(raw["contract_version"]),
            graphs={q: tuple(names) for q, names in raw["graphs"].items()},
            files=files,
            yes_id=int(raw["yes_id"]),
            no_id=int(raw["no_id"]),
            pad_id=int(raw.get("pad_id", 0)),
            estimated_max=float(raw["estimated_max"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            precision={str(k): dict(v) for k, v in raw.get("precision", {}).items()},
            raw=raw,
            chunk_graphs={q: tuple(names) for q, names in raw.get("chunk_graphs", {}).items()},
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelPreparationError(
            f"{path} is malformed ({type(exc).__name__}: {exc}); re-export the model: {PREPARE_HINT}"
        ) from exc


def verify_model_dir(
    model_dir: str | Path, quantization: str = "fp32", verify_hashes: bool = True
) -> Manifest:
    """Check a prepared folder before loading it: contract version, files present, sizes, hashes."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    if manifest.contract_version != CONTRACT_VERSION:
        raise ModelPreparationError(
            f"{model_dir} was exported for scoring contract {manifest.contract_version!r}, but this gateway "
            f"implements {CONTRACT_VERSION!r}; re-export it with this version's `rerank-gateway export`"
        )
    if quantization not in QUANTIZATIONS:
        raise ModelPreparationError(f"unknown quantization {quantization!r}: choose fp32 or int8")
    needed = [*manifest.graphs.get(quantization, ()), *REQUIRED_SIDE_FILES]
    manifest.graph_file(quantization)  # raises a clear error when that graph was not exported
    needed += [n for n in manifest.chunk_graphs.get(quantization, ()) if n not in needed]
    for name in needed:
        entry = manifest.files.get(name)
        path = model_dir / name
        if entry is None:
            raise ModelPreparationError(
                f"{model_dir}/{MANIFEST_NAME} does not list {name}; re-export the model"
            )
        if not path.is_file():
            raise ModelPreparationError(
                f"{path} is missing from the prepared model folder; re-export the model"
            )
        size = path.stat().st_size
        if size != entry.size_bytes:
            raise ModelPreparationError(
                f"{path} is {size} bytes but the manifest says {entry.size_bytes}: the file is truncated or "
                "was replaced; copy it again or re-export the model"
            )
        if verify_hashes and sha256_file(path) != entry.sha256:
            raise ModelPreparationError(
                f"{path} does not match the sha256 in {MANIFEST_NAME}: the file is corrupt or was replaced; "
                "copy it again or re-export the model (RERANK_VERIFY_HASHES=false skips this check)"
            )
    return manifest


def is_prepared_dir(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model folder: config.json and weights."""
    if not (path / "config.json").is_file():
        return False
    return any(any(path.glob(pattern)) for pattern in WEIGHT_FILE_PATTERNS)
