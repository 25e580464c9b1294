"""The benchmark tools end to end: the BEIR workload builder on a tiny BEIR folder, and the bench client
against a live gateway serving the tiny model (results JSON and PNG plots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.beir_workload import BM25, load_workload
from bench.client import BadResponse, PlannedRequest, ndcg_at_10, percentiles_ms, plan_requests, ranking_from
from gateway.cli import main
from tests.conftest import REPO_ROOT, gateway_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH_PORT = 18421

# A tiny BEIR corpus: two topics, so BM25 has something to tell apart.
CORPUS = {
    "c1": (
        "Sourdough",
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria fed with flour.",
    ),
    "c2": ("Bread storage", "Bread keeps best at room temperature; the refrigerator makes bread stale."),
    "c3": ("Freezing bread", "Slice bread, wrap it tightly and freeze it to keep it for weeks."),
    "c4": ("Gluten", "Gluten forms when glutenin and gliadin in wheat flour are hydrated and kneaded."),
    "c5": ("Espresso", "Espresso is brewed by forcing hot water through finely ground coffee."),
    "c6": ("Latte", "A latte is espresso with steamed milk and a thin layer of foam."),
    "c7": ("Coffee beans", "Arabica and robusta are the two main species of coffee beans."),
    "c8": ("Tea", "Green tea is made from leaves that are not oxidised."),
    "c9": ("Volcanoes", "A volcano erupts when magma rises through the crust."),
    "c10": ("Tides", "Tides are caused by the gravitational pull of the moon and the sun."),
    "c11": ("Stale bread", "Stale bread makes good breadcrumbs, croutons and bread pudding."),
    "c12": ("Baguette", "A baguette contains only flour, water, salt and yeast."),
}
QUERIES = {
    "q1": "how to keep bread fresh",
    "q2": "espresso coffee",
    "q3": "what causes tides",
    "q4": "an unjudged query",
}
QRELS = [("q1", "c2", 2), ("q1", "c3", 1), ("q2", "c5", 1), ("q3", "c10", 1), ("q3", "c9", 0)]


def write_beir_folder(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as fh:
        for doc_id, (title, text) in CORPUS.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as fh:
        for qid, text in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with (root / "qrels" / "test.tsv").open("w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, doc_id, score in QRELS:
            fh.write(f"{qid}\t{doc_id}\t{score}\n")
    return root


def build(tmp_path: Path, *extra: str) -> Path:
    source = write_beir_folder(tmp_path / "beir")
    out = tmp_path / "workload.json"
    rc = main(
        [
            "bench",
            "build-beir",
            "--dataset",
            "scifact",
            "--source-dir",
            str(source),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    assert rc == 0
    return out


def test_build_beir_gives_each_judged_query_its_positives_and_negatives(tmp_path):
    out = build(tmp_path, "--queries", "10", "--top-k", "5")
    data = json.loads(out.read_text())
    assert data["format"] == "rerank-workload/v1"
    rows = {q["query_id"]: q for q in data["queries"]}
    assert sorted(rows) == ["q1", "q2", "q3"]  # q4 has no judgment, q3's c9 is judged not relevant
    for qid, row in rows.items():
        assert len(row["documents"]) == len(row["doc_ids"]) == len(row["relevance"]) == 5
        assert len(set(row["doc_ids"])) == 5
        positives = {d for q, d, s in QRELS if q == qid and s > 0}
        assert {d for d, r in zip(row["doc_ids"], row["relevance"], strict=False) if r > 0} == positives
        for doc_id, text, rel in zip(row["doc_ids"], row["documents"], row["relevance"], strict=False):
            title, body = CORPUS[doc_id]
            assert text == f"{title} {body}"
            assert rel == next((s for q, d, s in QRELS if q == qid and d == doc_id), 0)
    assert rows["q1"]["relevance"].count(0) == 3
    assert data["stats"]["queries"] == 3
    assert data["stats"]["documents_per_query_mean"] == 5


def test_build_beir_bm25_negatives_share_words_with_the_query(tmp_path):
    out = build(tmp_path, "--queries", "10", "--top-k", "3", "--negatives", "1")
    rows = {q["query_id"]: q for q in json.loads(out.read_text())["queries"]}
    # q1's two positives plus its single hardest negative: another bread document, not coffee or tides.
    negative = [d for d, r in zip(rows["q1"]["doc_ids"], rows["q1"]["relevance"], strict=False) if r == 0]
    assert len(negative) == 1
    assert "bread" in " ".join(CORPUS[negative[0]]).lower()
    negative = [d for d, r in zip(rows["q2"]["doc_ids"], rows["q2"]["relevance"], strict=False) if r == 0]
    assert negative
    assert all(
        "espresso" in " ".join(CORPUS[d]).lower() or "coffee" in " ".join(CORPUS[d]).lower() for d in negative
    )


def test_build_beir_is_reproducible_with_a_seed_and_varies_without(tmp_path):
    first = json.loads(build(tmp_path / "a", "--top-k", "6", "--seed", "3").read_text())["queries"]
    second = json.loads(build(tmp_path / "b", "--top-k", "6", "--seed", "3").read_text())["queries"]
    assert first == second
    orders = {
        tuple(q["doc_ids"])
        for s in range(6)
        for q in json.loads(build(tmp_path / f"s{s}", "--top-k", "6", "--seed", str(s)).read_text())[
            "queries"
        ]
        if q["query_id"] == "q2"
    }
    assert len(orders) > 1  # candidates are shuffled, so a positive's position says nothing


def test_build_beir_random_negative_mining_fills_top_k(tmp_path):
    out = build(tmp_path, "--top-k", "8", "--negative-mining", "random")
    for row in json.loads(out.read_text())["queries"]:
        assert len(row["doc_ids"]) == 8


def test_build_beir_reports_a_missing_qrels_file(tmp_path, capsys):
    source = write_beir_folder(tmp_path / "beir")
    (source / "qrels" / "test.tsv").unlink()
    rc = main(
        [
            "bench",
            "build-beir",
            "--dataset",
            "scifact",
            "--source-dir",
            str(source),
            "--out",
            str(tmp_path / "w.json"),
        ]
    )
    assert rc == 2
    assert "qrels/test.tsv is missing" in capsys.readouterr().err


def test_build_beir_without_network_says_how_to_work_offline(tmp_path):
    # ir_datasets' real download code, pointed at a proxy that refuses connections: fails the same way
    # whether or not this machine has network.
    env = {
        **os.environ,
        "IR_DATASETS_HOME": str(tmp_path / "irds"),
        "HTTPS_PROXY": "http://127.0.0.1:18499",
        "https_proxy": "http://127.0.0.1:18499",
        "HTTP_PROXY": "http://127.0.0.1:18499",
        "http_proxy": "http://127.0.0.1:18499",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "bench",
            "build-beir",
            "--dataset",
            "scifact",
            "--out",
            str(tmp_path / "w.json"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot download" in proc.stderr
    assert "--source-dir" in proc.stderr
    assert not (tmp_path / "w.json").exists()


def test_build_beir_rejects_an_unknown_dataset(tmp_path, capsys):
    rc = main(["bench", "build-beir", "--dataset", "no-such-set", "--out", str(tmp_path / "w.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown BEIR dataset 'no-such-set'" in err
    assert "scifact" in err


def test_bm25_prefers_documents_with_rarer_shared_terms():
    index = BM25(["the bread", "the the the", "sourdough bread starter", "coffee"])
    scores = index.scores("sourdough bread")
    assert scores[2] > scores[0] > 0
    assert 1 not in scores
    assert 3 not in scores


def test_load_workload_reads_the_sample_files_under_data():
    cases = load_workload(REPO_ROOT / "data" / "rerank_samples.json")
    assert len(cases.items) > 1
    assert all(it.documents for it in cases.items)
    single = load_workload(REPO_ROOT / "data" / "hf_harper_lee.json")
    assert len(single.items) == 1
    assert "Mockingbird" in single.items[0].query
    docs = load_workload(REPO_ROOT / "data" / "example_docs.json")
    assert docs.items
    assert all(len(it.documents) == 7 for it in docs.items)


def test_plan_requests_tops_up_to_the_batch_size_with_unlabelled_documents(tmp_path):
    workload = load_workload(build(tmp_path, "--top-k", "3"))
    plans = plan_requests(workload, 7, batch_size=5)
    assert len(plans) == 7
    for plan in plans:
        assert len(plan.documents) == 5
        assert len(plan.relevance) == 5
        assert plan.relevance[3:] == (0, 0)
    assert [p.query for p in plans[:3]] == [it.query for it in workload.items]


def test_response_checks_reject_wrong_answers():
    plan = PlannedRequest("q", ("a", "b", "c"), (0, 1, 0))
    good = {
        "results": [
            {"index": 1, "relevance_score": 0.9},
            {"index": 0, "relevance_score": 0.2},
            {"index": 2, "relevance_score": 0.1},
        ]
    }
    assert ranking_from("cohere", plan, None, good) == [1, 0, 2]
    unsorted = {"results": list(reversed(good["results"]))}
    repeated = {"results": [good["results"][0]] * 3}
    out_of_range = {"results": [{**good["results"][0], "index": 3}, *good["results"][1:]]}
    for bad in (unsorted, repeated, out_of_range, {"results": good["results"][:2]}, {"nope": 1}):
        with pytest.raises(BadResponse):
            ranking_from("cohere", plan, None, bad)
    assert ranking_from("cohere", plan, 2, {"results": good["results"][:2]}) == [1, 0]
    tei = [{"index": 2, "score": 3.0}, {"index": 0, "score": 1.0}, {"index": 1, "score": -2.0}]
    assert ranking_from("tei", plan, None, tei) == [2, 0, 1]


def test_ndcg_and_percentiles():
    assert ndcg_at_10([1, 0, 2], [0, 1, 0]) == pytest.approx(1.0)
    assert ndcg_at_10([0, 1, 2], [0, 1, 0]) == pytest.approx(1 / 1.5849625, rel=1e-6)
    assert ndcg_at_10([0, 1], [0, 0]) is None
    pct = percentiles_ms([0.001 * i for i in range(1, 101)])
    assert pct["p50"] == pytest.approx(50.5)
    assert pct["p99"] == pytest.approx(99.01)
    assert pct["max"] == 100.0


def test_bench_run_against_live_gateway_writes_results_and_plots(tmp_path, tiny_model_dir):
    workload = build(tmp_path, "--top-k", "4")
    out = tmp_path / "bench-out"
    with gateway_server(BENCH_PORT, tiny_model_dir, tmp_path / "gateway") as url:
        rc = main(
            [
                "bench",
                "run",
                "--url",
                url,
                "--workload",
                str(workload),
                "--concurrency",
                "1,4",
                "--requests",
                "12",
                "--batch-size",
                "6",
                "--metrics",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        assert rc == 0
        tei_out = tmp_path / "bench-tei"
        rc = main(
            [
                "bench",
                "run",
                "--url",
                url,
                "--workload",
                str(workload),
                "--concurrency",
                "2",
                "--requests",
                "5",
                "--dialect",
                "tei",
                "--quiet",
                "--out",
                str(tei_out),
            ]
        )
        assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "rerank-bench/v1"
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 4]
    for level in results["levels"]:
        assert level["requests"] == level["ok"] == 12
        assert level["errors"] == 0
        assert level["throughput_rps"] > 0
        assert level["pairs_per_s"] == pytest.approx(6 * level["throughput_rps"], rel=1e-3)
        lat = level["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert 0 <= level["ndcg_at_10"] <= 1
        gateway = level["gateway_metrics"]
        # The gateway saw exactly this level's rerank requests (the /metrics polls are not counted here).
        assert gateway["requests_by_status"] == {"200": 12}
        assert gateway["batches"] >= 1
        assert gateway["batch_size_mean_pairs"] >= 1
    for name in ("latency_vs_concurrency.png", "throughput.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC)
        assert len(blob) > 5_000
    tei = json.loads((tei_out / "results.json").read_text())
    assert tei["levels"][0]["ok"] == 5
    assert tei["config"]["dialect"] == "tei"

    rc = main(
        [
            "bench",
            "plot",
            str(out / "results.json"),
            str(tei_out / "results.json"),
            "--labels",
            "cohere,tei",
            "--out",
            str(tmp_path / "compare"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "compare" / "throughput.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_run_says_when_the_gateway_is_unreachable(tmp_path, capsys):
    workload = build(tmp_path, "--top-k", "2")
    rc = main(
        [
            "bench",
            "run",
            "--url",
            "http://127.0.0.1:18499",
            "--workload",
            str(workload),
            "--requests",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "cannot reach the gateway at http://127.0.0.1:18499" in capsys.readouterr().err
