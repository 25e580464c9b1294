"""The scoring contract equals the official wrapper's: token ids bit for bit, and the same normalization."""

from __future__ import annotations

import numpy as np
import pytest

from core.contract import (
    DOC_PROMPT,
    ESTIMATED_MAX,
    PromptBuilder,
    estimated_max_for,
    normalize_score,
)
from tests import cases
from tests.conftest import tiny_hf_model


def _wrapper(hf_dir, max_length: int):
    import torch
    from mxbai_rerank import MxbaiRerankV2

    return MxbaiRerankV2(
        str(hf_dir),
        device="cpu",
        torch_dtype=torch.float32,
        max_length=max_length,
        disable_transformers_warnings=True,
    )


def _wrapper_ids(wrapper, query: str, documents, instruction) -> list[list[int]]:
    """The wrapper's prepare_inputs ids with its left padding stripped (via the attention mask)."""
    batch = wrapper.prepare_inputs([query] * len(documents), list(documents), instruction=instruction)
    out = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
        start = mask.index(1)
        assert all(mask[start:]), "the wrapper pads on the left only"
        out.append(ids[start:])
    return out


def _branches_hit(builder: PromptBuilder, case: cases.Case, requested_max_length: int) -> set[str]:
    """Which truncation rules of SCORING.md this case exercises under this builder's limits."""
    hit = set()
    if builder.max_length < requested_max_length:
        hit.add("clamped")
    q = builder.count_tokens(builder.query_text(case.query, case.instruction))
    if q > builder.max_query_tokens:
        hit.add("query")
    q = min(q, builder.max_query_tokens)
    model_cap = builder.model_max_length - q - builder.fixed_length
    cap = min(model_cap, builder.max_length)
    for doc in case.documents:
        d = builder.count_tokens(DOC_PROMPT.format(document=doc))
        if d > cap:
            hit.add("doc_cap_model" if model_cap < builder.max_length else "doc_cap_max_length")
        if q + len(builder.sep_ids) + min(d, cap) > builder.max_length:
            hit.add("pair")
    return hit


@pytest.fixture(
    scope="module",
    params=cases.TRUNCATION_SETTINGS,
    ids=lambda s: f"ml{s.max_length}-mpe{s.max_position_embeddings}",
)
def setting(request):
    s: cases.TruncationSetting = request.param
    hf_dir = tiny_hf_model(max_position_embeddings=s.max_position_embeddings)
    builder = PromptBuilder.from_dir(hf_dir, max_length=s.max_length)
    return s, builder, _wrapper(hf_dir, s.max_length)


@pytest.fixture(scope="module")
def truncation_cases(setting) -> list[cases.Case]:
    s, builder, _ = setting
    return list(cases.truncation_cases(builder.count_tokens, s.max_length, s.max_position_embeddings))


def test_template_pieces_equal_the_wrappers(setting):
    s, builder, wrapper = setting
    assert builder.fixed_length == wrapper.predefined_length == cases.FIXED_TEMPLATE_TOKENS
    assert builder.max_length == wrapper.max_length
    assert builder.model_max_length == wrapper.model_max_length == s.max_position_embeddings
    assert (builder.yes_id, builder.no_id) == (wrapper.yes_loc, wrapper.no_loc) == (16, 15)


def test_prompt_ids_equal_the_wrappers_bit_for_bit_on_the_tricky_cases(setting):
    _, builder, wrapper = setting
    compared = 0
    for case in cases.short_cases():
        ours = [list(p.input_ids) for p in builder.build(case.query, case.documents, case.instruction)]
        theirs = _wrapper_ids(wrapper, case.query, case.documents, case.instruction)
        for doc, a, b in zip(case.documents, ours, theirs, strict=True):
            assert a == b, f"{case.name}: query={case.query!r} document={doc!r}"
            compared += 1
    assert compared > 200


def test_prompt_ids_equal_the_wrappers_on_every_truncation_branch(setting, truncation_cases):
    s, builder, wrapper = setting
    hit: set[str] = set()
    for case in truncation_cases:
        prompts = builder.build(case.query, case.documents, case.instruction)
        theirs = _wrapper_ids(wrapper, case.query, case.documents, case.instruction)
        for p, b in zip(prompts, theirs, strict=True):
            assert list(p.input_ids) == b, f"{case.name}: {len(p)} vs {len(b)} tokens"
            assert len(p) <= builder.max_length + builder.fixed_length
        hit |= _branches_hit(builder, case, s.max_length)
    # The case set is only worth something if it reaches the branches this setting is meant to cover.
    assert set(s.branches) <= hit, f"branches not reached: {set(s.branches) - hit}"


def test_truncated_flag_marks_exactly_the_cut_prompts(setting, truncation_cases):
    _, builder, _ = setting
    doc_tokens: dict[str, int] = {}
    for case in truncation_cases:
        full_query = builder.count_tokens(builder.query_text(case.query, case.instruction))
        for p in builder.build(case.query, case.documents, case.instruction):
            if p.document not in doc_tokens:
                doc_tokens[p.document] = builder.count_tokens(DOC_PROMPT.format(document=p.document))
            # fixed_length counts one of the prompt's two separators.
            untruncated = builder.fixed_length + len(builder.sep_ids) + full_query + doc_tokens[p.document]
            assert p.truncated == (len(p) < untruncated), case.name


def test_normalization_equals_the_wrappers():
    from mxbai_rerank.mxbai_rerank_v2 import estimated_max_cfg
    from mxbai_rerank.utils import sigmoid_normalize

    raws = np.array([-40.0, -12.5, -3.0, -0.25, 0.0, 1e-3, 4.5, 6.0, 9.0, 12.0, 30.0, 80.0])
    for model_id in [*estimated_max_cfg, "some-org/other-reranker"]:
        em = estimated_max_for(model_id)
        assert em == estimated_max_cfg.get(model_id, 12.0)
        expected = sigmoid_normalize(raws, estimated_max=em)
        ours = np.array([normalize_score(float(r), em) for r in raws])
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)
    assert estimated_max_cfg == ESTIMATED_MAX


def test_estimated_max_comes_from_the_model_shape_not_the_folder_name(tiny_hf_dir):
    import json

    from core.contract import resolve_estimated_max
    from tests.tiny_model import load_shape_config

    base, large = load_shape_config("mxbai-rerank-base-v2"), load_shape_config("mxbai-rerank-large-v2")
    assert resolve_estimated_max(config=base) == (9.0, "config shape of mixedbread-ai/mxbai-rerank-base-v2")
    assert resolve_estimated_max(config=large)[0] == 12.0
    # A known hub id wins over the shape; an explicit value wins over both, and is recorded as such.
    assert resolve_estimated_max(config=base, hub_id="mixedbread-ai/mxbai-rerank-large-v2")[0] == 12.0
    assert resolve_estimated_max(config=base, override=7.5) == (7.5, "explicit")
    tiny = json.loads((tiny_hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"--estimated-max.*RERANK_ESTIMATED_MAX"):
        resolve_estimated_max(config=tiny, hub_id="some-org/other-reranker")
    with pytest.raises(ValueError, match="positive"):
        resolve_estimated_max(config=base, override=-1.0)
