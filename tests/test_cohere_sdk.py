"""The official `cohere` Python SDK, unmodified, pointed at a real `rerank-gateway serve`.

`cohere.Client(base_url=URL)` posts to URL + `/v1/rerank`; `cohere.ClientV2(base_url=URL)` to
URL + `/v2/rerank`; both send `Authorization: Bearer <api_key>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import cohere
import pytest

from core.contract import PromptBuilder, normalize_score
from tests.conftest import free_port, gateway_server

API_KEY = "sdk-key"
MODEL = "rerank-v3.5"  # what Cohere users already pass; served here as an alias
ESTIMATED_MAX = 9.0
QUERY = "What is the capital of the United States?"
DOCS = [
    "Carson City is the capital city of the American state of Nevada.",
    "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean.",
    "Washington, D.C. is the capital of the United States.",
    "Capital punishment has existed in the United States since before it was a country.",
]


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "RERANK_QUANTIZATION": "fp32",
        "RERANK_ESTIMATED_MAX": str(ESTIMATED_MAX),
        "RERANK_API_KEYS": API_KEY,
        "RERANK_MODEL_ALIASES": MODEL,
    }
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("cohere"), env=env) as u:
        yield u


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> dict[int, float]:
    """Normalized scores of DOCS from the ONNX engine called directly."""
    from gateway.compose import build_onnx
    from gateway.config import Settings

    settings = Settings(_env_file=None, model_path=tiny_model_dir, quantization="fp32")

    async def go() -> list[float]:
        engine = build_onnx(settings, tiny_model_dir)
        await engine.start()
        try:
            prompts = PromptBuilder.from_dir(tiny_model_dir).build(QUERY, DOCS)
            return list((await engine.score(prompts)).scores)
        finally:
            await engine.close()

    raw = asyncio.run(go())
    return {i: normalize_score(s, ESTIMATED_MAX) for i, s in enumerate(raw)}


def best_first(expected: dict[int, float]) -> list[int]:
    return sorted(expected, key=lambda i: (-expected[i], i))


def test_v1_client_reranks_strings(url, expected):
    co = cohere.Client(base_url=url, api_key=API_KEY)
    response = co.rerank(query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [r.index for r in response.results] == best_first(expected)[:3]
    for r in response.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)
        assert r.document.text == DOCS[r.index]
    assert response.meta.api_version.version == "1"
    assert response.meta.billed_units.search_units == 1
    assert response.id


def test_v1_client_reranks_objects_on_rank_fields(url, expected):
    co = cohere.Client(base_url=url, api_key=API_KEY)
    docs = [{"text": t, "source": f"wiki-{i}"} for i, t in enumerate(DOCS)]
    response = co.rerank(
        model=MODEL, query=QUERY, documents=docs, rank_fields=["text"], return_documents=True
    )
    assert [r.index for r in response.results] == best_first(expected)
    for r in response.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)
        assert r.document.text == DOCS[r.index]


def test_v1_client_without_return_documents_gets_no_documents(url, expected):
    co = cohere.Client(base_url=url, api_key=API_KEY)
    response = co.rerank(query=QUERY, documents=DOCS)
    assert [r.index for r in response.results] == best_first(expected)
    assert all(r.document is None for r in response.results)


def test_v2_client_reranks(url, expected):
    co = cohere.ClientV2(base_url=url, api_key=API_KEY)
    response = co.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=2, max_tokens_per_doc=4096)
    assert [r.index for r in response.results] == best_first(expected)[:2]
    for r in response.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)
    assert response.meta.api_version.version == "2"


def test_async_v2_client_reranks(url, expected):
    async def go():
        co = cohere.AsyncClientV2(base_url=url, api_key=API_KEY)
        return await co.rerank(model=MODEL, query=QUERY, documents=DOCS)

    response = asyncio.run(go())
    assert [r.index for r in response.results] == best_first(expected)


def test_sdk_raises_its_unauthorized_error_for_a_wrong_key(url):
    co = cohere.ClientV2(base_url=url, api_key="not-the-key")
    with pytest.raises(cohere.errors.UnauthorizedError) as info:
        co.rerank(model=MODEL, query=QUERY, documents=DOCS)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_sdk_raises_not_found_for_an_unknown_model(url):
    co = cohere.ClientV2(base_url=url, api_key=API_KEY)
    with pytest.raises(cohere.errors.NotFoundError) as info:
        co.rerank(model="rerank-english-v2.0", query=QUERY, documents=DOCS)
    assert info.value.body["error"]["param"] == "model"


def test_sdk_raises_bad_request_for_empty_documents(url):
    co = cohere.Client(base_url=url, api_key=API_KEY)
    with pytest.raises(cohere.errors.BadRequestError) as info:
        co.rerank(query=QUERY, documents=[])
    assert info.value.body["error"]["param"] == "documents"


def test_v1_client_max_chunks_per_doc_of_100_is_capped_not_refused(url, expected):
    # Cohere documents max_chunks_per_doc as a maximum (documents x chunks < 10,000); 100 used to be a 400.
    co = cohere.Client(base_url=url, api_key=API_KEY)
    response = co.rerank(query=QUERY, documents=DOCS, max_chunks_per_doc=100)
    assert [r.index for r in response.results] == best_first(expected)
    for r in response.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)


def test_v1_client_documents_times_chunks_over_ten_thousand_is_a_bad_request(url):
    co = cohere.Client(base_url=url, api_key=API_KEY)
    with pytest.raises(cohere.errors.BadRequestError) as caught:
        co.rerank(query=QUERY, documents=["short"] * 200, max_chunks_per_doc=100)
    assert caught.value.body["error"]["code"] == "too_many_chunks"
