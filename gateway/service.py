"""RerankService: limits, per-document token caps and chunking, contract prompts, scoring, order, scores.

Dialect-free: routes turn a request into a `RerankQuery` and a `RerankOutcome` back into their own shape.
Tokenization runs in a worker thread (the `tokenizers` library releases the GIL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal, Protocol

from core.contract import DOC_PROMPT, Prompt, PromptBuilder, normalize_score
from core.ranking import rank_indices
from engines.base import Engine, EngineError, Scored
from gateway.errors import (
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    clip,
    from_engine_error,
)
from gateway.metrics import DOCUMENTS_CHUNKED, DOCUMENTS_TRUNCATED

if TYPE_CHECKING:
    from gateway.config import Settings

WARMUP_TEXT = "warm-up"


class PairScorer(Protocol):
    """The coalescer's scoring call (gateway.coalescer.Coalescer)."""

    async def score(self, prompts: Sequence[Prompt], *, deadline_s: float | None = None) -> Scored:
        """Raw scores in input order; `deadline_s` is an absolute time.monotonic() time."""


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
    # vLLM's truncate_prompt_tokens / max_tokens_per_query: the prompt's and the query's token caps.
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
class _Prepared:
    prompts: list[Prompt]
    owner: list[int]  # document index of each prompt
    truncated: int
    chunked: int


