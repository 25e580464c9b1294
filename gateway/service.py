"""RerankService: limits, per-document token caps and chunking, contract prompts, scoring, order, scores.

Dialect-free and HTTP-free: routes (and the CLI's `rank` / `batch`) turn their input into a `RerankQuery` and
a `RerankOutcome` back into their own shape. It takes plain arguments (`RerankLimits`) and raises the core's
domain errors (core.errors); the HTTP edge maps those to statuses. Token ids in, token ids out: a document is
tokenized once, caps and chunks cut its ids (core.contract.DocumentIds), never its text.
Tokenization runs in a worker thread (the `tokenizers` library releases the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from core.contract import DocumentIds, Prompt, PromptBuilder, normalize_score
from core.errors import DeadlineExceeded, InputTooLarge, InvalidInput
from core.ranking import rank_indices
from engines.base import Engine, EngineFailure, Scored

WARMUP_TEXT = "warm-up"


class PairScorer(Protocol):
    """The scheduler's scoring call: raw scores in input order."""

    async def score(self, prompts: Sequence[Prompt], *, deadline_s: float | None = None) -> Scored:
        """Raw scores in input order; `deadline_s` is an absolute time.monotonic() time."""


@dataclass(frozen=True, slots=True)
class RerankLimits:
    """What one request may hold and how long it may take (the defaults are the server's)."""

    max_documents: int = 1_000
    max_query_chars: int = 10_000
    max_document_chars: int = 100_000
    max_chunks_per_doc: int = 64  # the most a request's max_chunks_per_doc may ask for
    chunk_tokens: int = 512  # document tokens per chunk when a request asks for chunking
    timeout_s: float | None = 60.0  # from arrival to scores; None: no deadline (the CLI)
    # Where each limit above is configured (field name -> e.g. an environment variable), for the messages.
    sources: Mapping[str, str] = field(default_factory=dict)

    def named(self, limit: str) -> str:
        """` (WHERE)` for a message about `limit`, or nothing when its source is not known."""
        source = self.sources.get(limit)
        return f" ({source})" if source else ""

    def check(self, q: RerankQuery) -> None:
        """Reject what these limits forbid, naming the field (InvalidInput or InputTooLarge)."""
        param = q.documents_param
        if not q.documents:
            raise InvalidInput(
                f"`{param}` is empty: send at least one document to rank", param=param, code="empty_documents"
            )
        if len(q.documents) > self.max_documents:
            raise InputTooLarge(
                f"{len(q.documents)} documents in `{param}`; this server takes at most "
                f"{self.max_documents} per request{self.named('max_documents')}: split the request",
                param=param,
                code="too_many_documents",
            )
        if len(q.query) > self.max_query_chars:
            raise InputTooLarge(
                f"`query` has {len(q.query)} characters; the limit is {self.max_query_chars}"
                f"{self.named('max_query_chars')}: shorten it",
                param="query",
                code="query_too_long",
            )
        for i, doc in enumerate(q.documents):
            if len(doc) > self.max_document_chars:
                raise InputTooLarge(
                    f"`{param}[{i}]` has {len(doc)} characters; the limit is {self.max_document_chars}"
                    f"{self.named('max_document_chars')}: shorten it, or split it into several documents",
                    param=f"{param}[{i}]",
                    code="document_too_long",
                )
        if q.top_n is not None and q.top_n < 1:
            raise InvalidInput(
                f"`{q.top_n_param}` must be at least 1, got {q.top_n}; leave it out to get every document",
                param=q.top_n_param,
            )
        if q.max_tokens_per_doc is not None and q.max_tokens_per_doc < 1:
            raise InvalidInput(
                f"`max_tokens_per_doc` must be at least 1, got {q.max_tokens_per_doc}",
                param="max_tokens_per_doc",
            )
        if q.max_chunks_per_doc is not None and not 1 <= q.max_chunks_per_doc <= self.max_chunks_per_doc:
            raise InvalidInput(
                f"`max_chunks_per_doc` must be between 1 and {self.max_chunks_per_doc}"
                f"{self.named('max_chunks_per_doc')}, got {q.max_chunks_per_doc}",
                param="max_chunks_per_doc",
            )


