"""Each rerank dialect through real HTTP (`rerank-gateway serve` in its own process) on the tiny model.

Scores are checked against the ONNX engine called directly on the same prompts (fp32, so batch
composition cannot move a score), normalized ones against normalize_score of those raw scores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.contract import PromptBuilder, normalize_score
from tests.conftest import free_port, gateway_server

ESTIMATED_MAX = 7.0
CHUNK_TOKENS = 16
MAX_LENGTH = 256
ALIAS = "rerank-v3.5"
SERVED = "mixedbread-ai/mxbai-rerank-base-v2"

QUERY = "How do I keep bread fresh?"
DOCS = [
    "Bread keeps best at room temperature in a paper bag or a bread box.",
    "Espresso is brewed by forcing hot water through finely ground coffee.",
    "To keep bread for more than a few days, slice it, wrap it tightly and freeze it.",
    "A French baguette contains only flour, water, salt and yeast.",
    "Stale bread makes good breadcrumbs, croutons and bread pudding.",
]
# Words with no punctuation, so every cut of this text falls between whole words.
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
    "victor", "whiskey", "xray", "yankee", "zulu",
]  # fmt: skip


def long_text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] + str(i % 7) for i in range(n_words))


class DirectEngine:
    """The ONNX engine in this process, scoring prompts the contract builds (the reference numbers)."""

    def __init__(self, model_dir: Path) -> None:
        from gateway.compose import build_onnx
        from gateway.config import Settings

        settings = Settings(
            _env_file=None, model_path=model_dir, quantization="fp32", onnx_intra_op_threads=1
        )
        self.builder = PromptBuilder.from_dir(model_dir, max_length=MAX_LENGTH)
        self.loop = asyncio.new_event_loop()
        self.engine = build_onnx(settings, model_dir)
        self.loop.run_until_complete(self.engine.start())

    def raw(self, query: str, documents: list[str], instruction: str | None = None) -> list[float]:
        prompts = self.builder.build(query, documents, instruction)
        return list(self.loop.run_until_complete(self.engine.score(prompts)).scores)

    def prompt_tokens(self, query: str, documents: list[str], instruction: str | None = None) -> int:
        return sum(len(p) for p in self.builder.build(query, documents, instruction))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()


@pytest.fixture(scope="module")
def direct(tiny_model_dir: Path) -> Iterator[DirectEngine]:
    engine = DirectEngine(tiny_model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "RERANK_QUANTIZATION": "fp32",
        "RERANK_ESTIMATED_MAX": str(ESTIMATED_MAX),
        "RERANK_CHUNK_TOKENS": str(CHUNK_TOKENS),
        "RERANK_MAX_LENGTH": str(MAX_LENGTH),
        "RERANK_MODEL_ALIASES": f"{ALIAS},my-reranker",
        # The tiny model's manifest names a test folder; serve it under the hub name the tests use.
        "RERANK_SERVED_MODEL_NAME": SERVED,
    }
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("dialects"), env=env) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60.0) as c:
        yield c


def post(client: httpx.Client, path: str, body: dict, **headers: str) -> httpx.Response:
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def assert_best_first(scores: list[float], indices: list[int]) -> None:
    keys = [(-s, i) for s, i in zip(scores, indices, strict=True)]
    assert keys == sorted(keys)
    assert len(set(indices)) == len(indices)


# --- Jina / vLLM -------------------------------------------------------------------------------------


def test_jina_dialect_answers_id_model_usage_and_documents_best_first(client, direct):
    r = post(client, "/rerank", {"model": SERVED, "query": QUERY, "documents": DOCS})
    body = r.json()
    assert set(body) == {"id", "model", "usage", "results", "meta"}
    assert body["model"] == SERVED
    assert body["id"] == r.headers["x-request-id"]
    raw = direct.raw(QUERY, DOCS)
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    assert_best_first([x["relevance_score"] for x in results], [x["index"] for x in results])
    for x in results:
        assert set(x) == {"index", "document", "relevance_score"}
        assert x["document"] == {"text": DOCS[x["index"]]}
        assert x["relevance_score"] == pytest.approx(
            normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5
        )
    tokens = direct.prompt_tokens(QUERY, DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_raw_scores_equal_the_engines_scores_for_the_same_pairs(client, direct):
    raw = direct.raw(QUERY, DOCS)
    for flag in ("raw_scores", "return_raw_scores"):
        body = post(client, "/rerank", {"query": QUERY, "documents": DOCS, flag: True}).json()
        got = {x["index"]: x["relevance_score"] for x in body["results"]}
        assert got == pytest.approx(dict(enumerate(raw)), abs=1e-4)
    # Raw scores are logit differences, not probabilities: at least one falls outside 0..1.
    assert any(not 0.0 <= s <= 1.0 for s in raw)


def test_top_n_keeps_the_best_documents_in_order(client, direct):
    full = post(client, "/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    for top_n in (1, 2, len(DOCS), len(DOCS) + 3):
        part = post(client, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": top_n}).json()["results"]
        assert [x["index"] for x in part] == [x["index"] for x in full][:top_n]


def test_jina_return_documents_false_leaves_documents_out(client):
    body = post(client, "/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False}).json()
    assert all(set(x) == {"index", "relevance_score"} for x in body["results"])


def test_v1_rerank_without_cohere_signals_is_jina_shaped_with_cohere_meta(client):
    import cohere

    body = post(client, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert set(body) == {"id", "model", "usage", "results", "meta"}
    assert len(body["results"]) == 2
    assert body["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
    # What LiteLLM's `cohere/` and `azure_ai` providers do with the body: read it as Cohere's response.
    parsed = cohere.RerankResponse.model_validate(body)
    assert parsed.meta is not None
    assert parsed.meta.billed_units.search_units == 1
    assert [r.index for r in parsed.results] == [r["index"] for r in body["results"]]


def test_instruction_reaches_the_prompt(client, direct):
    instruction = "Judge whether the passage answers a kitchen question."
    body = post(
        client, "/rerank", {"query": QUERY, "documents": DOCS, "instruction": instruction, "raw_scores": True}
    ).json()
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    with_instruction = direct.raw(QUERY, DOCS, instruction)
    assert got == pytest.approx(dict(enumerate(with_instruction)), abs=1e-4)
    assert with_instruction != pytest.approx(direct.raw(QUERY, DOCS), abs=1e-3)
    assert body["usage"]["prompt_tokens"] == direct.prompt_tokens(QUERY, DOCS, instruction)


def test_model_aliases_and_the_served_name_are_accepted(client):
    for name in (SERVED, ALIAS, "my-reranker"):
        post(client, "/rerank", {"model": name, "query": QUERY, "documents": DOCS[:2]})


def test_models_lists_the_served_name_and_aliases(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED, ALIAS, "my-reranker"]
    assert all(m["object"] == "model" and m["root"] == SERVED for m in body["data"])


def test_response_headers_name_the_engine_and_echo_the_request_id(client):
    r = post(client, "/rerank", {"query": QUERY, "documents": DOCS[:2]}, **{"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == "trace-42"
    assert r.headers["x-rerank-engine"] == "onnx"
    for name in ("x-total-time", "x-tokenization-time", "x-inference-time"):
        assert float(r.headers[name]) >= 0.0
    generated = post(client, "/rerank", {"query": QUERY, "documents": DOCS[:2]}).headers["x-request-id"]
    assert generated
    assert generated != "trace-42"


# --- Cohere ------------------------------------------------------------------------------------------


def test_cohere_v1_shape_for_cohere_clients(client, direct):
    body = post(
        client, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3}, **{"x-fern-sdk-name": "cohere"}
    ).json()
    assert set(body) == {"id", "results", "meta"}
    assert body["meta"] == {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
    raw = direct.raw(QUERY, DOCS)
    assert len(body["results"]) == 3
    for x in body["results"]:
        assert set(x) == {"index", "relevance_score"}  # return_documents defaults to false in Cohere
        assert x["relevance_score"] == pytest.approx(
            normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5
        )
    expected_order = sorted(range(len(DOCS)), key=lambda i: (-raw[i], i))[:3]
    assert [x["index"] for x in body["results"]] == expected_order


def test_cohere_v1_documents_as_objects_with_rank_fields(client, direct):
    docs = [
        {"id": f"d{i}", "title": f"Note {i}", "body": text, "lang": "en"} for i, text in enumerate(DOCS[:3])
    ]
    # rank_fields is Cohere-only, so /v1/rerank answers in the Cohere v1 shape without any header.
    body = post(
        client,
        "/v1/rerank",
        {
            "query": QUERY,
            "documents": docs,
            "rank_fields": ["body"],
            "return_documents": True,
            "raw_scores": True,
        },
    ).json()
    assert set(body) == {"id", "results", "meta"}
    raw = direct.raw(QUERY, DOCS[:3])
    for x in body["results"]:
        assert x["document"] == docs[x["index"]]  # the object as sent, every field kept
        assert x["relevance_score"] == pytest.approx(raw[x["index"]], abs=1e-4)

    # Several rank fields are ranked as `field: value` lines, in the order given.
    body = post(
        client,
        "/v1/rerank",
        {"query": QUERY, "documents": docs, "rank_fields": ["title", "body"], "raw_scores": True},
    ).json()
    joined = [f"title: {d['title']}\nbody: {d['body']}" for d in docs]
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert got == pytest.approx(dict(enumerate(direct.raw(QUERY, joined))), abs=1e-4)


def test_objects_with_text_rank_on_text_and_come_back_whole(client, direct):
    docs = [{"text": t, "source": "kitchen"} for t in DOCS[:3]]
    body = post(client, "/rerank", {"query": QUERY, "documents": docs, "raw_scores": True}).json()
    raw = direct.raw(QUERY, DOCS[:3])
    for x in body["results"]:
        assert x["document"] == docs[x["index"]]
        assert x["relevance_score"] == pytest.approx(raw[x["index"]], abs=1e-4)


def test_cohere_v2_shape_on_v2_rerank(client, direct):
    body = post(client, "/v2/rerank", {"model": ALIAS, "query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert set(body) == {"id", "results", "meta"}
    assert body["meta"]["api_version"] == {"version": "2"}
    raw = direct.raw(QUERY, DOCS)
    expected = sorted(range(len(DOCS)), key=lambda i: (-raw[i], i))[:2]
    assert [x["index"] for x in body["results"]] == expected
    assert all(set(x) == {"index", "relevance_score"} for x in body["results"])


def test_search_units_count_scored_documents_by_hundreds(client):
    docs = [f"document number {i}" for i in range(150)]
    body = post(client, "/v2/rerank", {"query": "number", "documents": docs, "top_n": 1}).json()
    assert body["meta"]["billed_units"]["search_units"] == 2


def test_dialect_header_overrides_the_route(client):
    body = post(
        client, "/rerank", {"query": QUERY, "documents": DOCS[:2]}, **{"x-rerank-dialect": "cohere-v2"}
    ).json()
    assert body["meta"]["api_version"] == {"version": "2"}


# --- TEI ---------------------------------------------------------------------------------------------


def test_tei_dialect_answers_a_bare_list(client, direct):
    raw = direct.raw(QUERY, DOCS)
    body = post(client, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert isinstance(body, list)
    assert all(set(x) == {"index", "score"} for x in body)
    assert_best_first([x["score"] for x in body], [x["index"] for x in body])
    for x in body:
        assert x["score"] == pytest.approx(normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5)

    body = post(
        client, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    ).json()
    for x in body:
        assert x["text"] == DOCS[x["index"]]
        assert x["score"] == pytest.approx(raw[x["index"]], abs=1e-4)


def test_texts_mean_tei_on_every_route(client):
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        body = post(client, path, {"query": QUERY, "texts": DOCS[:2]}).json()
        assert isinstance(body, list)
        assert len(body) == 2


def test_tei_truncate_left_keeps_the_end_of_long_texts(client):
    # Two texts longer than the model's window (RERANK_MAX_LENGTH): same ending, different beginnings.
    tail = long_text(260, offset=3)
    a, b = long_text(200) + " " + tail, long_text(200, offset=11) + " " + tail
    left = post(
        client,
        "/rerank",
        {
            "query": QUERY,
            "texts": [a, b],
            "truncate": True,
            "truncation_direction": "Left",
            "raw_scores": True,
        },
    ).json()
    left_scores = {x["index"]: x["score"] for x in left}
    assert left_scores[0] == pytest.approx(left_scores[1], abs=1e-4)
    # The default cut keeps the beginnings, which differ.
    right = post(client, "/rerank", {"query": QUERY, "texts": [a, b], "raw_scores": True}).json()
    right_scores = {x["index"]: x["score"] for x in right}
    assert right_scores[0] != pytest.approx(right_scores[1], abs=1e-3)


# --- long documents: token cap and chunking ---------------------------------------------------------


def first_tokens(builder: PromptBuilder, text: str, n: int) -> str:
    offsets = builder.tokenizer.encode(text, add_special_tokens=False).offsets
    return text if len(offsets) <= n else text[: offsets[n][0]]


def test_max_tokens_per_doc_scores_only_the_first_tokens(client, direct):
    doc = long_text(60)
    short = "Bread keeps best in a paper bag."
    cut = first_tokens(direct.builder, doc, 20)
    assert len(cut) < len(doc)
    body = post(
        client,
        "/v2/rerank",
        {"query": QUERY, "documents": [doc, short], "max_tokens_per_doc": 20, "raw_scores": True},
    ).json()
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert got[0] == pytest.approx(direct.raw(QUERY, [cut])[0], abs=1e-4)
    assert got[1] == pytest.approx(direct.raw(QUERY, [short])[0], abs=1e-4)
    assert got[0] != pytest.approx(direct.raw(QUERY, [doc])[0], abs=1e-3)
    usage = post(client, "/rerank", {"query": QUERY, "documents": [doc], "max_tokens_per_doc": 20}).json()[
        "usage"
    ]
    assert usage["prompt_tokens"] == direct.prompt_tokens(QUERY, [cut])


def test_chunked_documents_score_the_max_over_their_chunks(client, direct):
    doc = long_text(40)
    b = direct.builder
    query = b.encode_query(QUERY)
    # Chunks are slices of the document's token ids (the document is tokenized once, never re-tokenized).
    pieces = b.encode_documents([doc])[0].chunks(CHUNK_TOKENS)
    assert len(pieces) >= 3
    chunk_prompts = [b.prompt(query, piece) for piece in pieces]
    chunk_scores = list(direct.loop.run_until_complete(direct.engine.score(chunk_prompts)).scores)
    body = post(
        client,
        "/rerank",
        {"query": QUERY, "documents": [doc, DOCS[0]], "max_chunks_per_doc": 10, "raw_scores": True},
    ).json()
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert got[0] == pytest.approx(max(chunk_scores), abs=1e-4)
    assert got[1] == pytest.approx(direct.raw(QUERY, [DOCS[0]])[0], abs=1e-4)  # a short document is one chunk
    tokens = sum(len(p) for p in chunk_prompts) + direct.prompt_tokens(QUERY, [DOCS[0]])
    assert body["usage"]["prompt_tokens"] == tokens
    assert body["results"][[x["index"] for x in body["results"]].index(0)]["document"] == {"text": doc}

    # max_chunks_per_doc bounds the chunks scored: with 1, only the first chunk counts.
    body = post(
        client, "/rerank", {"query": QUERY, "documents": [doc], "max_chunks_per_doc": 1, "raw_scores": True}
    ).json()
    assert body["results"][0]["relevance_score"] == pytest.approx(chunk_scores[0], abs=1e-4)


def test_truncation_and_chunking_are_counted(client):
    def counter(name: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    truncated, chunked = (
        counter("rerank_documents_truncated_total"),
        counter("rerank_documents_chunked_total"),
    )
    doc = long_text(40)
    post(client, "/rerank", {"query": QUERY, "documents": [doc, doc, "short"], "max_chunks_per_doc": 2})
    assert counter("rerank_documents_chunked_total") == chunked + 2
    # Two chunks of 16 tokens cannot hold 40 words: both long documents lost their ends.
    assert counter("rerank_documents_truncated_total") == truncated + 2


# --- the client command --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "shape"),
    [
        ("cohere", {"id", "results", "meta"}),
        ("jina", {"id", "model", "usage", "results", "meta"}),
        ("tei", None),
    ],
)
def test_client_command_prints_the_servers_answer(url, direct, capsys, dialect, shape):
    import json

    from gateway.cli import main

    docs_file = Path(__file__).resolve().parents[1] / "data" / "example_docs.json"
    texts = [d["text"] for d in json.loads(docs_file.read_text())]
    query = "how long does bread stay fresh"
    argv = ["client", "--url", url, "--query", query, "--docs-file", str(docs_file)]
    rc = main([*argv, "--top-n", "3", "--dialect", dialect, "--raw-scores"])
    out = capsys.readouterr().out
    assert rc == 0
    body = json.loads(out)
    raw = direct.raw(query, texts)
    best = sorted(range(len(texts)), key=lambda i: (-raw[i], i))[:3]
    if shape is None:
        assert [x["index"] for x in body] == best
        assert all(x["text"] == texts[x["index"]] for x in body)
    else:
        assert set(body) == shape
        assert [x["index"] for x in body["results"]] == best
        assert all(x["document"]["text"] == texts[x["index"]] for x in body["results"])


def test_a_large_body_is_ranked_with_ties_in_index_order(client, direct):
    # 600 copies of one ~600-character document: over 300 kB of JSON, parsed off the event loop.
    doc = " ".join(WORDS) * 4
    request = {"query": QUERY, "documents": [doc] * 600, "return_documents": False}
    response = post(client, "/rerank", request)
    body = response.json()
    results = body["results"]
    assert [x["index"] for x in results] == list(range(600))
    expected = normalize_score(direct.raw(QUERY, [doc])[0], ESTIMATED_MAX)
    assert all(x["relevance_score"] == pytest.approx(expected, abs=1e-5) for x in results)


# --- max_chunks_per_doc as Cohere documents it ----------------------------------------------------------


def test_max_chunks_per_doc_over_the_limit_is_capped_to_it(client, direct):
    docs = [long_text(200), long_text(30, offset=3)]
    capped = post(
        client, "/v1/rerank", {"query": QUERY, "documents": docs, "max_chunks_per_doc": 1024}
    ).json()
    at_limit = post(
        client, "/v1/rerank", {"query": QUERY, "documents": docs, "max_chunks_per_doc": 64}
    ).json()
    assert capped["results"] == at_limit["results"]
    assert capped["meta"] == at_limit["meta"]


def test_documents_times_chunks_at_ten_thousand_is_refused_with_its_own_code(client):
    # 157 documents x 64 chunks (1024 capped at the default limit of 64) = 10,048 >= 10,000.
    body = {"query": QUERY, "documents": ["short"] * 157, "max_chunks_per_doc": 1024}
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_chunks"
    assert error["code"] != error["type"]
    assert error["param"] == "max_chunks_per_doc"
    assert "10048" in error["message"]
    assert "10,000" in error["message"]
    body["documents"] = ["short"] * 156  # 9,984 chunks at most: accepted
    assert len(post(client, "/v1/rerank", body).json()["results"]) == 156


# --- vLLM: truncate_prompt_tokens, max_tokens_per_query, /score ---------------------------------------


def test_truncate_prompt_tokens_cuts_each_prompt_to_that_many_tokens(client, direct):
    docs = [long_text(120), long_text(150, offset=5)]
    k = 130
    body = post(client, "/rerank", {"query": QUERY, "documents": docs, "truncate_prompt_tokens": k}).json()
    assert body["usage"]["prompt_tokens"] == 2 * k
    # The score is the contract's score of the prompt whose document kept its first tokens.
    b = direct.builder
    query = b.encode_query(QUERY)
    raw = []
    for doc in b.encode_documents(docs):
        room = k - b.fixed_length - len(query.ids) - len(b.sep_ids) - len(doc.head)
        prompt = b.prompt(query, doc.first(room))
        assert len(prompt) == k
        raw.append(direct.loop.run_until_complete(direct.engine.score([prompt])).scores[0])
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(
            normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5
        )
    whole = post(client, "/rerank", {"query": QUERY, "documents": docs, "truncate_prompt_tokens": -1}).json()
    assert whole["usage"]["prompt_tokens"] == direct.prompt_tokens(QUERY, docs)


def test_max_tokens_per_query_cuts_the_query(client, direct):
    query = "how long " * 30
    full = post(client, "/rerank", {"query": query, "documents": DOCS}).json()
    cut = post(client, "/rerank", {"query": query, "documents": DOCS, "max_tokens_per_query": 8}).json()
    # The cap counts the query's own tokens (the `query: ` template stays).
    encoded = direct.builder.encode_query(query)
    assert len(encoded.ids) - encoded.head > 8
    saved = full["usage"]["prompt_tokens"] - cut["usage"]["prompt_tokens"]
    assert saved == len(DOCS) * (len(encoded.ids) - encoded.head - 8)


def test_vllm_score_api_answers_one_score_per_text_2_in_input_order(client, direct):
    raw = direct.raw(QUERY, DOCS)
    for path in ("/score", "/v1/score"):
        r = post(client, path, {"model": SERVED, "text_1": QUERY, "text_2": DOCS})
        body = r.json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"}
        assert body["object"] == "list"
        assert body["model"] == SERVED
        assert [x["index"] for x in body["data"]] == list(range(len(DOCS)))
        assert all(x["object"] == "score" for x in body["data"])
        for x in body["data"]:
            assert x["score"] == pytest.approx(normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5)
        tokens = direct.prompt_tokens(QUERY, DOCS)
        assert body["usage"]["prompt_tokens"] == tokens
    # use_activation false: the raw score, as vLLM answers it; a repeated query is the same query.
    body = post(
        client, "/score", {"text_1": [QUERY] * len(DOCS), "text_2": DOCS, "use_activation": False}
    ).json()
    assert [x["score"] for x in body["data"]] == pytest.approx(raw, abs=1e-5)
    one = post(client, "/score", {"text_1": [QUERY], "text_2": DOCS[2]}).json()
    assert one["data"][0]["index"] == 0
    assert one["data"][0]["score"] == pytest.approx(normalize_score(raw[2], ESTIMATED_MAX), abs=1e-5)


def test_vllm_score_with_several_queries_is_a_400_naming_text_1(client):
    response = client.post("/score", json={"text_1": ["a", "b"], "text_2": ["x", "y"]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "text_1"
    assert response.json()["error"]["code"] == "several_queries"


# --- Infinity ---------------------------------------------------------------------------------------


def test_infinity_dialect_returns_documents_as_plain_strings(client, direct):
    raw = direct.raw(QUERY, DOCS)
    r = post(client, "/infinity/rerank", {"query": QUERY, "documents": DOCS, "return_documents": True})
    body = r.json()
    assert set(body) == {"object", "results", "model", "usage", "id", "created"}
    assert body["object"] == "rerank"
    assert body["model"] == SERVED
    assert_best_first([x["relevance_score"] for x in body["results"]], [x["index"] for x in body["results"]])
    for x in body["results"]:
        assert x["document"] == DOCS[x["index"]]
        assert x["relevance_score"] == pytest.approx(
            normalize_score(raw[x["index"]], ESTIMATED_MAX), abs=1e-5
        )
    plain = post(client, "/infinity/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [x["document"] for x in plain["results"]] == [None, None]
    # The header names the dialect on the shared routes too.
    forced = post(client, "/rerank", {"query": QUERY, "documents": DOCS}, **{"x-rerank-dialect": "infinity"})
    assert forced.json()["object"] == "rerank"


@pytest.mark.parametrize("path", ["/models", "/infinity/models"])
def test_infinity_models_lists_the_served_names(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == SERVED
    assert ALIAS in ids
    assert all(m["object"] == "model" and "rerank" in m["capabilities"] for m in body["data"])
    assert body["data"][0]["backend"]


# --- the registry -----------------------------------------------------------------------------------------


def test_every_rerank_route_has_a_dialect_for_every_body_and_names_are_the_metrics_labels():
    from gateway.dialects import NAMES, PATHS, REGISTRY, detect, served_at
    from gateway.observability import DIALECTS

    assert DIALECTS == NAMES
    assert len(set(NAMES)) == len(REGISTRY)
    assert set(PATHS) == {p for d in REGISTRY for p in d.paths}
    for path in PATHS:
        assert served_at(path)
        for payload in ({}, {"texts": ["a"]}, {"rank_fields": ["t"]}):
            assert detect(path, payload, {}) in served_at(path)
    assert detect("/v1/rerank", {}, {"x-fern-sdk-name": "cohere"}).name == "cohere-v1"
    assert detect("/v1/rerank", {}, {}).name == "jina"
    assert detect("/rerank", {"texts": []}, {}).name == "tei"
    assert detect("/rerank", {}, {"x-rerank-dialect": "Mixedbread"}).name == "mixedbread"


def test_requests_are_counted_under_their_dialects_name(client):
    post(client, "/v1/reranking", {"query": QUERY, "input": DOCS})
    post(client, "/score", {"text_1": QUERY, "text_2": DOCS})
    text = client.get("/metrics").text
    assert 'rerank_requests_total{dialect="mixedbread",route="/v1/reranking",status="200"}' in text
    assert 'rerank_requests_total{dialect="vllm-score",route="/score",status="200"}' in text


def test_every_dialects_openapi_example_is_answered_in_its_response_model(client):
    from gateway.dialects import REGISTRY, detect

    spec = client.get("/openapi.json").json()
    for dialect in REGISTRY:
        path = dialect.paths[0]
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        assert examples[dialect.name]["value"] == dialect.example
        assert detect(path, dialect.example, {"x-rerank-dialect": dialect.name}) is dialect
        body = post(client, path, dialect.example, **{"x-rerank-dialect": dialect.name}).json()
        dialect.response_model.model_validate(body)
