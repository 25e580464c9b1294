"""Locust load test for rerank-gateway: realistic rerank traffic in every dialect, every answer checked.

Documents come from a workload file (`rerank-gateway bench build-beir` output, a `{"cases": [...]}` file,
one `{"query", "documents"}` case, or a list of documents), by default data/rerank_samples.json, else a
built-in set. Each request takes a random query, a random number of its documents (and now and then one
long document), a random `top_n`, and one of the dialects (Cohere v1, Cohere v2, Jina, TEI). A response
counts as a failure unless it is 200, has one result per document (or `top_n`), valid distinct indices,
scores sorted best first, and the right echoed text when documents were asked back.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 1m --host http://127.0.0.1:8080 \
        --csv out/rerank --html out/rerank.html --only-summary [--workload bench/scifact.json]

Step load: RERANK_LOCUST_SHAPE=step adds users in steps (RERANK_STEP_USERS every RERANK_STEP_S seconds,
RERANK_STEPS times), then stops; -u, -r and -t are then ignored. Self-contained: needs only locust.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOAD = REPO_ROOT / "data" / "rerank_samples.json"

BUILTIN_CASES = [
    {
        "query": "How do I keep bread fresh?",
        "documents": [
            "Bread keeps best at room temperature in a paper bag or a bread box.",
            "The refrigerator makes bread go stale faster because starch recrystallises.",
            "To keep bread for more than a few days, slice it, wrap it tightly and freeze it.",
            "Espresso is brewed by forcing hot water through finely ground coffee.",
            "Stale bread makes good breadcrumbs, croutons and bread pudding.",
        ],
    },
    {
        "query": "Who wrote 'To Kill a Mockingbird'?",
        "documents": [
            "'To Kill a Mockingbird' is a novel by Harper Lee published in 1960.",
            "'Moby-Dick' was written by Herman Melville and first published in 1851.",
            "Harper Lee was born in 1926 in Monroeville, Alabama.",
            "Jane Austen was an English novelist known for six major novels.",
        ],
    },
    {
        "query": "python sort a list of dictionaries by a key",
        "documents": [
            "Use sorted(items, key=lambda d: d['name']) to sort dictionaries by the 'name' key.",
            "list.sort() sorts a list in place and returns None.",
            "A dictionary maps keys to values; keys must be hashable.",
            "operator.itemgetter('name') is a faster key function than a lambda.",
            "The Eiffel Tower is about 330 metres tall.",
        ],
    },
]

# The traffic mix: relative weights of the dialects.
DIALECT_WEIGHTS = {"cohere-v1": 3, "cohere-v2": 1, "jina": 2, "tei": 2}


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--workload",
        env_var="RERANK_LOCUST_WORKLOAD",
        default="",
        help="Workload JSON (bench build-beir output, a cases file or a document list).",
    )
    parser.add_argument("--api-key", env_var="RERANK_LOCUST_API_KEY", default="", help="Bearer key, if any.")
    parser.add_argument(
        "--model", env_var="RERANK_LOCUST_MODEL", default="", help="`model` to send (default: none)."
    )
    parser.add_argument(
        "--max-docs",
        type=int,
        env_var="RERANK_LOCUST_MAX_DOCS",
        default=64,
        help="Most documents per request.",
    )
    parser.add_argument(
        "--long-doc-share",
        type=float,
        env_var="RERANK_LOCUST_LONG_DOC_SHARE",
        default=0.1,
        help="Share of requests that carry one long document (several joined).",
    )


def _text(doc: Any) -> str | None:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    return None


def _cases(data: Any) -> list[tuple[str, list[str]]]:
    """(query, documents) pairs from any accepted workload shape."""
    if isinstance(data, dict) and isinstance(data.get("queries"), list):
        raw = data["queries"]
    elif isinstance(data, dict) and isinstance(data.get("cases"), list):
        raw = data["cases"]
    elif isinstance(data, dict) and "query" in data:
        raw = [data]
    elif isinstance(data, list):  # a bare document list: queries are each document's opening words
        docs = [t for t in (_text(d) for d in data) if t]
        raw = [{"query": " ".join(re.findall(r"\w+", t)[:6]), "documents": docs} for t in docs]
    else:
        raw = []
    cases = []
    for case in raw:
        if not isinstance(case, dict) or not isinstance(case.get("query"), str):
            continue
        docs = [t for t in (_text(d) for d in case.get("documents") or []) if t]
        if case["query"].strip() and docs:
            cases.append((case["query"], docs))
    return cases


def load_cases(path: str) -> list[tuple[str, list[str]]]:
    """The workload's (query, documents) pairs; the built-in set when no file is given or found."""
    candidate = Path(path) if path else DEFAULT_WORKLOAD
    if path and not candidate.is_file():
        raise SystemExit(f"locustfile: workload file {candidate} does not exist")
    if candidate.is_file():
        cases = _cases(json.loads(candidate.read_text(encoding="utf-8")))
        if not cases:
            raise SystemExit(f"locustfile: {candidate} holds no usable (query, documents) case")
        return cases
    return _cases(BUILTIN_CASES)


CASES: list[tuple[str, list[str]]] = []