@dataclass(frozen=True, slots=True)
class RerankQuery:
    """One rerank request, whatever dialect it came in."""

    query: str
    documents: tuple[str, ...]
    instruction: str | None = None
    top_n: int | None = None
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    # TEI `truncate: true`: fit each document to the model from this side (None: the contract's own cut).
    fit_side: Literal["left", "right"] | None = None
    raw_scores: bool = False
    # Field names for error messages, in the dialect's words.
    documents_param: str = "documents"
    top_n_param: str = "top_n"
    # vLLM's truncate_prompt_tokens (whole prompt; only document ids are cut) and max_tokens_per_query.
    max_prompt_tokens: int | None = None
    max_query_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RankedDocument:
    """One document's place in the answer."""

    index: int
    score: float  # what the client asked for: normalized 0..1, or raw
    raw_score: float


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    """Ranked documents and what it took to score them."""

    ranked: tuple[RankedDocument, ...]
    prompt_tokens: int
    pairs_scored: int
    engine: str
    documents_truncated: int
    documents_chunked: int
    tokenization_ms: float
    inference_ms: float


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's prompts: each document's pieces (one, or its chunks), in document order."""

    prompts: list[Prompt]
    owner: list[int]  # document index of each prompt
    truncated: int  # documents that lost tokens (cap, dropped chunks, or the contract's truncation)
    chunked: int  # documents scored as more than one chunk


class RerankService:
    """Scores rerank queries on one engine (through the scheduler when there is one)."""

    def __init__(
        self,
        builder: PromptBuilder,
        engine: Engine,
        *,
        limits: RerankLimits | None = None,
        estimated_max: float | None = None,
        scorer: PairScorer | None = None,
        on_outcome: Callable[[RerankOutcome], None] | None = None,
    ) -> None:
        self.builder = builder
        self.engine = engine
        self.limits = limits or RerankLimits()
        # None: raw scores only (a model of unknown shape can still be ranked raw).
        self.estimated_max = estimated_max
        self.scorer = scorer
        # Told every outcome (the edge counts truncated and chunked documents from it).
        self.on_outcome = on_outcome
        self.ready = False

    # --- lifecycle ---------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Score one pair straight on the engine, so the first request pays no lazy initialization."""
        await self.engine.score(self.builder.build(WARMUP_TEXT, [WARMUP_TEXT]))

    # --- one request -------------------------------------------------------------------------------

    def check_limits(self, q: RerankQuery) -> None:
        """Reject what the limits forbid, naming the field (InvalidInput or InputTooLarge)."""
        self.limits.check(q)
        if not q.raw_scores and self.estimated_max is None:
            raise InvalidInput(
                "this model's normalization constant is not known: ask for raw scores, or configure "
                f"estimated_max{self.limits.named('estimated_max')}",
                param="raw_scores",
                code="no_normalization_constant",
            )

    async def rerank(self, q: RerankQuery) -> RerankOutcome:
        """Score, aggregate (max over chunks), normalize and order one request's documents."""
        self.check_limits(q)
        # The deadline counts from arrival: tokenization time is part of the request's budget.
        timeout_s = self.limits.timeout_s
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        t0 = time.perf_counter()
        prepared = await asyncio.to_thread(self.prepare, q)
        t1 = time.perf_counter()
        scored = await self._score(prepared.prompts, deadline_s)
        t2 = time.perf_counter()
        if len(scored.scores) != len(prepared.prompts):
            raise EngineFailure(f"{len(scored.scores)} scores for {len(prepared.prompts)} prompts")
        raw = [float("-inf")] * len(q.documents)
        for owner, score in zip(prepared.owner, scored.scores, strict=True):
            raw[owner] = max(raw[owner], float(score))
        ranked = tuple(
            RankedDocument(index=i, score=self._shown(raw[i], q.raw_scores), raw_score=raw[i])
            for i in rank_indices(raw, q.top_n)
        )
        outcome = RerankOutcome(
            ranked=ranked,
            prompt_tokens=sum(len(p) for p in prepared.prompts),
            pairs_scored=len(prepared.prompts),
            engine=scored.engine,
            documents_truncated=prepared.truncated,
            documents_chunked=prepared.chunked,
            tokenization_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
        )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _shown(self, raw: float, raw_scores: bool) -> float:
        if raw_scores or self.estimated_max is None:
            return raw
        return normalize_score(raw, self.estimated_max)

    async def _score(self, prompts: list[Prompt], deadline_s: float | None) -> Scored:
        """Scores through the scheduler, or straight from the engine; `deadline_s` is time.monotonic()."""
        if self.scorer is not None:
            return await self.scorer.score(prompts, deadline_s=deadline_s)
        if deadline_s is None:
            return await self.engine.score(prompts)
        try:
            return await asyncio.wait_for(self.engine.score(prompts), deadline_s - time.monotonic())
        except asyncio.TimeoutError as exc:
            raise DeadlineExceeded(
                f"the request was not scored within {self.limits.timeout_s * 1000:.0f} ms"
                f"{self.limits.named('timeout_s')}: retry, or send fewer or shorter documents"
            ) from exc

    # --- documents -> prompts (worker thread) --------------------------------------------------------

    def prepare(self, q: RerankQuery) -> Prepared:
        """Each document tokenized once; caps, side fits and chunks cut its ids; one prompt per piece."""
        b = self.builder
        query = b.encode_query(q.query, q.instruction)
        if q.max_query_tokens is not None:
            query = query.first(q.max_query_tokens)
        prompts: list[Prompt] = []
        owner: list[int] = []
        cut_docs: set[int] = set()
        chunked = 0
        for i, doc in enumerate(b.encode_documents(q.documents)):
            kept = doc
            if q.fit_side is not None or q.max_prompt_tokens is not None:
                kept = b.fit(query, doc, q.fit_side or "right", max_prompt_tokens=q.max_prompt_tokens)
            # A token cap tighter than the fit wins, and keeps the document's start.
            if q.max_tokens_per_doc is not None and len(kept) > q.max_tokens_per_doc:
                kept = doc.first(q.max_tokens_per_doc)
            pieces: list[DocumentIds] = [kept]
            if q.max_chunks_per_doc is not None:
                pieces = kept.chunks(self.limits.chunk_tokens)
                if len(pieces) > q.max_chunks_per_doc:
                    pieces = pieces[: q.max_chunks_per_doc]
                    cut_docs.add(i)
                if len(pieces) > 1:
                    chunked += 1
            if len(kept) < len(doc):
                cut_docs.add(i)
            for piece in pieces:
                prompt = b.prompt(query, piece)
                if prompt.truncated:
                    cut_docs.add(i)
                prompts.append(prompt)
                owner.append(i)
        return Prepared(prompts, owner, len(cut_docs), chunked)
