"""`rerank-gateway prepare`: the model `serve` would load, exported once into the cache, folder printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engines.model_store import verify_model_dir


def prepare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    child_env.update(env or {}, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "prepare", *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=600,
    )


def test_prepare_exports_an_hf_folder_once_into_the_cache(tiny_hf_dir: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    # The tiny model has no published shape: its normalization constant must be given.
    first = prepare(
        "--model-path", str(tiny_hf_dir), "--cache-dir", str(cache), env={"RERANK_ESTIMATED_MAX": "12"}
    )
    assert first.returncode == 0, first.stderr
    prepared = Path(first.stdout.strip().splitlines()[-1])
    assert prepared.is_dir()
    assert cache in prepared.parents
    # The default engine is fp32: that is what serve prepares.
    manifest = verify_model_dir(prepared, "fp32", True)
    assert manifest.graph_file("fp32") == "model.onnx"
    assert "int8" not in manifest.graphs
    # The second run finds the prepared copy (same folder, no new export).
    mtime = (prepared / "rerank_manifest.json").stat().st_mtime_ns
    second = prepare(
        env={
            "RERANK_MODEL_PATH": str(tiny_hf_dir),
            "RERANK_CACHE_DIR": str(cache),
            "RERANK_ESTIMATED_MAX": "12",
        }
    )
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == prepared
    assert (prepared / "rerank_manifest.json").stat().st_mtime_ns == mtime


def test_prepare_accepts_a_prepared_folder_as_it_is(tiny_model_dir: Path, tmp_path: Path):
    result = prepare("--model-path", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tiny_model_dir
    assert not (tmp_path / "cache").exists()


def test_prepare_reports_a_missing_folder_in_one_line(tmp_path: Path):
    result = prepare("--model-path", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "RERANK_MODEL_PATH" in lines[0]
    assert "Traceback" not in result.stderr
