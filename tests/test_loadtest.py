"""Bounded headless locust runs of loadtest/locustfile.py against the real gateway on the tiny model
(marker `load`): every dialect, every answer checked, zero failures; the checks themselves catch wrong
answers (fast, default suite)."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, gateway_server

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
GATEWAY_PORT = 18411


def _locustfile_module():
    # Importing locust would gevent-monkey-patch this whole test process; the checks need none of that.
    os.environ.setdefault("LOCUST_SKIP_MONKEY_PATCH", "1")
    spec = importlib.util.spec_from_file_location("rerank_locustfile", LOCUSTFILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _locust() -> list[str]:
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    return [exe] if exe else [sys.executable, "-m", "locust"]


def _aggregated(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return next(r for r in rows if r["Name"] == "Aggregated"), rows


def run_locust(
    url: str, out: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        *_locust(),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--csv",
        str(out / "rerank"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=out
    )


def test_response_check_accepts_right_answers_and_names_wrong_ones():
    check = _locustfile_module().check_response
    docs = ["a", "b", "c"]
    right = {
        "results": [
            {"index": 2, "relevance_score": 0.9, "document": {"text": "c"}},
            {"index": 0, "relevance_score": 0.5, "document": {"text": "a"}},
        ]
    }
    assert check(200, right, docs, top_n=2, echo=True) is None
    assert "HTTP 503" in check(503, {"error": {"message": "busy"}}, docs, top_n=None, echo=False)
    assert "2 results for 3 documents" in check(200, right, docs, top_n=None, echo=False)
    swapped = {"results": list(reversed(right["results"]))}
    assert "not sorted" in check(200, swapped, docs, top_n=2, echo=False)
    wrong_text = {"results": [{**right["results"][0], "document": {"text": "a"}}, right["results"][1]]}
    assert "wrong document text" in check(200, wrong_text, docs, top_n=2, echo=True)
    repeated = {"results": [right["results"][0], right["results"][0]]}
    assert "repeated index" in check(200, repeated, docs, top_n=2, echo=False)
    tei = [
        {"index": 1, "score": 2.0, "text": "b"},
        {"index": 0, "score": 1.0, "text": "a"},
        {"index": 2, "score": -1.0, "text": "c"},
    ]
    assert check(200, tei, docs, top_n=None, echo=True, tei=True) is None
    assert "not a finite number" in check(
        200, [{**tei[0], "score": None}, *tei[1:]], docs, top_n=None, echo=False, tei=True
    )


def test_locustfile_reads_every_workload_shape(tmp_path):
    load_cases = _locustfile_module().load_cases
    assert len(load_cases(str(REPO_ROOT / "data" / "rerank_samples.json"))) > 1
    assert len(load_cases(str(REPO_ROOT / "data" / "hf_harper_lee.json"))) == 1
    assert all(len(docs) == 7 for _, docs in load_cases(str(REPO_ROOT / "data" / "example_docs.json")))
    beir = tmp_path / "w.json"
    beir.write_text(
        '{"format": "rerank-workload/v1", "queries": [{"query": "q", "documents": ["d1", "d2"]}]}'
    )
    assert load_cases(str(beir)) == [("q", ["d1", "d2"])]
    with pytest.raises(SystemExit, match="does not exist"):
        load_cases(str(tmp_path / "missing.json"))


@pytest.fixture(scope="module")
def live_gateway(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with gateway_server(GATEWAY_PORT, tiny_model_dir, tmp_path_factory.mktemp("locust-gateway")) as url:
        yield url


@pytest.mark.load
def test_headless_locust_run_has_zero_failures(live_gateway: str, tmp_path: Path):
    proc = run_locust(
        live_gateway,
        tmp_path,
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "10s",
        "--workload",
        str(REPO_ROOT / "data" / "rerank_samples.json"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total, rows = _aggregated(tmp_path / "rerank_stats.csv")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    # Every dialect was exercised.
    names = {r["Name"] for r in rows}
    for dialect in ("cohere-v1", "cohere-v2", "jina", "tei"):
        assert any(f"[{dialect}]" in n for n in names), names
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert not (tmp_path / "rerank_failures.csv").read_text().strip().splitlines()[1:]


@pytest.mark.load
def test_step_load_shape_ramps_users_and_stops_by_itself(live_gateway: str, tmp_path: Path):
    env = {"RERANK_LOCUST_SHAPE": "step", "RERANK_STEP_USERS": "2", "RERANK_STEP_S": "3", "RERANK_STEPS": "3"}
    # No -t: the shape ends the run after 3 steps of 3 s (the subprocess timeout catches one that never ends).
    proc = run_locust(live_gateway, tmp_path, "--csv-full-history", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total, _ = _aggregated(tmp_path / "rerank_stats.csv")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    with (tmp_path / "rerank_stats_history.csv").open(newline="") as fh:
        users = [int(r["User Count"]) for r in csv.DictReader(fh) if r["Name"] == "Aggregated"]
    assert max(users) == 6
    assert 2 in users or 4 in users  # it went up in steps, not in one jump
