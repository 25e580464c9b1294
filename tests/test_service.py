"""RerankService: token ids in, token ids out; the same limits for the server and the CLI's `rank` / `batch`.

A capped, fitted or chunked document's prompt must hold the ids the contract gives the whole document, cut:
never the ids of its cut text tokenized again (a cut can fall inside a character's bytes or a word, where
text cannot say what the ids say). The service runs on the tiny model's real ONNX engine.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from core.contract import DOC_PROMPT, PromptBuilder
from core.errors import DeadlineExceeded, InputTooLarge, InvalidInput
from gateway.service import RerankLimits, RerankQuery, RerankService
from tests import cases
from tests.fakes import RecordingEngine

QUERY = "How do I keep bread fresh?"
# Body ids 0-1 of this text: ' Bread' and the loaf emoji's first bytes, which no text holds alone.
SPLIT_CHARACTER = "Bread 🍞🍞 keeps best in a paper bag."
# A run of letters BPE merges across any cut: a piece from its middle tokenizes to other ids on its own.
MERGED_RUN = "Bread " + "abcdefgh" * 12 + " keeps."


def ids(builder: PromptBuilder, query: str, documents, instruction=None) -> list[list[int]]:
    return [list(p.input_ids) for p in builder.build(query, documents, instruction)]


def service_for(builder: PromptBuilder, engine, **limits) -> RerankService:
    return RerankService(builder, engine, limits=RerankLimits(**limits), estimated_max=12.0)


def run(coro):
    return asyncio.run(coro)


# --- the contract's id-level pieces ------------------------------------------------------------------


def test_document_ids_are_the_contract_ids_split_after_the_template_head(prompt_builder):
    b = prompt_builder
    documents = [*cases.DOCUMENTS, SPLIT_CHARACTER, MERGED_RUN]
    head = b.tokenizer.encode("document:", add_special_tokens=False).ids
    for doc, d in zip(documents, b.encode_documents(documents), strict=True):
        whole = b.tokenizer.encode(DOC_PROMPT.format(document=doc), add_special_tokens=False).ids
        assert list(d.head) == head, doc
        assert [*d.head, *d.body] == whole, doc
        # The start characters give back the whole text, piece by piece.
        assert "".join(c.text for c in d.chunks(3)) == doc


def test_uncapped_prompts_are_the_contracts_own(prompt_builder, onnx_engine):
    service = service_for(prompt_builder, onnx_engine)
    for case in cases.short_cases():
        q = RerankQuery(query=case.query, documents=tuple(case.documents), instruction=case.instruction)
        prepared = service.prepare(q)
        assert [list(p.input_ids) for p in prepared.prompts] == ids(
            prompt_builder, case.query, case.documents, case.instruction
        ), case.name
        assert prepared.owner == list(range(len(case.documents)))


# --- caps and chunks cut ids ------------------------------------------------------------------------------


def test_a_capped_document_is_its_first_ids_not_its_cut_text_tokenized_again(prompt_builder, onnx_engine):
    b = prompt_builder
    service = service_for(b, onnx_engine)
    prepared = service.prepare(RerankQuery(QUERY, (SPLIT_CHARACTER,), max_tokens_per_doc=2))

    doc = b.encode_documents([SPLIT_CHARACTER])[0]
    expected = b.prompt(b.encode_query(QUERY), doc.first(2))
    (prompt,) = prepared.prompts
    assert prompt.input_ids == expected.input_ids
    template = len(b.prefix_ids) + len(b.encode_query(QUERY).ids) + len(b.sep_ids)
    assert list(prompt.input_ids[template : template + len(doc.head) + 2]) == [*doc.head, *doc.body[:2]]
    # Its text is the document sliced at the kept ids' start characters (the emoji's bytes start after it):
    # tokenized again, that text would give other ids, which is what the old text round trip scored.
    assert prompt.document == "Bread "
    assert ids(b, QUERY, [prompt.document])[0] != list(prompt.input_ids)
    assert prepared.truncated == 1


def test_chunks_are_slices_of_the_documents_ids(prompt_builder, onnx_engine):
    b = prompt_builder
    chunk = 8
    service = service_for(b, onnx_engine, chunk_tokens=chunk)
    documents = (MERGED_RUN, "short")
    prepared = service.prepare(RerankQuery(QUERY, documents, max_chunks_per_doc=64))

    long_doc, short_doc = b.encode_documents(documents)
    query = b.encode_query(QUERY)
    pieces = [long_doc.cut(k, k + chunk) for k in range(0, len(long_doc), chunk)]
    assert len(pieces) >= 3
    assert [p.input_ids for p in prepared.prompts] == [
        *(b.prompt(query, piece).input_ids for piece in pieces),
        b.prompt(query, short_doc).input_ids,
    ]
    assert prepared.owner == [0] * len(pieces) + [1]
    assert (prepared.chunked, prepared.truncated) == (1, 0)
    # The chunks' ids put back together are the document's; their texts, the document's text.
    assert [i for piece in pieces for i in piece.body] == list(long_doc.body)
    assert "".join(p.document for p in prepared.prompts[:-1]) == MERGED_RUN
    # A middle chunk tokenized again from its text gives other ids: the round trip is gone.
    middle = prepared.prompts[1]
    assert ids(b, QUERY, [middle.document])[0] != list(middle.input_ids)

    # max_chunks_per_doc keeps the first chunks and counts the document as cut.
    prepared = service.prepare(RerankQuery(QUERY, documents, max_chunks_per_doc=2))
    assert [p.input_ids for p in prepared.prompts[:2]] == [b.prompt(query, p).input_ids for p in pieces[:2]]
    assert (prepared.chunked, prepared.truncated) == (1, 1)


def test_a_left_fit_keeps_the_last_ids_that_fit(prompt_builder, onnx_engine):
    b = PromptBuilder(prompt_builder.tokenizer, model_max_length=32768, max_length=64)
    service = service_for(b, onnx_engine)
    text = " ".join(f"word{i}" for i in range(100))
    (prompt,) = service.prepare(RerankQuery(QUERY, (text,), fit_side="left")).prompts

    doc = b.encode_documents([text])[0]
    query = b.encode_query(QUERY)
    fitted = b.fit(query, doc, "left")
    assert fitted.body == doc.body[len(doc) - len(fitted) :]
    assert prompt.input_ids == b.prompt(query, fitted).input_ids
    assert not b.prompt(query, fitted).truncated  # the fit leaves the contract nothing to cut
    assert len(prompt) == b.max_length + b.fixed_length
    assert prompt.document.endswith("word99")


async def _scores_max_over_chunks(service: RerankService, recorder: RecordingEngine):
    outcome = await service.rerank(
        RerankQuery(QUERY, (MERGED_RUN, "short"), max_chunks_per_doc=64, raw_scores=True)
    )
    scored = await recorder.inner.score(recorder.seen())
    return outcome, list(scored.scores)


def test_a_chunked_document_scores_the_max_of_its_chunks(prompt_builder, onnx_engine):
    recorder = RecordingEngine(onnx_engine)
    service = RerankService(prompt_builder, recorder, limits=RerankLimits(chunk_tokens=8), estimated_max=None)
    with pytest.raises(InvalidInput, match="normalization constant"):
        run(service.rerank(RerankQuery(QUERY, ("a",))))
    outcome, raw = run(_scores_max_over_chunks(service, recorder))
    by_index = {r.index: r.raw_score for r in outcome.ranked}
    assert by_index[0] == pytest.approx(max(raw[:-1]), abs=1e-6)
    assert by_index[1] == pytest.approx(raw[-1], abs=1e-6)
    assert outcome.pairs_scored == len(raw)
    assert outcome.prompt_tokens == sum(len(p) for p in recorder.seen())


# --- limits and errors -------------------------------------------------------------------------------------


def test_limits_raise_domain_errors_naming_the_field_and_where_it_is_set(prompt_builder, onnx_engine):
    limits = dict(max_documents=2, max_query_chars=10, max_document_chars=20, max_chunks_per_doc=4)
    service = RerankService(
        prompt_builder,
        onnx_engine,
        limits=RerankLimits(**limits, sources={"max_documents": "SOMEWHERE"}),
        estimated_max=12.0,
    )
    with pytest.raises(
        InputTooLarge, match=r"3 documents in `texts`.*at most 2 per request \(SOMEWHERE\)"
    ) as e:
        run(service.rerank(RerankQuery("q", ("a", "b", "c"), documents_param="texts")))
    assert (e.value.param, e.value.code) == ("texts", "too_many_documents")
    with pytest.raises(InputTooLarge, match="the limit is 10") as e:
        run(service.rerank(RerankQuery("q" * 11, ("a",))))
    assert (e.value.param, e.value.code) == ("query", "query_too_long")
    with pytest.raises(InputTooLarge) as e:
        run(service.rerank(RerankQuery("q", ("a", "d" * 21))))
    assert (e.value.param, e.value.code) == ("documents[1]", "document_too_long")
    with pytest.raises(InvalidInput) as e:
        run(service.rerank(RerankQuery("q", ("a",), max_chunks_per_doc=5)))
    assert e.value.param == "max_chunks_per_doc"
    # Domain errors are ValueErrors too: the CLI prints them as one line.
    assert isinstance(e.value, ValueError)


def test_a_request_past_its_deadline_is_deadline_exceeded(prompt_builder, onnx_engine):
    recorder = RecordingEngine(onnx_engine)
    recorder.gate.clear()  # the engine never answers
    service = RerankService(prompt_builder, recorder, limits=RerankLimits(timeout_s=0.2), estimated_max=12.0)
    with pytest.raises(DeadlineExceeded, match="200 ms"):
        run(service.rerank(RerankQuery(QUERY, ("a",))))


# --- the CLI goes through the same service ---------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("RERANK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def server_error(settings_env: dict[str, str], body: dict, tiny_model_dir) -> dict:
    """The error the server answers for `body` under these settings (in this process, no HTTP socket)."""
    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.config import Settings

    env = {k.removeprefix("RERANK_").lower(): v for k, v in settings_env.items()}
    settings = Settings(_env_file=None, model_path=tiny_model_dir, estimated_max=12.0, **env)
    with TestClient(create_app(settings, model_dir=tiny_model_dir)) as client:
        response = client.post("/v2/rerank", json=body)
    assert response.status_code == 413, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("env", "query", "n_docs", "same_message"),
    [
        ({"RERANK_MAX_QUERY_CHARS": "40"}, "bread " * 10, 2, True),
        # The server counts documents as it parses the body ("has at least 4"); the rest is the same.
        ({"RERANK_MAX_DOCUMENTS_PER_REQUEST": "3"}, QUERY, 4, False),
    ],
    ids=["query-too-long", "too-many-documents"],
)
def test_rank_refuses_what_the_server_refuses_with_its_message(
    capsys, cli_env, tmp_path, tiny_model_dir, env, query, n_docs, same_message
):
    from gateway.cli import main

    documents = [f"document {i}" for i in range(n_docs)]
    for name, value in env.items():
        cli_env.setenv(name, value)
    docs_file = tmp_path / "docs.json"
    docs_file.write_text(json.dumps(documents))

    capsys.readouterr()
    rc = main(["rank", "--query", query, "--docs-file", str(docs_file), "--model", str(tiny_model_dir), "-q"])
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert err.startswith("rerank-gateway rank: error: ")
    ours = err.strip().removeprefix("rerank-gateway rank: error: ")
    theirs = server_error(env, {"query": query, "documents": documents}, tiny_model_dir)["message"]
    # The limit, where it is set and what to do, in the same words.
    assert ours.split("; ", 1)[1] == theirs.split("; ", 1)[1]
    assert (ours == theirs) == same_message


def test_batch_names_the_case_over_the_servers_limit(capsys, cli_env, tmp_path, tiny_model_dir):
    from gateway.cli import main

    cli_env.setenv("RERANK_MAX_DOCUMENT_CHARS", "10")
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(
        json.dumps({"cases": [{"query": "q", "documents": ["ok"]}, {"query": "q", "documents": ["x" * 11]}]})
    )
    capsys.readouterr()
    rc = main(["batch", "--cases-file", str(cases_file), "--model", str(tiny_model_dir), "-q"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "case 1: `documents[0]` has 11 characters; the limit is 10 (RERANK_MAX_DOCUMENT_CHARS)" in err
