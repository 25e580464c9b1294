"""Rerank workloads from BEIR datasets: per query, its judged-relevant documents plus mined negatives.

The datasets come through `ir_datasets` (its own download and caching code: `beir/scifact/test`, `beir/nq`,
...), or offline from a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Negatives are
the documents BM25 ranks highest for the query among a seeded sample of the corpus (hard negatives, as a
first-stage retriever would return), topped up with random ones.

The workload file (format `rerank-workload/v1`) is what `rerank-gateway bench run` and the locustfile read:
`{"format", "name", "params", "stats", "queries": [{"query_id", "query", "documents", "doc_ids",
"relevance"}]}`. `load_workload` also reads the sample files under data/ (a case list, one case, a list of
documents).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

WORKLOAD_FORMAT = "rerank-workload/v1"
NegativeMining = Literal["bm25", "random"]
_TOKEN_RE = re.compile(r"\w+")
logger = logging.getLogger(__name__)


class WorkloadError(ValueError):
    """A workload cannot be built or read; the message says what to change."""


@dataclass(frozen=True)
class WorkloadItem:
    """One rerank request's worth of data: a query, its candidate documents and their relevance labels."""

    query: str
    documents: tuple[str, ...]
    query_id: str = ""
    doc_ids: tuple[str, ...] = ()
    relevance: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Workload:
    """A named list of rerank requests, with the parameters that built it."""

    name: str
    items: tuple[WorkloadItem, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, float]:
        """Sizes that describe the workload: documents per query, characters per document, positives."""
        n_docs = [len(it.documents) for it in self.items]
        chars = [len(d) for it in self.items for d in it.documents]
        positives = [sum(1 for r in it.relevance if r > 0) for it in self.items if it.relevance is not None]
        return {
            "queries": len(self.items),
            "documents": sum(n_docs),
            "documents_per_query_mean": _mean(n_docs),
            "documents_per_query_max": max(n_docs, default=0),
            "document_chars_mean": _mean(chars),
            "document_chars_max": max(chars, default=0),
            "positives_per_query_mean": _mean(positives),
        }

    def to_json(self) -> dict[str, Any]:
        """The `rerank-workload/v1` document."""
        queries = []
        for it in self.items:
            row = asdict(it)
            row["documents"] = list(it.documents)
            row["doc_ids"] = list(it.doc_ids)
            row["relevance"] = None if it.relevance is None else list(it.relevance)
            queries.append(row)
        return {
            "format": WORKLOAD_FORMAT,
            "name": self.name,
            "params": self.params,
            "stats": self.stats(),
            "queries": queries,
        }


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


# --- reading workloads -------------------------------------------------------------------------------


def _doc_text(doc: object, where: str) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise WorkloadError(f"{where}: a document must be a string or an object with a 'text' string")


def _item_from_case(case: object, where: str) -> WorkloadItem:
    if not isinstance(case, dict) or not isinstance(case.get("query"), str):
        raise WorkloadError(f"{where}: expected an object with a 'query' string and a 'documents' list")
    docs = case.get("documents")
    if not isinstance(docs, list) or not docs:
        raise WorkloadError(f"{where}: 'documents' must be a non-empty list")
    texts = tuple(_doc_text(d, f"{where}.documents[{i}]") for i, d in enumerate(docs))
    relevance = case.get("relevance")
    if relevance is not None and (not isinstance(relevance, list) or len(relevance) != len(texts)):
        raise WorkloadError(f"{where}: 'relevance' must list one label per document")
    return WorkloadItem(
        query=case["query"],
        documents=texts,
        query_id=str(case.get("query_id", case.get("name", ""))),
        doc_ids=tuple(str(d) for d in case.get("doc_ids") or ()),
        relevance=None if relevance is None else tuple(int(r) for r in relevance),
    )


def _items_from_documents(docs: list[object], where: str) -> list[WorkloadItem]:
    """Queries for a bare document list: the opening words of each document, ranked against all of them."""
    texts = [_doc_text(d, f"{where}[{i}]") for i, d in enumerate(docs)]
    items = []
    for i, text in enumerate(texts):
        words = _TOKEN_RE.findall(text)[:6]
        if words:
            items.append(WorkloadItem(query=" ".join(words), documents=tuple(texts), query_id=f"doc-{i}"))
    return items


