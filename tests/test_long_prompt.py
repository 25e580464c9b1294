"""Long prompts by chunked prefill (model.chunk.onnx): one-shot scores, bounded memory, old folders."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.bench_memory import measure
from core.contract import Prompt, PromptBuilder
from engines.base import EngineRejected, ModelPreparationError
from engines.model_store import MANIFEST_NAME, sha256_file, verify_model_dir
from engines.onnx_engine import OnnxEngine, score_chunked
from tests import cases

CHUNK_PARITY = 1e-4


def _run(coro):
    return asyncio.run(coro)


def _engine(model_dir: Path, **kwargs) -> OnnxEngine:
    engine = OnnxEngine(
        model_dir, quantization=kwargs.pop("quantization", "fp32"), intra_op_threads=1, **kwargs
    )
    _run(engine.start())
    return engine


def _scores(engine: OnnxEngine, prompts: list[Prompt]) -> np.ndarray:
    try:
        return np.array(engine.score_sync(prompts))
    finally:
        _run(engine.close())


@pytest.fixture(scope="module")
def mixed_prompts(prompt_builder: PromptBuilder) -> list[Prompt]:
    """Two long prompts (several chunks each) between short ones, in no length order."""
    prompts = []
    for i, n in enumerate((1500, 900)):
        query, document = cases.pair_of_prompt_tokens(prompt_builder.count_tokens, n, seed=20 + i)
        prompts += prompt_builder.build(query, [document])
    prompts.insert(1, prompt_builder.build("what is rust?", ["Rust is a systems programming language."])[0])
    prompts += prompt_builder.build("capital of France", ["Paris.", "Lyon is a city in France."])
    return prompts


def test_export_writes_the_chunk_graph_and_lists_it_with_its_hash(tiny_model_dir: Path):
    manifest = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    # The tiny model's weights fit in the graph file, so its chunk graph carries its own copy.
    assert manifest["chunk_graphs"] == {"fp32": ["model.chunk.onnx"], "int8": ["model.int8.chunk.onnx"]}
    entry = manifest["files"]["model.chunk.onnx"]
    assert sha256_file(tiny_model_dir / "model.chunk.onnx") == entry["sha256"]
    chunk = manifest["chunk"]
    assert chunk["inputs"] == ["input_ids", "attention_mask", "past_kv"]
    assert chunk["outputs"] == ["score", "chunk_kv"]
    assert chunk["kv_shape_per_token"] == [2, 2, 2, 32]  # layers, key/value, kv heads, head dim
    assert chunk["max_abs_diff_vs_torch"] < 1e-4
    assert chunk["chunked_max_abs_diff_vs_one_shot"] < CHUNK_PARITY
    assert verify_model_dir(tiny_model_dir, "fp32").chunk_graphs["fp32"] == ("model.chunk.onnx",)
    assert verify_model_dir(tiny_model_dir, "int8").chunk_graphs["int8"] == ("model.int8.chunk.onnx",)


def test_a_corrupt_chunk_graph_is_refused(tiny_model_dir: Path, tmp_path: Path):
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns(".complete")))
    with open(d / "model.chunk.onnx", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    with pytest.raises(ModelPreparationError, match=r"model\.chunk\.onnx does not match the sha256"):
        verify_model_dir(d, "fp32")


def test_chunked_prefill_matches_one_shot(tiny_model_dir: Path, mixed_prompts: list[Prompt]):
    assert max(len(p) for p in mixed_prompts) > 1400
    chunked_engine = _engine(tiny_model_dir, long_prompt_tokens=256, chunk_tokens=128)
    assert chunked_engine.chunked
    chunked = _scores(chunked_engine, mixed_prompts)
    one_shot_engine = _engine(tiny_model_dir, long_prompt_tokens=None)
    assert not one_shot_engine.chunked
    one_shot = _scores(one_shot_engine, mixed_prompts)
    assert np.max(np.abs(chunked - one_shot)) <= CHUNK_PARITY, (chunked, one_shot)
    # The scores are the prompts' own, in input order (not all equal, not sorted by length).
    assert len(set(np.round(one_shot, 3))) == len(mixed_prompts)


def test_chunk_size_does_not_change_the_score(tiny_model_dir: Path, mixed_prompts: list[Prompt]):
    engine = _engine(tiny_model_dir)
    try:
        session = engine._session
        ids = mixed_prompts[0].input_ids
        scores = [score_chunked(session, ids, c) for c in (len(ids), 500, 97, 1024)]
    finally:
        _run(engine.close())
    assert max(scores) - min(scores) <= CHUNK_PARITY, scores


def test_a_folder_without_the_chunk_graph_still_serves_one_shot(
    tiny_model_dir: Path, tmp_path: Path, mixed_prompts: list[Prompt]
):
    """A folder exported before the chunk graph existed: no file, no manifest entry."""
    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "old", ignore=shutil.ignore_patterns(".complete")))
    manifest = json.loads((d / MANIFEST_NAME).read_text())
    for name in ("model.chunk.onnx", "model.int8.chunk.onnx"):
        (d / name).unlink()
        del manifest["files"][name]
    for key in ("chunk_graphs", "chunk"):
        del manifest[key]
    (d / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    assert verify_model_dir(d, "fp32").chunk_graphs == {}

    old = _engine(d)
    assert not old.chunked
    old_scores = _scores(old, mixed_prompts)
    old_int8 = _engine(d, quantization="int8")
    assert not old_int8.chunked
    assert np.all(np.isfinite(_scores(old_int8, mixed_prompts)))
    new_scores = _scores(_engine(tiny_model_dir, long_prompt_tokens=256), mixed_prompts)
    assert np.max(np.abs(old_scores - new_scores)) <= CHUNK_PARITY


def test_int8_long_prompts_run_chunked_through_the_int8_chunk_graph(
    tiny_model_dir: Path, mixed_prompts: list[Prompt]
):
    """int8 has its own chunk graph (the same per-token rewrite): chunked scores equal int8 one-shot ones."""
    manifest = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    assert manifest["chunk_graphs"]["int8"] == ["model.int8.chunk.onnx"]
    chunked_engine = _engine(tiny_model_dir, quantization="int8", long_prompt_tokens=256, chunk_tokens=128)
    assert chunked_engine.chunked
    chunked = _scores(chunked_engine, mixed_prompts)
    one_shot_engine = _engine(tiny_model_dir, quantization="int8", long_prompt_tokens=None)
    assert not one_shot_engine.chunked
    one_shot = _scores(one_shot_engine, mixed_prompts)
    # Activations are quantized per token, so a chunk boundary changes nothing but fp32 rounding upstream.
    assert np.max(np.abs(chunked - one_shot)) <= 1e-3, (chunked, one_shot)


def test_a_prompt_longer_than_the_model_is_rejected_before_any_run(tiny_model_dir: Path):
    engine = _engine(tiny_model_dir)
    try:
        too_long = Prompt("q", "d", None, (100,) * (engine.manifest.max_position_embeddings + 1))
        with pytest.raises(EngineRejected, match="longer than the model's 32768 positions"):
            engine.score_sync([too_long])
    finally:
        _run(engine.close())


def test_one_8k_prompt_has_a_bounded_peak_and_gives_its_memory_back(tiny_model_dir: Path):
    """Measured in a fresh process: idle RSS after warm-up, peak (VmHWM) during one 8,192-token prompt.

    On the tiny model (idle ~170 MB) the one-shot graph peaked at ~2,900 MB for this prompt (heads x
    tokens^2 attention in every layer); chunked prefill at ~400 MB. The bounds leave room for a busy machine
    and would fail the one-shot path several times over.
    """
    r = measure(tiny_model_dir, 8192, "chunked", threads=1, timeout_s=300)
    assert r["chunked"]
    assert np.isfinite(r["score"])
    assert r["peak_mb"] - r["idle_mb"] < 700, r
    assert r["after_mb"] - r["idle_mb"] < 120, r