class RerankService:
    """Scores rerank queries on one engine (through the coalescer when there is one)."""

    def __init__(
        self,
        settings: Settings,
        builder: PromptBuilder,
        engine: Engine,
        *,
        estimated_max: float,
        scorer: PairScorer | None = None,
    ) -> None:
        self.settings = settings
        self.builder = builder
        self.engine = engine
        self.scorer = scorer
        self.estimated_max = estimated_max
        self.ready = False
        self._doc_prefix_tokens = builder.count_tokens(DOC_PROMPT.format(document="").rstrip())

    # --- lifecycle ---------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Score one pair straight on the engine, so the first request pays no lazy initialization."""
        prompts = self.builder.build(WARMUP_TEXT, [WARMUP_TEXT])
        try:
            await self.engine.score(prompts)
        except EngineError as exc:
            raise from_engine_error(exc) from exc

    # --- one request -------------------------------------------------------------------------------

    def check_limits(self, q: RerankQuery) -> None:
        """Reject what the configured limits forbid, naming the field (400 or 413)."""
        s = self.settings
        param = q.documents_param
        # Empty documents and top_n < 1 are refused at the HTTP edge (gateway.dialects.check_query).
        if len(q.documents) > s.max_documents_per_request:
            raise PayloadTooLarge(
                f"{len(q.documents)} documents in `{param}`; this server takes at most "
                f"{s.max_documents_per_request} per request (RERANK_MAX_DOCUMENTS_PER_REQUEST): split the "
                "request",
                param=param,
                code="too_many_documents",
            )
        if len(q.query) > s.max_query_chars:
            raise PayloadTooLarge(
                f"`query` has {len(q.query)} characters; the limit is {s.max_query_chars} "
                "(RERANK_MAX_QUERY_CHARS): shorten it",
                param="query",
                code="query_too_long",
            )
        for i, doc in enumerate(q.documents):
            if len(doc) > s.max_document_chars:
                raise PayloadTooLarge(
                    f"`{param}[{i}]` has {len(doc)} characters; the limit is {s.max_document_chars} "
                    "(RERANK_MAX_DOCUMENT_CHARS): shorten it, or split it into several documents",
                    param=f"{param}[{i}]",
                    code="document_too_long",
                )
        if q.max_tokens_per_doc is not None and q.max_tokens_per_doc < 1:
            raise InvalidRequest(
                f"`max_tokens_per_doc` must be at least 1, got {q.max_tokens_per_doc}",
                param="max_tokens_per_doc",
            )
        if q.max_chunks_per_doc is not None and not 1 <= q.max_chunks_per_doc <= s.max_chunks_per_doc_limit:
            raise InvalidRequest(
                f"`max_chunks_per_doc` must be between 1 and {s.max_chunks_per_doc_limit} "
                f"(RERANK_MAX_CHUNKS_PER_DOC_LIMIT), got {q.max_chunks_per_doc}",
                param="max_chunks_per_doc",
            )

    async def rerank(self, q: RerankQuery) -> RerankOutcome:
        """Score, aggregate (max over chunks), normalize and order one request's documents."""
        self.check_limits(q)
        if q.max_query_tokens is not None:
            q = dataclasses.replace(q, query=self.cut_tokens(q.query, q.max_query_tokens)[0])
        # The deadline counts from arrival: tokenization time is part of the request's budget.
        deadline_s = time.monotonic() + self.settings.request_timeout_ms / 1000.0
        t0 = time.perf_counter()
        prepared = await asyncio.to_thread(self._prepare, q)
        t1 = time.perf_counter()
        scored = await self._score(prepared.prompts, deadline_s)
        t2 = time.perf_counter()
        if len(scored.scores) != len(prepared.prompts):
            raise from_engine_error(
                EngineError(f"{len(scored.scores)} scores for {len(prepared.prompts)} prompts")
            )
        raw = [float("-inf")] * len(q.documents)
        for owner, score in zip(prepared.owner, scored.scores, strict=True):
            raw[owner] = max(raw[owner], float(score))
        if prepared.truncated:
            DOCUMENTS_TRUNCATED.inc(prepared.truncated)
        if prepared.chunked:
            DOCUMENTS_CHUNKED.inc(prepared.chunked)
        ranked = tuple(
            RankedDocument(
                index=i,
                score=raw[i] if q.raw_scores else normalize_score(raw[i], self.estimated_max),
                raw_score=raw[i],
            )
            for i in rank_indices(raw, q.top_n)
        )
        return RerankOutcome(
            ranked=ranked,
            prompt_tokens=sum(len(p) for p in prepared.prompts),
            pairs_scored=len(prepared.prompts),
            engine=scored.engine,
            documents_truncated=prepared.truncated,
            documents_chunked=prepared.chunked,
            tokenization_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
        )

    async def _score(self, prompts: list[Prompt], deadline_s: float) -> Scored:
        """Scores through the coalescer, or straight from the engine; `deadline_s` is time.monotonic()."""
        try:
            if self.scorer is not None:
                return await self.scorer.score(prompts, deadline_s=deadline_s)
            return await asyncio.wait_for(self.engine.score(prompts), deadline_s - time.monotonic())
        except asyncio.TimeoutError as exc:
            raise GatewayTimeout(
                f"the request was not scored within {self.settings.request_timeout_ms} ms "
                "(RERANK_REQUEST_TIMEOUT_MS): retry, or send fewer or shorter documents"
            ) from exc
        except EngineError as exc:
            raise from_engine_error(exc) from exc

    # --- documents -> prompts (worker thread) --------------------------------------------------------

    def _prepare(self, q: RerankQuery) -> _Prepared:
        pieces: list[str] = []
        owner: list[int] = []
        cut_docs: set[int] = set()
        chunked = 0
        fit_tokens = self._fit_budget(q) if q.fit_side else None
        if q.max_prompt_tokens is not None:
            overhead = self._fit_budget_overhead(q)
            prompt_cap = max(1, q.max_prompt_tokens - overhead)
            fit_tokens = prompt_cap if fit_tokens is None else min(fit_tokens, prompt_cap)
        for i, doc in enumerate(q.documents):
            text = doc
            cap = q.max_tokens_per_doc
            side = "right"
            if fit_tokens is not None and (cap is None or fit_tokens < cap):
                cap, side = fit_tokens, q.fit_side or "right"
            if cap is not None:
                text, cut = self.cut_tokens(text, cap, side=side)
                if cut:
                    cut_docs.add(i)
            if q.max_chunks_per_doc is not None:
                chunks = self.split_tokens(text, self.settings.chunk_tokens)
                if len(chunks) > q.max_chunks_per_doc:
                    chunks = chunks[: q.max_chunks_per_doc]
                    cut_docs.add(i)
                if len(chunks) > 1:
                    chunked += 1
            else:
                chunks = [text]
            pieces.extend(chunks)
            owner.extend([i] * len(chunks))
        prompts = self.builder.build(q.query, pieces, q.instruction)
        for p, i in zip(prompts, owner, strict=True):
            if p.truncated:
                cut_docs.add(i)
        return _Prepared(prompts, owner, len(cut_docs), chunked)

    def _fit_budget_overhead(self, q: RerankQuery) -> int:
        """Prompt tokens besides the document's own text: template, query, separators, `document: `."""
        b = self.builder
        q_tokens = min(b.count_tokens(b.query_text(q.query, q.instruction)), b.max_query_tokens)
        return b.fixed_length + q_tokens + len(b.sep_ids) + self._doc_prefix_tokens

    def _fit_budget(self, q: RerankQuery) -> int:
        """Document tokens that fit next to this query under the contract (for TEI side-aware cuts)."""
        b = self.builder
        q_tokens = min(b.count_tokens(b.query_text(q.query, q.instruction)), b.max_query_tokens)
        doc_cap = min(b.model_max_length - q_tokens - b.fixed_length, b.max_length)
        pair_cap = b.max_length - q_tokens - len(b.sep_ids)
        return max(1, min(doc_cap, pair_cap) - self._doc_prefix_tokens)

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return list(self.builder.tokenizer.encode(text, add_special_tokens=False).offsets)

    def cut_tokens(self, text: str, max_tokens: int, *, side: str = "right") -> tuple[str, bool]:
        """Keep `max_tokens` tokens of `text` (the first ones, or the last with side='left')."""
        offsets = self._offsets(text)
        if len(offsets) <= max_tokens:
            return text, False
        if side == "left":
            return text[offsets[len(offsets) - max_tokens][0] :], True
        return text[: offsets[max_tokens][0]], True

    def split_tokens(self, text: str, chunk_tokens: int) -> list[str]:
        """Cut `text` at token boundaries into pieces of `chunk_tokens` tokens (the last may be shorter)."""
        offsets = self._offsets(text)
        if len(offsets) <= chunk_tokens:
            return [text]
        starts = [offsets[k][0] for k in range(0, len(offsets), chunk_tokens)]
        starts[0] = 0
        bounds = [*starts, len(text)]
        return [text[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def served_names(settings: Settings) -> list[str]:
    """Every name a request's `model` may use: the served name first, then the hub id and the aliases.

    RERANK_MODEL counts only when it is what is served (no RERANK_MODEL_PATH) or was set explicitly: a
    default hub id must not be announced for a folder that holds another model.
    """
    names = [settings.public_model_name]
    if settings.model_path is None or "model" in settings.model_fields_set:
        names.append(settings.model)
    names.extend(settings.model_aliases)
    return list(dict.fromkeys(n for n in names if n))


def manifest_model_name(model_dir: Path) -> str | None:
    """The name a prepared folder's manifest gives its model: the hub id, or a local source's folder name."""
    from engines.base import ModelPreparationError
    from engines.model_store import load_manifest

    try:
        source = load_manifest(model_dir).source
    except (ModelPreparationError, OSError, ValueError):
        return None  # the engine reports a broken folder itself, with a better message
    if not isinstance(source, str) or not source.strip():
        return None
    source = source.strip()
    # A hub id is `owner/name`; anything else is a path on the exporting machine: its last part names it.
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and "\\" not in source
    return source if is_hub_id else (PurePath(source.replace("\\", "/")).name or None)


def with_served_name(settings: Settings, model_dir: Path) -> Settings:
    """Settings naming the served model: RERANK_SERVED_MODEL_NAME, else the manifest's source, else the id."""
    if settings.served_model_name:
        return settings
    name = manifest_model_name(model_dir)
    if not name or name == settings.model:
        return settings
    return settings.model_copy(update={"served_model_name": name})


def check_model_name(settings: Settings, name: str | None) -> None:
    """404 unless `name` is absent or one of the served names."""
    if name is None:
        return
    names = served_names(settings)
    if name not in names:
        raise ModelNotFound(
            f"model {clip(name)} is not served here: use {names[0]!r} or leave `model` out"
            + (f" (also accepted: {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else "")
            + "; more names can be added with RERANK_MODEL_ALIASES",
            param="model",
            code="model_not_found",
        )
