"""The mxbai-rerank-v2 scoring contract, written once (see SCORING.md / mxbai-rerank 0.1.6).

Prompts are built from token ids, piece by piece, never from one joined string: the Qwen2 pre-tokenizer
merges punctuation with a following newline, so tokenizing the joined text gives other ids.
Every engine scores the prompts built here, so every engine is compared on identical inputs.
Token ids in, token ids out: a document is tokenized once (`encode_documents`); caps, chunks and side-aware
fits cut its ids (`DocumentIds`), and `prompt` applies the truncation rules, which live only here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# Bumped whenever the prompt or the score definition changes; exported models record it in their manifest.
CONTRACT_VERSION = "mxbai-rerank-v2/1"

SEP = "\n"
INSTRUCTION_PROMPT = "instruction: {instruction}"
QUERY_PROMPT = "query: {query}"
DOC_PROMPT = "document: {document}"
TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. "
    "For each query-document pair, carefully analyze the semantic relationship between them, then "
    "provide your binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
YES_TOKEN = "1"  # noqa: S105 (a vocabulary token, not a secret)
NO_TOKEN = "0"  # noqa: S105

DEFAULT_MAX_LENGTH = 8192
ESTIMATED_MAX = {
    "mixedbread-ai/mxbai-rerank-base-v2": 9.0,
    "mixedbread-ai/mxbai-rerank-large-v2": 12.0,
}
# The wrapper's fallback for a model id it does not know.
DEFAULT_ESTIMATED_MAX = 12.0


# The published models' shapes (config.json: hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size), so a copied folder is recognised by what it holds, not its name.
KNOWN_SHAPES = {
    (896, 24, 14, 2, 4864): "mixedbread-ai/mxbai-rerank-base-v2",
    (1536, 28, 12, 2, 8960): "mixedbread-ai/mxbai-rerank-large-v2",
}


def model_shape(config: dict) -> tuple[int, ...] | None:
    """The (hidden, layers, heads, kv heads, ffn) tuple of a Qwen2 config.json, or None if incomplete."""
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )
    try:
        return tuple(int(config[k]) for k in keys)
    except (KeyError, TypeError, ValueError):
        return None


def resolve_estimated_max(
    *, config: dict, hub_id: str | None = None, override: float | None = None
) -> tuple[float, str]:
    """The normalization constant and where it came from: an explicit value, the hub id, or the model shape.

    A model of neither published shape, with no explicit value, is an error: a wrong constant silently moves
    every normalized score, so it is never guessed (the wrapper's 12.0 default included).
    """
    if override is not None:
        if not math.isfinite(override) or override <= 0:
            raise ValueError(f"estimated_max must be a positive number, not {override}")
        return float(override), "explicit"
    if hub_id in ESTIMATED_MAX:
        return ESTIMATED_MAX[hub_id], f"hub id {hub_id}"
    shape = model_shape(config)
    if shape in KNOWN_SHAPES:
        name = KNOWN_SHAPES[shape]
        return ESTIMATED_MAX[name], f"config shape of {name}"
    described = "x".join(map(str, shape)) if shape else "incomplete"
    raise ValueError(
        f"cannot tell the normalization constant (estimated_max) of this model: its shape "
        f"(hidden x layers x heads x kv heads x ffn = {described}) is neither mxbai-rerank-base-v2's nor "
        f"large-v2's; pass `--estimated-max` to export (9.0 for base-v2 fine-tunes, 12.0 for large-v2) or "
        f"set RERANK_ESTIMATED_MAX"
    )


def estimated_max_for(model_id: str | None) -> float:
    """The constant the official wrapper uses for a hub id (its 12.0 default for any other id).

    The gateway itself uses `resolve_estimated_max`, which never falls back to a default.
    """
    return ESTIMATED_MAX.get(model_id or "", DEFAULT_ESTIMATED_MAX)


def normalize_score(raw: float, estimated_max: float) -> float:
    """sigmoid(raw - estimated_max / 2), the wrapper's `normalize=True` score in 0..1."""
    x = raw - estimated_max / 2
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One scored (query, document) pair: its texts and the exact ids every engine receives."""

    query: str
    document: str
    instruction: str | None
    input_ids: tuple[int, ...]
    # True when the official truncation cut the query or the document.
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class QueryIds:
    """A query part's ids (instruction included), already cut to the contract's query budget."""

    query: str
    instruction: str | None
    ids: tuple[int, ...]
    truncated: bool  # True when the query budget cut it
    head: int = 0  # leading ids of the template (`instruction: ...`, `query:`), before the query's own

    def first(self, n: int) -> QueryIds:
        """The template's ids and the first `n` ids of the query's text (a caller's own query cap)."""
        stop = self.head + n
        if len(self.ids) <= stop:
            return self
        return QueryIds(self.query, self.instruction, self.ids[:stop], True, self.head)


@dataclass(frozen=True, slots=True)
class TextPositions:
    """Where each body id starts in its text: the tokenizer's offsets of one encoding, read only for a cut."""

    encoding: Any  # tokenizers.Encoding of the whole `document: {text}` string
    first: int  # index in the encoding of body id 0
    shift: int  # characters of the encoded string before the text (the template, then the cut's start)

    def __call__(self, i: int) -> int:
        return max(0, self.encoding.token_to_chars(self.first + i)[0] - self.shift)


@dataclass(frozen=True, slots=True)
class DocumentIds:
    """A document as the contract tokenizes it (`document: {text}`, one piece): the template's `head` ids,
    then the text's own ids (`body`).

    Caps and chunks cut `body`, never the text: a cut is a slice of ids, and its `text` is the document sliced
    at the kept ids' start characters (the tokenizer's offsets, once; it names what was kept, and the
    reference engine reads it), never tokenized again.
    """

    text: str
    head: tuple[int, ...]
    body: tuple[int, ...]
    positions: TextPositions = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.body)

    def cut(self, start: int, stop: int | None = None) -> DocumentIds:
        """Body ids [start, stop), with the stretch of text they came from."""
        n = len(self.body)
        start, stop, _ = slice(start, stop).indices(n)
        if start == 0 and stop == n:
            return self
        pos = self.positions
        a = 0 if start == 0 else pos(start)
        b = len(self.text) if stop >= n else pos(stop)
        moved = TextPositions(pos.encoding, pos.first + start, pos.shift + a)
        return DocumentIds(self.text[a:b], self.head, self.body[start:stop], moved)

    def first(self, n: int) -> DocumentIds:
        """The first `n` body ids."""
        return self.cut(0, n)

    def last(self, n: int) -> DocumentIds:
        """The last `n` body ids."""
        return self.cut(max(0, len(self.body) - n))

    def chunks(self, size: int) -> list[DocumentIds]:
        """Consecutive pieces of `size` body ids (the last may be shorter); one piece when it fits."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        if len(self.body) <= size:
            return [self]
        return [self.cut(k, k + size) for k in range(0, len(self.body), size)]


class PromptBuilder:
    """Builds mxbai-v2 prompts from token ids with the official truncation rules."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        model_max_length: int,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        # Truncation and padding are the contract's business, not the tokenizer file's.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.model_max_length = model_max_length
        self.prefix_ids = self._ids(PREFIX)
        self.suffix_ids = self._ids(SUFFIX)
        self.task_ids = self._ids(TASK_PROMPT)
        self.sep_ids = self._ids(SEP)
        yes, no = self._ids(YES_TOKEN), self._ids(NO_TOKEN)
        self.yes_id, self.no_id = yes[0], no[0]
        self.fixed_length = (
            len(self.prefix_ids) + len(self.task_ids) + len(self.suffix_ids) + len(self.sep_ids)
        )
        if max_length + self.fixed_length > model_max_length:
            max_length = model_max_length - self.fixed_length
        if max_length <= 0:
            raise ValueError(
                f"model_max_length={model_max_length} leaves no room for text after the "
                f"{self.fixed_length}-token template"
            )
        self.max_length = max_length
        self.max_query_tokens = max_length * 3 // 4

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH) -> PromptBuilder:
        """Load `tokenizer.json` and `config.json` (max_position_embeddings) from a model folder."""
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        cfg_file = model_dir / "config.json"
        for f in (tok_file, cfg_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is missing: a model folder needs tokenizer.json and config.json"
                )
        config = json.loads(cfg_file.read_text())
        return cls(
            Tokenizer.from_file(str(tok_file)),
            model_max_length=int(config["max_position_embeddings"]),
            max_length=max_length,
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count_tokens(self, text: str) -> int:
        """Token count of a bare text (no template), for budgets and limits."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def query_text(self, query: str, instruction: str | None = None) -> str:
        text = QUERY_PROMPT.format(query=query)
        if instruction:
            text = INSTRUCTION_PROMPT.format(instruction=instruction) + SEP + text
        return text

    def encode_query(self, query: str, instruction: str | None = None) -> QueryIds:
        """The query part's ids, cut to max_length * 3 // 4 (the wrapper's query truncation)."""
        text = self.query_text(query, instruction)
        enc = self._tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        head_chars = len(text) - len(query) - 1  # where `query:` ends
        head = 0
        while head < len(ids) and offsets[head][1] <= head_chars:
            head += 1
        cap = self.max_query_tokens
        return QueryIds(query, instruction or None, tuple(ids[:cap]), len(ids) > cap, min(head, cap))

    def encode_documents(self, documents: Sequence[str]) -> list[DocumentIds]:
        """Each document tokenized as the prompt holds it (`document: {text}`), split into head and body."""
        head_chars = len(DOC_PROMPT.format(document="").rstrip())
        text_start = len(DOC_PROMPT.format(document=""))
        encodings = self._tok.encode_batch(
            [DOC_PROMPT.format(document=d) for d in documents], add_special_tokens=False
        )
        out = []
        for text, enc in zip(documents, encodings, strict=True):
            ids = enc.ids
            # Offsets are read per id (token_to_chars): the whole list would cost more than the ids.
            k = 0
            while k < len(ids) and enc.token_to_chars(k)[1] <= head_chars:
                k += 1
            out.append(DocumentIds(text, tuple(ids[:k]), tuple(ids[k:]), TextPositions(enc, k, text_start)))
        return out

    def _caps(self, query: QueryIds) -> tuple[int, int]:
        """(document cap, pair cap): the wrapper's document truncation, then its pair truncation
        (prepare_for_model(truncation="only_second") cuts separator + document to fit max_length)."""
        doc_cap = min(self.model_max_length - len(query.ids) - self.fixed_length, self.max_length)
        return doc_cap, self.max_length - len(query.ids)

    def fit(
        self,
        query: QueryIds,
        document: DocumentIds,
        side: str = "right",
        *,
        max_prompt_tokens: int | None = None,
    ) -> DocumentIds:
        """The document cut, from `side`, to the body ids that fit next to `query` with nothing truncated,
        and with the whole prompt (template included) within `max_prompt_tokens` (at least one id is kept)."""
        doc_cap, pair_cap = self._caps(query)
        room = min(doc_cap, pair_cap - len(self.sep_ids))
        if max_prompt_tokens is not None:
            # A prompt: the template (fixed_length counts one separator), query, separator, document.
            room = min(room, max_prompt_tokens - self.fixed_length - len(query.ids) - len(self.sep_ids))
        room = max(1, room - len(document.head))
        if len(document) <= room:
            return document
        return document.last(room) if side == "left" else document.first(room)

    def prompt(self, query: QueryIds, document: DocumentIds) -> Prompt:
        """One prompt from ids, with the official truncation rules (SCORING.md)."""
        q_ids = list(query.ids)
        d_ids = [*document.head, *document.body]
        doc_cap, pair_cap = self._caps(query)
        truncated = query.truncated or len(d_ids) > doc_cap
        d_ids = d_ids[:doc_cap]
        body = q_ids + (self.sep_ids + d_ids)[:pair_cap]
        truncated = truncated or len(self.sep_ids) + len(d_ids) > pair_cap
        ids = self.prefix_ids + body + self.sep_ids + self.task_ids + self.suffix_ids
        return Prompt(query.query, document.text, query.instruction, tuple(ids), truncated)

    def build(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[Prompt]:
        """Prompts for one query against many documents; the query is tokenized once."""
        q = self.encode_query(query, instruction)
        return [self.prompt(q, d) for d in self.encode_documents(documents)]

    def build_pairs(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[Prompt]:
        """Prompts for arbitrary (query, document) pairs, in input order."""
        return [self.build(q, [d], instruction)[0] for q, d in pairs]