@events.init.add_listener
def _load_workload(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    CASES[:] = load_cases(getattr(options, "workload", "") if options else "")


class RerankUser(HttpUser):
    """A search backend reranking candidates: random sizes, random top_n, every dialect."""

    wait_time = between(0.01, 0.1)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.rng = random.Random()
        self.max_docs = max(1, getattr(options, "max_docs", 64))
        self.long_doc_share = getattr(options, "long_doc_share", 0.1)
        self.model = getattr(options, "model", "") or None
        key = getattr(options, "api_key", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        if not CASES:
            CASES[:] = load_cases("")

    def _documents(self) -> tuple[str, list[str]]:
        query, docs = self.rng.choice(CASES)
        n = self.rng.randint(1, min(len(docs), self.max_docs))
        picked = self.rng.sample(docs, n)
        if self.rng.random() < self.long_doc_share:
            # A long document: the kind that hits truncation (or chunking) on the server.
            pool = [d for _, ds in CASES for d in ds]
            picked[self.rng.randrange(n)] = " ".join(self.rng.choices(pool, k=self.rng.randint(4, 16)))
        return query, picked

    def _top_n(self, n: int) -> int | None:
        return self.rng.randint(1, n) if self.rng.random() < 0.5 else None

    def _post(
        self,
        dialect: str,
        path: str,
        body: dict[str, Any],
        docs: list[str],
        expect: dict,
        headers: dict[str, str] | None = None,
    ) -> None:
        with self.client.post(
            path,
            json=body,
            headers={**self.headers, **(headers or {})},
            name=f"{path} [{dialect}]",
            catch_response=True,
        ) as response:
            problem = check_response(response.status_code, _json(response), docs, **expect)
            if problem:
                response.failure(problem)
            else:
                response.success()

    @task(DIALECT_WEIGHTS["cohere-v1"])
    def cohere_v1(self) -> None:
        query, docs = self._documents()
        top_n, echo = self._top_n(len(docs)), self.rng.random() < 0.3
        body: dict[str, Any] = {"query": query, "documents": docs, "return_documents": echo}
        if top_n is not None:
            body["top_n"] = top_n
        # The Cohere SDKs name themselves in this header; the gateway answers them in the Cohere shape.
        self._post(
            "cohere-v1",
            "/v1/rerank",
            body,
            docs,
            {"top_n": top_n, "echo": echo},
            {"X-Fern-SDK-Name": "cohere"},
        )

    @task(DIALECT_WEIGHTS["cohere-v2"])
    def cohere_v2(self) -> None:
        query, docs = self._documents()
        top_n = self._top_n(len(docs))
        body: dict[str, Any] = {"query": query, "documents": docs}
        if self.model:
            body["model"] = self.model
        if top_n is not None:
            body["top_n"] = top_n
        self._post("cohere-v2", "/v2/rerank", body, docs, {"top_n": top_n, "echo": False})

    @task(DIALECT_WEIGHTS["jina"])
    def jina(self) -> None:
        query, docs = self._documents()
        top_n = self._top_n(len(docs))
        body: dict[str, Any] = {"query": query, "documents": docs}
        if self.model:
            body["model"] = self.model
        if top_n is not None:
            body["top_n"] = top_n
        # Jina's API path and vLLM's; both return the documents unless told otherwise.
        path = self.rng.choice(("/v1/rerank", "/rerank"))
        self._post("jina", path, body, docs, {"top_n": top_n, "echo": True})

    @task(DIALECT_WEIGHTS["tei"])
    def tei(self) -> None:
        query, docs = self._documents()
        echo = self.rng.random() < 0.5
        body = {"query": query, "texts": docs, "return_text": echo}
        self._post("tei", "/rerank", body, docs, {"top_n": None, "echo": echo, "tei": True})


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def check_response(
    status: int, payload: Any, docs: list[str], *, top_n: int | None, echo: bool, tei: bool = False
) -> str | None:
    """Why a rerank answer is wrong, or None when it is right."""
    if status != 200:
        detail = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        return f"HTTP {status}: {detail or 'no error message'}"
    rows = payload if tei else (payload.get("results") if isinstance(payload, dict) else None)
    if not isinstance(rows, list):
        return "the body has no result list"
    expected = len(docs) if top_n is None else min(top_n, len(docs))
    if len(rows) != expected:
        return f"{len(rows)} results for {len(docs)} documents with top_n={top_n}"
    score_key = "score" if tei else "relevance_score"
    seen: set[int] = set()
    last = math.inf
    for row in rows:
        index = row.get("index") if isinstance(row, dict) else None
        score = row.get(score_key) if isinstance(row, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(docs) or index in seen:
            return f"invalid or repeated index {index!r}"
        seen.add(index)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            return f"{score_key} {score!r} is not a finite number"
        if score > last:
            return "results are not sorted by score"
        last = score
        if echo:
            echoed = row.get("text") if tei else _text(row.get("document"))
            if echoed != docs[index]:
                return f"result {index} echoes the wrong document text"
    return None


if os.environ.get("RERANK_LOCUST_SHAPE", "").lower() == "step":

    class StepLoadShape(LoadTestShape):
        """Add RERANK_STEP_USERS users every RERANK_STEP_S seconds, RERANK_STEPS times, then stop."""

        step_users = int(os.environ.get("RERANK_STEP_USERS", "4"))
        step_s = float(os.environ.get("RERANK_STEP_S", "30"))
        steps = int(os.environ.get("RERANK_STEPS", "5"))

        def tick(self) -> tuple[int, float] | None:
            run_time_s = self.get_run_time()
            if run_time_s >= self.steps * self.step_s:
                return None
            step = int(run_time_s // self.step_s) + 1
            return step * self.step_users, float(self.step_users)
