"""The official `mixedbread` Python SDK, unmodified, against a real `rerank-gateway serve` (sync and async).

`Mixedbread(base_url=URL).rerank(...)` posts to URL + `/v1/reranking` with `Authorization: Bearer <api_key>`
and parses the answer into its own `RerankResponse` (pydantic): the shape is checked by the SDK itself.
Haystack's `JinaRanker` (jina-haystack) posts the Jina dialect to the URL it is given and raises
`RuntimeError(resp["detail"])` on errors. LiteLLM's `cohere/` provider sends no Cohere SDK headers (so
`/v1/rerank` answers the Jina shape, which must carry `meta`), its `infinity/` provider reads `document` as a
string (the `/infinity` base URL), and `hosted_vllm/` posts vLLM's `/rerank`. Haystack's
`MixedbreadReranker` (mixedbread-ai-haystack) runs on the mixedbread SDK with a `base_url`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from mixedbread import AsyncMixedbread, BadRequestError, Mixedbread

from core.contract import PromptBuilder, normalize_score
from tests.conftest import free_port, gateway_server

API_KEY = "mxb-key"
MODEL = "mixedbread-ai/mxbai-rerank-large-v2"  # what Mixedbread users pass; served here as an alias
ESTIMATED_MAX = 9.0
QUERY = "Who wrote 'To Kill a Mockingbird'?"
DOCS = [
    "'To Kill a Mockingbird' is a novel by Harper Lee published in 1960.",
    "The novel 'Moby-Dick' was written by Herman Melville.",
    "Harper Lee, an American novelist, grew up in Monroeville, Alabama.",
    "Jane Austen wrote 'Pride and Prejudice'.",
]


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "RERANK_QUANTIZATION": "fp32",
        "RERANK_ESTIMATED_MAX": str(ESTIMATED_MAX),
        "RERANK_API_KEYS": API_KEY,
        "RERANK_MODEL_ALIASES": MODEL,
    }
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("mxb"), env=env) as u:
        yield u


@pytest.fixture(scope="module")
def raw_of(tiny_model_dir: Path):
    """Raw scores of texts from the ONNX engine called directly (the reference numbers)."""
    from gateway.compose import build_onnx
    from gateway.config import Settings

    settings = Settings(_env_file=None, model_path=tiny_model_dir, quantization="fp32")
    builder = PromptBuilder.from_dir(tiny_model_dir)

    def raw(texts: list[str]) -> list[float]:
        async def go() -> list[float]:
            engine = build_onnx(settings, tiny_model_dir)
            await engine.start()
            try:
                return list((await engine.score(builder.build(QUERY, texts))).scores)
            finally:
                await engine.close()

        return asyncio.run(go())

    return raw


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def test_sync_client_reranks_strings(url, raw_of):
    client = Mixedbread(api_key=API_KEY, base_url=url, max_retries=0)
    response = client.rerank(model=MODEL, query=QUERY, input=DOCS, top_k=3, return_input=True)
    raw = raw_of(DOCS)
    assert [d.index for d in response.data] == best_first(raw)[:3]
    for d in response.data:
        assert d.score == pytest.approx(normalize_score(raw[d.index], ESTIMATED_MAX), abs=1e-5)
        assert d.input == DOCS[d.index]
        assert d.object == "rank_result"
    assert response.object == "list"
    assert response.top_k == 3
    assert response.return_input is True
    assert response.model  # the served name
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_sync_client_without_top_k_gets_every_document_and_no_input(url, raw_of):
    client = Mixedbread(api_key=API_KEY, base_url=url, max_retries=0)
    response = client.rerank(query=QUERY, input=DOCS)
    assert [d.index for d in response.data] == best_first(raw_of(DOCS))
    assert all(d.input is None for d in response.data)
    assert response.top_k == len(DOCS)
    assert response.return_input is False


def test_sync_client_ranks_objects_on_rank_fields(url, raw_of):
    objects = [{"content": text, "id": f"doc-{i}"} for i, text in enumerate(DOCS)]
    client = Mixedbread(api_key=API_KEY, base_url=url, max_retries=0)
    response = client.rerank(query=QUERY, input=objects, rank_fields=["content"], return_input=True)
    assert [d.index for d in response.data] == best_first(raw_of(DOCS))
    for d in response.data:
        assert d.input == objects[d.index]  # the object as sent, every field


def test_async_client_reranks(url, raw_of):
    async def go():
        client = AsyncMixedbread(api_key=API_KEY, base_url=url, max_retries=0)
        try:
            return await client.rerank(model=MODEL, query=QUERY, input=DOCS, top_k=2)
        finally:
            await client.close()

    response = asyncio.run(go())
    raw = raw_of(DOCS)
    assert [d.index for d in response.data] == best_first(raw)[:2]
    for d in response.data:
        assert d.score == pytest.approx(normalize_score(raw[d.index], ESTIMATED_MAX), abs=1e-5)


def test_sdk_raises_bad_request_with_the_message(url):
    client = Mixedbread(api_key=API_KEY, base_url=url, max_retries=0)
    with pytest.raises(BadRequestError) as caught:
        client.rerank(query=QUERY, input=[])
    body = caught.value.body
    assert body["error"]["param"] == "input"
    assert "`input` is empty" in body["detail"]
    with pytest.raises(BadRequestError) as caught:
        client.rerank(query=QUERY, input=DOCS, top_k=0)
    assert caught.value.body["error"]["param"] == "top_k"


# --- Haystack's JinaRanker (jina-haystack): the Jina dialect, and `detail` on errors ------------------------


@pytest.fixture
def jina_ranker(url, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.jina import JinaRanker

    def make(model: str = MODEL, top_k: int | None = None):
        return JinaRanker(
            model=model, api_key=Secret.from_token(API_KEY), top_k=top_k, base_url=f"{url}/v1/rerank"
        )

    return make


def test_haystack_jina_ranker_ranks_documents(jina_ranker, raw_of):
    from haystack import Document

    documents = [Document(content=text) for text in DOCS]
    out = jina_ranker(top_k=2).run(query=QUERY, documents=documents)
    raw = raw_of(DOCS)
    best = best_first(raw)[:2]
    assert [d.content for d in out["documents"]] == [DOCS[i] for i in best]
    for d, i in zip(out["documents"], best, strict=True):
        assert d.score == pytest.approx(normalize_score(raw[i], ESTIMATED_MAX), abs=1e-5)
    assert out["meta"]["usage"]["prompt_tokens"] > 0

    async_out = asyncio.run(jina_ranker(top_k=2).run_async(query=QUERY, documents=documents))
    assert [d.content for d in async_out["documents"]] == [DOCS[i] for i in best]


def test_haystack_jina_ranker_raises_the_servers_message_from_detail(jina_ranker):
    from haystack import Document

    # Before `detail`, this was `KeyError: 'detail'`: the integration raises resp["detail"].
    with pytest.raises(RuntimeError, match="gpt-4"):
        jina_ranker(model="gpt-4").run(query=QUERY, documents=[Document(content=DOCS[0])])


# --- LiteLLM: its cohere/ (no SDK headers: the Jina shape with Cohere's meta), infinity/, hosted_vllm/ ---


@pytest.fixture(scope="module")
def litellm_module():
    import os

    # The model cost map ships with the package: no download at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def test_litellm_cohere_provider_gets_meta_without_the_sdks_headers(url, raw_of, litellm_module):
    response = litellm_module.rerank(
        model=f"cohere/{MODEL}", api_base=f"{url}/v1/rerank", api_key=API_KEY, query=QUERY, documents=DOCS
    )
    raw = raw_of(DOCS)
    assert [r["index"] for r in response.results] == best_first(raw)
    for r in response.results:
        assert r["relevance_score"] == pytest.approx(
            normalize_score(raw[r["index"]], ESTIMATED_MAX), abs=1e-5
        )
    assert response.meta["api_version"] == {"version": "1"}
    assert response.meta["billed_units"] == {"search_units": 1}


def test_litellm_infinity_provider_reads_documents_as_strings(url, raw_of, litellm_module):
    response = litellm_module.rerank(
        model=f"infinity/{MODEL}",
        api_base=f"{url}/infinity",
        api_key=API_KEY,
        query=QUERY,
        documents=DOCS,
        top_n=2,
        return_documents=True,
    )
    best = best_first(raw_of(DOCS))[:2]
    assert [r["index"] for r in response.results] == best
    assert [r["document"]["text"] for r in response.results] == [DOCS[i] for i in best]
    assert response.meta["tokens"]["input_tokens"] > 0


def test_litellm_hosted_vllm_provider_reranks(url, raw_of, litellm_module):
    response = litellm_module.rerank(
        model=f"hosted_vllm/{MODEL}", api_base=url, api_key=API_KEY, query=QUERY, documents=DOCS, top_n=3
    )
    assert [r["index"] for r in response.results] == best_first(raw_of(DOCS))[:3]


# --- Haystack's MixedbreadReranker (mixedbread-ai-haystack, on the mixedbread SDK) -------------------------


def test_haystack_mixedbread_reranker_ranks_documents(url, raw_of, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    from haystack import Document
    from haystack.utils import Secret
    from mixedbread_ai_haystack.rerankers import MixedbreadReranker

    documents = [Document(content=text) for text in DOCS]
    ranker = MixedbreadReranker(api_key=Secret.from_token(API_KEY), model=MODEL, top_k=2, base_url=url)
    raw = raw_of(DOCS)
    best = best_first(raw)[:2]
    for out in (
        ranker.run(documents=documents, query=QUERY),
        asyncio.run(ranker.run_async(documents=documents, query=QUERY)),
    ):
        assert [d.content for d in out["documents"]] == [DOCS[i] for i in best]
        for d, i in zip(out["documents"], best, strict=True):
            assert d.meta["rerank_score"] == pytest.approx(normalize_score(raw[i], ESTIMATED_MAX), abs=1e-5)
        assert out["meta"]["usage"]["prompt_tokens"] > 0
