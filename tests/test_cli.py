"""The local `rank` and `batch` commands, run for real on the tiny prepared model.

Scores are checked against the engine called directly on the same pairs, so the CLI adds ordering and
shape, never its own numbers. Bad input must end in a non-zero exit and one stderr line, with no traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
QUERY = "How do I keep bread fresh?"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RERANK_ variable or .env of the developer's leaks into a command under test."""
    for name in list(os.environ):
        if name.startswith("RERANK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run `rerank-gateway ARGV` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m gateway.cli ARGV` as its own process, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO_ROOT,
        timeout=300,
    )


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def doc_texts(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    items = data["documents"] if isinstance(data, dict) else data
    return [d["text"] if isinstance(d, dict) else d for d in items]


def engine_scores_many(
    model_dir: Path, requests: list[tuple[str, list[str], str | None]]
) -> list[list[float]]:
    """Raw scores from one ONNX engine called directly, per (query, documents, instruction) request."""
    from core.contract import PromptBuilder
    from gateway.compose import build_onnx
    from gateway.config import Settings

    settings = Settings(_env_file=None, model_path=model_dir)
    builder = PromptBuilder.from_dir(model_dir)

    async def go() -> list[list[float]]:
        engine = build_onnx(settings, model_dir)
        await engine.start()
        try:
            return [
                list((await engine.score(builder.build(q, docs, instruction))).scores)
                for q, docs, instruction in requests
            ]
        finally:
            await engine.close()

    return asyncio.run(go())


def engine_scores(model_dir: Path, query: str, documents: list[str], instruction: str | None = None):
    return engine_scores_many(model_dir, [(query, documents, instruction)])[0]


def assert_ranked(results: list[dict], documents: list[str]) -> None:
    """Best first, ties to the lower index, each document the one at its index."""
    keys = [(-r["score"], r["index"]) for r in results]
    assert keys == sorted(keys)
    assert len({r["index"] for r in results}) == len(results)
    for r in results:
        if "document" in r:
            assert r["document"] == documents[r["index"]]


# --- rank -------------------------------------------------------------------------------------------


def test_rank_prints_every_document_best_first_with_the_engines_raw_scores(capsys, tiny_model_dir):
    docs_file = DATA / "example_docs.json"
    documents = doc_texts(docs_file)

    rc, out, err = run_cli(
        capsys, "rank", "--query", QUERY, "--docs-file", docs_file, "--model", tiny_model_dir, "-q"
    )

    assert rc == 0, err
    assert err == ""  # --quiet
    results = json.loads(out)
    assert sorted(r["index"] for r in results) == list(range(len(documents)))
    assert all(set(r) == {"index", "score", "document"} for r in results)
    assert_ranked(results, documents)
    expected = engine_scores(tiny_model_dir, QUERY, documents)
    for r in results:
        assert r["score"] == pytest.approx(expected[r["index"]], abs=1e-5)
    # A random model still tells documents apart: the ordering is not the input order by accident.
    assert len({round(r["score"], 6) for r in results}) > 1


def test_rank_reports_progress_on_stderr_and_keeps_stdout_pure_json(capsys, tiny_model_dir):
    rc, out, err = run_cli(
        capsys, "rank", "--query", QUERY, "--docs-file", DATA / "example_docs.json", "--model", tiny_model_dir
    )
    assert rc == 0, err
    assert "scored 7 documents" in err
    assert isinstance(json.loads(out), list)


@pytest.mark.parametrize("top_k", [1, 3, 100])
def test_rank_top_k_keeps_the_k_best(capsys, tiny_model_dir, top_k):
    docs_file = DATA / "example_docs.json"
    n_docs = len(doc_texts(docs_file))
    base = ["rank", "--query", QUERY, "--docs-file", docs_file, "--model", tiny_model_dir, "-q"]
    _, full_out, _ = run_cli(capsys, *base)
    rc, out, err = run_cli(capsys, *base, "--top-k", str(top_k))
    assert rc == 0, err
    results = json.loads(out)
    assert len(results) == min(top_k, n_docs)
    assert results == json.loads(full_out)[:top_k]


def test_rank_no_documents_leaves_texts_out(capsys, tiny_model_dir):
    rc, out, err = run_cli(
        capsys, "rank", "--query", QUERY, "--docs-file", DATA / "example_docs.json",
        "--model", tiny_model_dir, "--no-documents", "-q",
    )  # fmt: skip
    assert rc == 0, err
    results = json.loads(out)
    assert results
    assert all(set(r) == {"index", "score"} for r in results)


def test_rank_normalize_adds_sigmoid_of_raw_minus_half_estimated_max(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RERANK_ESTIMATED_MAX", "9.0")
    rc, out, err = run_cli(
        capsys, "rank", "--query", QUERY, "--docs-file", DATA / "example_docs.json",
        "--model", tiny_model_dir, "--normalize", "-q",
    )  # fmt: skip
    assert rc == 0, err
    results = json.loads(out)
    for r in results:
        assert r["relevance_score"] == pytest.approx(1 / (1 + math.exp(-(r["score"] - 4.5))), rel=1e-9)
        assert 0.0 < r["relevance_score"] < 1.0
    relevance = [r["relevance_score"] for r in results]
    assert relevance == sorted(relevance, reverse=True)


def test_rank_reads_objects_with_text_like_plain_strings(capsys, tiny_model_dir, tmp_path):
    texts = ["Bread goes stale in the fridge.", "Freeze sliced bread.", "", "  ", "Espresso needs pressure."]
    strings = write_json(tmp_path / "strings.json", texts)
    objects = write_json(tmp_path / "objects.json", [{"text": t, "id": i} for i, t in enumerate(texts)])
    base = ["rank", "--query", QUERY, "--model", tiny_model_dir, "-q", "--docs-file"]

    rc_s, out_s, err_s = run_cli(capsys, *base, strings)
    rc_o, out_o, err_o = run_cli(capsys, *base, objects)

    assert (rc_s, rc_o) == (0, 0), err_s + err_o
    assert json.loads(out_s) == json.loads(out_o)
    assert_ranked(json.loads(out_o), texts)


def test_rank_instruction_reaches_the_prompt(capsys, tiny_model_dir):
    docs_file = DATA / "example_docs.json"
    documents = doc_texts(docs_file)
    instruction = "Prefer practical storage advice."
    base = ["rank", "--query", QUERY, "--docs-file", docs_file, "--model", tiny_model_dir, "-q"]

    _, plain_out, _ = run_cli(capsys, *base)
    rc, out, err = run_cli(capsys, *base, "--instruction", instruction)

    assert rc == 0, err
    with_instruction = {r["index"]: r["score"] for r in json.loads(out)}
    plain = {r["index"]: r["score"] for r in json.loads(plain_out)}
    assert with_instruction != plain
    expected = engine_scores(tiny_model_dir, QUERY, documents, instruction)
    for i, score in with_instruction.items():
        assert score == pytest.approx(expected[i], abs=1e-5)


def test_rank_takes_the_model_from_rerank_model_path(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RERANK_MODEL_PATH", str(tiny_model_dir))
    docs_file = DATA / "hf_harper_lee.json"
    rc, out, err = run_cli(
        capsys, "rank", "--query", "Who wrote 'To Kill a Mockingbird'?", "--docs-file", docs_file, "-q"
    )
    assert rc == 0, err
    results = json.loads(out)
    assert len(results) == len(doc_texts(docs_file))
    assert_ranked(results, doc_texts(docs_file))


def test_rank_as_a_separate_process(tiny_model_dir):
    docs_file = DATA / "hf_harper_lee.json"
    proc = run_cli_process(
        "rank", "--query", "Who wrote 'To Kill a Mockingbird'?", "--docs-file", docs_file,
        "--top-k", "3", "--device", "cpu", "--quiet",
        env={"RERANK_MODEL_PATH": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    results = json.loads(proc.stdout)
    assert len(results) == 3
    assert_ranked(results, doc_texts(docs_file))


def test_reference_engine_on_the_hf_folder_matches_onnx_fp32(
    capsys, tiny_hf_dir, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("RERANK_QUANTIZATION", "fp32")
    docs_file = DATA / "hf_harper_lee.json"
    query = "Who wrote 'To Kill a Mockingbird'?"

    rc_r, out_r, err_r = run_cli(
        capsys, "rank", "--query", query, "--docs-file", docs_file,
        "--engine", "reference", "--device", "cpu", "--model", tiny_hf_dir, "-q",
    )  # fmt: skip
    rc_o, out_o, err_o = run_cli(
        capsys,
        "rank",
        "--query",
        query,
        "--docs-file",
        docs_file,
        "--engine",
        "onnx",
        "--model",
        tiny_model_dir,
        "-q",
    )

    assert (rc_r, rc_o) == (0, 0), err_r + err_o
    reference = {r["index"]: r["score"] for r in json.loads(out_r)}
    onnx = {r["index"]: r["score"] for r in json.loads(out_o)}
    assert reference.keys() == onnx.keys() == set(range(len(doc_texts(docs_file))))
    for i in reference:
        assert onnx[i] == pytest.approx(reference[i], abs=1e-3)


# --- batch ------------------------------------------------------------------------------------------


def test_batch_ranks_every_sample_case(capsys, tiny_model_dir, tmp_path):
    cases_file = DATA / "rerank_samples.json"
    cases = json.loads(cases_file.read_text())["cases"]
    out_file = tmp_path / "out.json"

    rc, out, err = run_cli(
        capsys, "batch", "--cases-file", cases_file, "--model", tiny_model_dir, "--output", out_file
    )

    assert rc == 0, err
    assert out == ""  # written to --output instead
    assert f"{len(cases)}/{len(cases)}" in err  # the tqdm bar
    data = json.loads(out_file.read_text())
    assert data["engine"] == "onnx"
    assert len(data["results"]) == len(cases)
    requests = [
        (c["query"], [d["text"] if isinstance(d, dict) else d for d in c["documents"]], c.get("instruction"))
        for c in cases
    ]
    expected = engine_scores_many(tiny_model_dir, requests)
    for case, (_, documents, _), results, scores in zip(
        cases, requests, data["results"], expected, strict=True
    ):
        assert len(results) == min(case.get("top_k", len(documents)), len(documents))
        assert_ranked(results, documents)
        for r in results:
            assert r["score"] == pytest.approx(scores[r["index"]], abs=1e-5)


def test_batch_prints_to_stdout_and_applies_default_top_k(capsys, tiny_model_dir, tmp_path):
    cases_file = write_json(
        tmp_path / "cases.json",
        {"cases": [
            {"query": "bread", "documents": ["a", "b", "c"]},
            {"query": "coffee", "documents": [{"text": "x"}, {"text": "y"}, {"text": "z"}], "top_k": 3},
        ]},
    )  # fmt: skip
    rc, out, err = run_cli(
        capsys,
        "batch",
        "--cases-file",
        cases_file,
        "--model",
        tiny_model_dir,
        "--top-k",
        "2",
        "--no-documents",
        "-q",
    )
    assert rc == 0, err
    assert err == ""
    results = json.loads(out)["results"]
    assert [len(r) for r in results] == [2, 3]
    assert all(set(row) == {"index", "score"} for case in results for row in case)


# --- bad input --------------------------------------------------------------------------------------


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]


BAD_DOCS = {
    "missing-file": (None, "does not exist"),
    "malformed-json": ('["a", "b"', "not valid JSON"),
    "an-object": ('{"docs": ["a"]}', "must be a JSON list"),
    "numbers": ("[1, 2]", "document 0"),
    "object-without-text": ('[{"body": "a"}]', "'text'"),
    "empty-list": ("[]", "empty list"),
}


@pytest.mark.parametrize("name", list(BAD_DOCS))
def test_rank_bad_docs_file_is_one_line(capsys, tmp_path, name):
    content, needle = BAD_DOCS[name]
    path = tmp_path / "docs.json"
    if content is not None:
        path.write_text(content)
    rc, out, err = run_cli(capsys, "rank", "--query", "q", "--docs-file", path, "--model", tmp_path)
    assert_one_line_error(rc, out, err, "docs.json", needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--engine", "tensorrt"], "unknown engine 'tensorrt'"),
        (["--engine", "vllm"], "unknown engine 'vllm'"),
        (["--top-k", "0"], "at least 1"),
        (["--top-k", "-4"], "at least 1"),
        (["--top-k", "three"], "whole number"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--query", "   "], "query is empty"),
        (["--model", "/nonexistent/model-folder"], "does not exist"),
    ],
)
def test_rank_bad_flag_is_one_line(capsys, tmp_path, flags, needle):
    docs = write_json(tmp_path / "docs.json", ["a document"])
    argv = ["rank", "--query", "q", "--docs-file", docs, "--model", tmp_path / "model", *flags]
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, out, err, needle)


def test_rank_missing_model_from_environment_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_MODEL_PATH", str(tmp_path / "gone"))
    docs = write_json(tmp_path / "docs.json", ["a document"])
    rc, out, err = run_cli(capsys, "rank", "--query", "q", "--docs-file", docs)
    assert_one_line_error(rc, out, err, "gone", "RERANK_MODEL_PATH")


def test_rank_hub_model_that_cannot_be_fetched_is_one_line_under_quiet(capsys, tmp_path):
    docs = write_json(tmp_path / "docs.json", ["a document"])
    rc, out, err = run_cli(
        capsys, "rank", "--query", "q", "--docs-file", docs, "--model", "nobody/no-such-reranker", "-q"
    )
    assert_one_line_error(rc, out, err, "nobody/no-such-reranker")


def test_rank_folder_that_is_not_a_model_is_one_line(capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    docs = write_json(tmp_path / "docs.json", ["a document"])
    rc, out, err = run_cli(
        capsys, "rank", "--query", "q", "--docs-file", docs, "--model", tmp_path / "empty-model"
    )
    assert_one_line_error(rc, out, err, "empty-model")


def test_bad_setting_in_the_environment_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_QUANTIZATION", "int4")
    docs = write_json(tmp_path / "docs.json", ["a document"])
    rc, out, err = run_cli(capsys, "rank", "--query", "q", "--docs-file", docs, "--model", tmp_path)
    assert_one_line_error(rc, out, err, "RERANK_QUANTIZATION")


BAD_CASES = {
    "malformed-json": ('{"cases": [', "not valid JSON"),
    "a-list": ('[{"query": "q", "documents": ["a"]}]', '{"cases"'),
    "no-cases": ('{"cases": []}', "no cases"),
    "no-query": ('{"cases": [{"documents": ["a"]}]}', "case 0 has no 'query'"),
    "empty-documents": (
        '{"cases": [{"query": "q", "documents": ["a"]}, {"query": "q", "documents": []}]}',
        "case 1",
    ),
    "bad-top-k": ('{"cases": [{"query": "q", "documents": ["a"], "top_k": 0}]}', "top_k"),
    "bad-instruction": ('{"cases": [{"query": "q", "documents": ["a"], "instruction": 3}]}', "instruction"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_batch_bad_cases_file_is_one_line(capsys, tmp_path, name):
    content, needle = BAD_CASES[name]
    path = tmp_path / "cases.json"
    path.write_text(content)
    rc, out, err = run_cli(capsys, "batch", "--cases-file", path, "--model", tmp_path)
    assert_one_line_error(rc, out, err, needle)


def test_batch_missing_cases_file_is_one_line(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "batch", "--cases-file", tmp_path / "nope.json", "--model", tmp_path)
    assert_one_line_error(rc, out, err, "nope.json", "does not exist")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["rank", "--query", "q", "--docs-file", "missing.json"], "does not exist"),
        (
            ["rank", "--query", "q", "--docs-file", "data/example_docs.json", "--engine", "fast"],
            "unknown engine",
        ),
        (["batch", "--cases-file", "data/example_docs.json"], '{"cases"'),
        (
            ["rank", "--query", "q", "--docs-file", "data/example_docs.json", "--model", "./no/such/model"],
            "no/such",
        ),
    ],
)
def test_bad_input_in_a_separate_process_prints_no_traceback(argv, needle):
    proc = run_cli_process(*argv, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, needle)
