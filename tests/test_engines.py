"""The ONNX and reference engines on the tiny model: parity with the official wrapper, order, errors."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.batching import BatchBudget, plan_batches
from core.contract import Prompt, PromptBuilder
from engines.base import Engine, EngineFailure, EngineUnavailable, ModelPreparationError
from engines.fidelity import spearman
from engines.model_store import MANIFEST_NAME
from engines.onnx_engine import OnnxEngine
from engines.reference import ReferenceEngine, reference_source
from gateway import compose
from tests import cases

SHORT_TOLERANCE = 1e-3
LONG_TOLERANCE = 2e-2


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture
def onnx_fp32(onnx_engine: OnnxEngine) -> OnnxEngine:
    """The shared fp32 engine of tests/conftest.py."""
    return onnx_engine


@pytest.fixture(scope="module")
def onnx_int8(tiny_model_dir: Path):
    engine = OnnxEngine(tiny_model_dir, quantization="int8")
    _run(engine.start())
    yield engine
    _run(engine.close())


@pytest.fixture(scope="module")
def reference(tiny_hf_dir: Path):
    # Small batches: the wrapper materializes full-vocabulary logits (0.6 MB per token).
    engine = ReferenceEngine(str(tiny_hf_dir), device="cpu", max_batch_tokens=1024, max_batch_pairs=8)
    _run(engine.start())
    yield engine
    _run(engine.close())


@pytest.fixture(scope="module")
def short_prompts(prompt_builder: PromptBuilder) -> list[Prompt]:
    """About 70 prompts up to 512 tokens: every tricky document, every query, instructions mixed in."""
    b = prompt_builder
    prompts = b.build(cases.QUERIES[0], cases.DOCUMENTS)
    for i, q in enumerate(cases.QUERIES[1:]):
        prompts += b.build(q, cases.DOCUMENTS[i % 7 :: 7])
    for instruction in cases.INSTRUCTIONS:
        prompts += b.build(cases.QUERIES[2], cases.DOCUMENTS[:3], instruction)
    for n in (160, 256, 384, 500):
        q, d = cases.pair_of_prompt_tokens(b.count_tokens, n, seed=n)
        prompts += b.build(q, [d], "Judge strictly." if n == 256 else None)
    random.Random(0).shuffle(prompts)  # interleave lengths and instructions in one call
    assert max(len(p) for p in prompts) <= 512
    assert len({p.instruction for p in prompts}) >= 4
    return prompts


def test_engines_implement_the_protocol(onnx_fp32, reference):
    assert isinstance(onnx_fp32, Engine)
    assert isinstance(reference, Engine)
    assert onnx_fp32.info.name == "onnx"
    assert onnx_fp32.info.padded
    assert reference.info.name == "reference"


async def test_onnx_fp32_matches_the_wrapper_within_1e_3_up_to_512_tokens(
    onnx_fp32, reference, short_prompts
):
    ours = await onnx_fp32.score(short_prompts)
    theirs = await reference.score(short_prompts)
    assert ours.engine == "onnx"
    assert theirs.engine == "reference"
    diff = np.abs(np.array(ours.scores) - np.array(theirs.scores))
    print(
        f"\nonnx fp32 vs wrapper, {len(short_prompts)} prompts <= 512 tokens: max |diff| = {diff.max():.2e}"
    )
    assert diff.max() < SHORT_TOLERANCE
    # The scores spread: a tolerance of 1e-3 on them means something.
    assert np.ptp(theirs.scores) > 1.0


async def test_onnx_fp32_matches_the_wrapper_within_2e_2_on_a_multi_thousand_token_prompt(
    onnx_fp32, reference, prompt_builder
):
    q, d = cases.pair_of_prompt_tokens(prompt_builder.count_tokens, 3000, seed=7)
    (prompt,) = prompt_builder.build(q, [d])
    assert len(prompt) >= 2900
    ours = (await onnx_fp32.score([prompt])).scores[0]
    theirs = (await reference.score([prompt])).scores[0]
    print(f"\nonnx fp32 vs wrapper, one {len(prompt)}-token prompt: |diff| = {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) < LONG_TOLERANCE


async def test_int8_against_fp32_max_difference_and_spearman(
    onnx_fp32, onnx_int8, short_prompts, record_property
):
    fp32 = (await onnx_fp32.score(short_prompts)).scores
    int8 = (await onnx_int8.score(short_prompts)).scores
    diff = float(np.max(np.abs(np.array(fp32) - np.array(int8))))
    rho = spearman(int8, fp32)
    record_property("int8_vs_fp32_max_abs_diff", diff)
    record_property("int8_vs_fp32_spearman", rho)
    print(
        f"\nint8 vs fp32 on {len(short_prompts)} prompts (tiny random model, scores spread "
        f"{np.ptp(fp32):.1f}): max |diff| = {diff:.3f}, Spearman = {rho:.4f}"
    )
    # Loose bounds: int8 is an approximation, but a broken quantization would scramble the ranking.
    assert 0 < diff < 2.5
    assert rho > 0.8


async def test_scores_come_back_in_input_order_whatever_the_internal_sorting(tiny_model_dir, short_prompts):
    # A tiny budget forces many length-sorted sub-batches.
    engine = OnnxEngine(tiny_model_dir, quantization="fp32", max_batch_tokens=700, max_batch_pairs=3)
    await engine.start()
    try:
        batched = (await engine.score(short_prompts)).scores
        alone = [(await engine.score([p])).scores[0] for p in short_prompts]
        np.testing.assert_allclose(batched, alone, atol=1e-4)
        order = list(range(len(short_prompts)))
        random.Random(1).shuffle(order)
        shuffled = (await engine.score([short_prompts[i] for i in order])).scores
        np.testing.assert_allclose(shuffled, [batched[i] for i in order], atol=1e-4)
    finally:
        await engine.close()


async def test_reference_engine_batches_match_single_calls(reference, short_prompts):
    subset = short_prompts[:8]
    together = (await reference.score(subset)).scores
    alone = [(await reference.score([p])).scores[0] for p in subset]
    # The wrapper itself moves by ~2.5e-4 between batched and unbatched runs (padding, summation order).
    np.testing.assert_allclose(together, alone, atol=SHORT_TOLERANCE)


def test_reference_plan_runs_long_prompts_alone_and_one_instruction_per_call(prompt_builder):
    engine = ReferenceEngine("unused", max_batch_tokens=1000, max_batch_pairs=4, long_prompt_tokens=600)
    b = prompt_builder
    q, long_doc = cases.pair_of_prompt_tokens(b.count_tokens, 700)
    prompts = [
        *b.build("q1", ["a", "b", "c"]),
        *b.build(q, [long_doc, long_doc]),
        *b.build("q2", ["d", "e", "f", "g", "h"], "instr"),
    ]
    batches = engine.plan(prompts)
    assert sorted(i for batch in batches for i in batch) == list(range(len(prompts)))
    for batch in batches:
        assert len({prompts[i].instruction for i in batch}) == 1
        assert len(batch) <= 4
        if any(len(prompts[i]) > 600 for i in batch):
            assert len(batch) == 1


def test_plan_batches_respects_the_padded_budget_and_covers_every_prompt():
    rng = random.Random(3)
    lengths = [rng.randint(5, 400) for _ in range(200)] + [5000]
    batches = plan_batches(lengths, BatchBudget(max_tokens=2048, max_rows=16))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        widths = [lengths[i] for i in b]
        assert widths == sorted(widths, reverse=True)
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * max(widths) <= 2048
    assert [len(lengths) - 1] in batches  # longer than the whole budget: alone


async def test_empty_input_gives_no_scores(onnx_fp32, reference):
    assert (await onnx_fp32.score([])).scores == []
    assert (await reference.score([])).scores == []


async def test_the_event_loop_keeps_running_while_a_batch_is_scored(onnx_fp32, short_prompts):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    await onnx_fp32.score(short_prompts * 3)
    task.cancel()
    assert ticks >= 2


async def test_onnx_errors_are_translated_to_engine_failure(onnx_fp32):
    bad = Prompt("q", "d", None, (10**7, 1, 2))  # token id far outside the vocabulary
    with pytest.raises(EngineFailure, match="onnxruntime failed"):
        await onnx_fp32.score([bad])
    # The engine keeps serving after a failed batch.
    assert await onnx_fp32.health()
    assert len((await onnx_fp32.score([Prompt("q", "d", None, (1, 2, 3))])).scores) == 1


async def test_engines_are_unavailable_before_start_and_after_close(tiny_model_dir, prompt_builder):
    prompts = prompt_builder.build("q", ["d"])
    engine = OnnxEngine(tiny_model_dir, quantization="int8")
    assert not await engine.health()
    with pytest.raises(EngineUnavailable):
        await engine.score(prompts)
    await engine.start()
    await engine.start()  # idempotent
    assert await engine.health()
    assert len((await engine.score(prompts)).scores) == 1
    await engine.close()
    assert not await engine.health()
    with pytest.raises(EngineUnavailable):
        await engine.score(prompts)
    with pytest.raises(EngineUnavailable):
        await ReferenceEngine("unused").score(prompts)


async def test_onnx_start_refuses_a_corrupt_model_folder(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    raw = json.loads((d / MANIFEST_NAME).read_text())
    raw["files"]["model.int8.onnx"]["sha256"] = "0" * 64
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    engine = OnnxEngine(d, quantization="int8")
    with pytest.raises(ModelPreparationError, match="sha256"):
        await engine.start()
    assert not await engine.health()
    await engine.close()


def test_compose_builds_onnx_with_the_threads_budgets_and_quantization_set(make_settings, tiny_model_dir):
    settings = make_settings(
        quantization="fp32",
        onnx_intra_op_threads=1,
        onnx_inter_op_threads=1,
        max_batch_tokens=1234,
        max_batch_pairs=7,
        verify_hashes=False,
    )
    engine = compose.build_onnx(settings, tiny_model_dir)
    assert engine.info.max_batch_tokens == 1234
    assert engine.info.max_batch_pairs == 7
    assert engine.quantization == "fp32"
    assert engine.intra_op_threads == 1
    default = compose.build_onnx(make_settings(), tiny_model_dir)
    assert default.info.max_batch_tokens >= 4096
    assert default.info.max_batch_pairs >= 32


def test_reference_source_prefers_explicit_then_hf_folder_then_export_source(
    make_settings, tiny_model_dir, tiny_hf_dir
):
    def source(model_dir, reference_model=None, model_path=tiny_model_dir, hub_model="org/hub"):
        return reference_source(
            model_dir, reference_model=reference_model, model_path=model_path, hub_model=hub_model
        )

    assert source(tiny_model_dir, reference_model="org/x") == "org/x"
    assert source(tiny_model_dir, model_path=tiny_hf_dir) == str(tiny_hf_dir)
    # A prepared folder exported from a local folder points back at its weights.
    assert source(tiny_model_dir) == str(tiny_hf_dir.resolve())
    assert source(None, model_path=None) == "org/hub"
    # The composition root reads the same three from the settings.
    assert compose.reference_source(make_settings(reference_model="org/x"), tiny_model_dir) == "org/x"
    assert compose.reference_source(make_settings(), tiny_model_dir) == str(tiny_hf_dir.resolve())
    hub = make_settings(model_path=None, model="mixedbread-ai/mxbai-rerank-base-v2")
    assert compose.reference_source(hub, None) == "mixedbread-ai/mxbai-rerank-base-v2"
    assert compose.reference_revision(make_settings(model_revision="v1")) == "v1"
    assert compose.reference_revision(make_settings(model_revision="v1", reference_model="org/x")) is None


async def test_int8_score_of_a_prompt_does_not_depend_on_its_batch(onnx_int8, short_prompts):
    """Dynamic int8 scales activations per tensor, so the engine runs int8 prompts alone."""
    prompts = short_prompts[:8]
    batched = (await onnx_int8.score(prompts)).scores
    alone = [(await onnx_int8.score([p])).scores[0] for p in prompts]
    reversed_batch = (await onnx_int8.score(prompts[::-1])).scores[::-1]
    assert np.max(np.abs(np.array(batched) - np.array(alone))) < 1e-5
    assert np.max(np.abs(np.array(batched) - np.array(reversed_batch))) < 1e-5
    assert onnx_int8.info.padded is False


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


def test_a_long_prompt_gives_its_memory_back(tiny_model_dir: Path, prompt_builder: PromptBuilder):
    """The attention matrices of a long prompt (heads x tokens^2) leave onnxruntime's arena after the run."""
    engine = OnnxEngine(tiny_model_dir, quantization="fp32", intra_op_threads=1)
    _run(engine.start())
    try:
        short = prompt_builder.build("query", ["a short document"])
        engine.score_sync(short)
        idle = _rss_mb()
        query, document = cases.pair_of_prompt_tokens(prompt_builder.count_tokens, 6000, seed=3)
        (prompt,) = prompt_builder.build(query, [document])
        assert len(prompt) > 5000
        engine.score_sync([prompt])  # ~0.6 GB of attention scores per layer on the tiny model
        after = _rss_mb()
        engine.score_sync(short)  # short runs still work on the shrunk arena
    finally:
        _run(engine.close())
    assert after - idle < 200, f"RSS {idle:.0f} MB idle, {after:.0f} MB after one {len(prompt)}-token prompt"