def parse_workload(data: object, name: str) -> Workload:
    """A workload from parsed JSON: `rerank-workload/v1`, `{"cases": [...]}`, one case, or a document list."""
    if isinstance(data, dict) and isinstance(data.get("queries"), list):
        items = [_item_from_case(q, f"{name}: queries[{i}]") for i, q in enumerate(data["queries"])]
        return _checked(Workload(str(data.get("name") or name), tuple(items), dict(data.get("params") or {})))
    if isinstance(data, dict) and isinstance(data.get("cases"), list):
        items = [_item_from_case(c, f"{name}: cases[{i}]") for i, c in enumerate(data["cases"])]
        return _checked(Workload(name, tuple(items)))
    if isinstance(data, dict) and "query" in data:
        return _checked(Workload(name, (_item_from_case(data, name),)))
    if isinstance(data, list):
        return _checked(Workload(name, tuple(_items_from_documents(data, name))))
    raise WorkloadError(
        f"{name}: not a workload; expected a `rerank-gateway bench build-beir` file, "
        "{'cases': [...]}, {'query', 'documents'} or a list of documents"
    )


def _checked(workload: Workload) -> Workload:
    if not workload.items:
        raise WorkloadError(f"{workload.name}: the workload holds no queries")
    return workload


def load_workload(path: str | Path) -> Workload:
    """Read a workload file (see `parse_workload` for the accepted shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}: not valid JSON ({exc})") from exc
    return parse_workload(data, str(path))


def save_workload(workload: Workload, path: str | Path) -> Path:
    """Write `workload` as `rerank-workload/v1` JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(workload.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# --- BEIR sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceDoc:
    """A corpus document: id and the text sent to the reranker (title and body)."""

    doc_id: str
    text: str


class BeirSource(Protocol):
    """Where a BEIR dataset's corpus, queries and relevance judgments come from."""

    name: str

    def docs_count(self) -> int | None: ...
    def docs_iter(self) -> Iterator[SourceDoc]: ...
    def queries_iter(self) -> Iterator[tuple[str, str]]: ...
    def qrels_iter(self) -> Iterator[tuple[str, str, int]]: ...


def _join_title(title: str | None, text: str) -> str:
    return f"{title} {text}".strip() if title else text.strip()


def resolve_dataset_id(dataset: str, split: str = "test") -> str:
    """The ir_datasets id for a BEIR name (`scifact` -> `beir/scifact/test`, `nq` -> `beir/nq`)."""
    import ir_datasets

    registered = set(ir_datasets.registry._registered)
    name = dataset.strip().strip("/")
    base = name if name.startswith("beir/") else f"beir/{name}"
    for candidate in (base, f"{base}/{split}") if base.count("/") > 1 else (f"{base}/{split}", base):
        if candidate in registered:
            return candidate
    known = sorted(n.removeprefix("beir/") for n in registered if n.startswith("beir/"))
    raise WorkloadError(
        f"unknown BEIR dataset {dataset!r} (split {split!r}); ir_datasets knows: {', '.join(known)}"
    )


class IrDatasetsSource:
    """A BEIR dataset through ir_datasets: downloaded and cached on first use under $IR_DATASETS_HOME."""

    def __init__(self, dataset_id: str) -> None:
        import ir_datasets

        self.name = dataset_id
        self._ds = ir_datasets.load(dataset_id)

    def _guard(self, what: str, it: Iterable[Any]) -> Iterator[Any]:
        try:
            yield from it
        except OSError as exc:  # requests' ConnectionError and friends, disk errors
            raise WorkloadError(
                f"cannot download or read {self.name} ({what}) with ir_datasets: {exc}. Without network, "
                "download the BEIR zip elsewhere, unzip it and pass the folder with --source-dir"
            ) from exc

    def docs_count(self) -> int | None:
        try:
            return self._ds.docs_count()
        except OSError:
            return None

    def docs_iter(self) -> Iterator[SourceDoc]:
        for doc in self._guard("corpus", self._ds.docs_iter()):
            yield SourceDoc(doc.doc_id, _join_title(getattr(doc, "title", None), doc.text))

    def queries_iter(self) -> Iterator[tuple[str, str]]:
        for q in self._guard("queries", self._ds.queries_iter()):
            yield q.query_id, q.text

    def qrels_iter(self) -> Iterator[tuple[str, str, int]]:
        for qrel in self._guard("qrels", self._ds.qrels_iter()):
            yield qrel.query_id, qrel.doc_id, int(qrel.relevance)


class FolderSource:
    """A BEIR-format folder (an unzipped BEIR download): corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

    def __init__(self, root: str | Path, split: str = "test", name: str | None = None) -> None:
        self.root = Path(root)
        self.name = name or f"{self.root.name}/{split}"
        self.corpus = self.root / "corpus.jsonl"
        self.queries = self.root / "queries.jsonl"
        self.qrels = self.root / "qrels" / f"{split}.tsv"
        for path in (self.corpus, self.queries, self.qrels):
            if not path.is_file():
                raise WorkloadError(
                    f"{path} is missing; a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/{split}.tsv"
                )

    def _jsonl(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise WorkloadError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
                if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
                    raise WorkloadError(f"{path}:{lineno}: expected an object with '_id' and 'text'")
                yield lineno, row

    def docs_count(self) -> int | None:
        with self.corpus.open("rb") as fh:
            return sum(1 for line in fh if line.strip())

    def docs_iter(self) -> Iterator[SourceDoc]:
        for _, row in self._jsonl(self.corpus):
            yield SourceDoc(str(row["_id"]), _join_title(row.get("title"), row["text"]))

    def queries_iter(self) -> Iterator[tuple[str, str]]:
        for _, row in self._jsonl(self.queries):
            yield str(row["_id"]), row["text"]

    def qrels_iter(self) -> Iterator[tuple[str, str, int]]:
        with self.qrels.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                cols = line.split()
                if not cols or (lineno == 1 and cols[0] == "query-id"):
                    continue
                if len(cols) != 3:
                    raise WorkloadError(f"{self.qrels}:{lineno}: expected 'query-id corpus-id score'")
                try:
                    yield cols[0], cols[1], int(cols[2])
                except ValueError as exc:
                    raise WorkloadError(f"{self.qrels}:{lineno}: the score must be an integer") from exc


# --- negatives -----------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


class BM25:
    """Okapi BM25 over a small in-memory document pool (k1=0.9, b=0.4, Anserini's BEIR defaults)."""

    def __init__(self, docs: Sequence[str], k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b = k1, b
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths = []
        for i, text in enumerate(docs):
            counts = Counter(tokenize(text))
            self.lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                self.postings[term].append((i, tf))
        self.avg_length = (sum(self.lengths) / len(self.lengths)) if self.lengths else 1.0

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every pool document that shares a term with `query` (others score 0)."""
        n = len(self.lengths)
        out: dict[int, float] = defaultdict(float)
        for term in set(tokenize(query)):
            postings = self.postings.get(term)
            if not postings:
                continue
            idf = math.log(1 + (n - len(postings) + 0.5) / (len(postings) + 0.5))
            for i, tf in postings:
                norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_length)
                out[i] += idf * tf * (self.k1 + 1) / (tf + norm)
        return out


# --- building ------------------------------------------------------------------------------------------


def _progress(iterable: Iterable[Any], *, enabled: bool, **kw: Any) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def build_workload(
    source: BeirSource,
    *,
    queries: int = 100,
    top_k: int = 20,
    negatives: int | None = None,
    negative_mining: NegativeMining = "bm25",
    pool_size: int = 20_000,
    seed: int = 0,
    progress: bool = True,
) -> Workload:
    """Sample `queries` judged queries; each gets its positives (<= `top_k`) and up to `negatives` negatives.

    `negatives` defaults to filling every query up to `top_k` candidates. Candidates are shuffled (seeded),
    so a positive's position tells the reranker nothing.
    """
    if queries < 1 or top_k < 1:
        raise WorkloadError("--queries and --top-k must be at least 1")
    if negatives is not None and negatives < 0:
        raise WorkloadError("--negatives must be 0 or more")
    rng = random.Random(seed)

    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for qid, doc_id, rel in source.qrels_iter():
        qrels[qid][doc_id] = rel
    texts: dict[str, str] = {}
    for qid, text in source.queries_iter():
        if any(r > 0 for r in qrels.get(qid, {}).values()):
            texts[qid] = text
    if not texts:
        raise WorkloadError(f"{source.name}: no query has a relevance judgment above 0")
    picked = sorted(rng.sample(sorted(texts), min(queries, len(texts))))

    positives = {
        qid: sorted((d for d, r in qrels[qid].items() if r > 0), key=lambda d: (-qrels[qid][d], d))[:top_k]
        for qid in picked
    }
    needed = {d for docs in positives.values() for d in docs}
    found: dict[str, str] = {}
    # One pass over the corpus: keep the positives and a reservoir sample of the rest as the negative pool.
    reservoir: list[SourceDoc] = []
    seen = 0
    docs = _progress(
        source.docs_iter(),
        enabled=progress,
        total=source.docs_count(),
        desc=f"reading {source.name} corpus",
        unit="doc",
    )
    for doc in docs:
        if doc.doc_id in needed:
            found[doc.doc_id] = doc.text
            continue
        seen += 1
        if len(reservoir) < pool_size:
            reservoir.append(doc)
        else:
            j = rng.randrange(seen)
            if j < pool_size:
                reservoir[j] = doc
    missing = needed - found.keys()
    if missing:
        # Some BEIR qrels name documents the corpus lacks; such judgments cannot become candidates.
        logger.warning("%s: %d judged documents are not in the corpus; skipped", source.name, len(missing))
        positives = {q: [d for d in docs if d in found] for q, docs in positives.items()}
        picked = [q for q in picked if positives[q]]
        if not picked:
            raise WorkloadError(
                f"{source.name}: none of the picked queries' relevant documents is in the corpus"
            )
    pool = [*reservoir, *(SourceDoc(d, t) for d, t in sorted(found.items()))]
    pool_text = {d.doc_id: d.text for d in pool}
    bm25 = BM25([d.text for d in pool]) if negative_mining == "bm25" else None

    items = []
    for qid in _progress(picked, enabled=progress, desc="mining negatives", unit="query"):
        pos = positives[qid]
        budget = top_k - len(pos) if negatives is None else min(negatives, top_k - len(pos))
        judged_relevant = {d for d, r in qrels[qid].items() if r > 0}
        chosen: list[str] = []
        taken: set[str] = set()
        if bm25 is not None and budget > 0:
            ranked = sorted(bm25.scores(texts[qid]).items(), key=lambda kv: (-kv[1], kv[0]))
            for i, _ in ranked:
                if len(chosen) == budget:
                    break
                doc = pool[i]
                if doc.doc_id not in judged_relevant and doc.doc_id not in taken:
                    chosen.append(doc.doc_id)
                    taken.add(doc.doc_id)
        # Top up with random pool documents (BM25 may match fewer than `budget`).
        # Drawing this many distinct indices fills the budget whenever the pool can: at most
        # |judged_relevant| + |taken| of them are excluded.
        draw = min(len(pool), max(0, budget - len(chosen)) + len(judged_relevant) + len(taken))
        for i in rng.sample(range(len(pool)), draw):
            if len(chosen) >= budget:
                break
            doc = pool[i]
            if doc.doc_id not in judged_relevant and doc.doc_id not in taken:
                chosen.append(doc.doc_id)
                taken.add(doc.doc_id)
        candidates = [*pos, *chosen]
        rng.shuffle(candidates)
        items.append(
            WorkloadItem(
                query=texts[qid],
                documents=tuple(pool_text[d] for d in candidates),
                query_id=qid,
                doc_ids=tuple(candidates),
                relevance=tuple(max(0, qrels[qid].get(d, 0)) for d in candidates),
            )
        )
    params = {
        "source": source.name,
        "queries": queries,
        "top_k": top_k,
        "negatives": negatives,
        "negative_mining": negative_mining,
        "pool_size": pool_size,
        "seed": seed,
    }
    return Workload(source.name, tuple(items), params)


def open_source(dataset: str, *, split: str = "test", source_dir: str | Path | None = None) -> BeirSource:
    """A BEIR folder when `source_dir` is given, else the ir_datasets dataset (downloaded on first use)."""
    if source_dir is not None:
        name = dataset if dataset.startswith("beir/") else f"beir/{dataset}/{split}"
        return FolderSource(source_dir, split, name=f"{name} ({source_dir})")
    return IrDatasetsSource(resolve_dataset_id(dataset, split))
