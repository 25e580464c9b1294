"""The mxbai-rerank-v2 scoring contract, written once (see SCORING.md / mxbai-rerank 0.1.6).

Prompts are built from token ids, piece by piece, never from one joined string: the Qwen2 pre-tokenizer
merges punctuation with a following newline, so tokenizing the joined text gives other ids.
Every engine scores the prompts built here, so every engine is compared on identical inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

    def _ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def count_tokens(self, text: str) -> int:
        """Token count of a bare text (no template), for budgets and limits."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def query_text(self, query: str, instruction: str | None = None) -> str:
        text = QUERY_PROMPT.format(query=query)
        if instruction:
            text = INSTRUCTION_PROMPT.format(instruction=instruction) + SEP + text
        return text

    def build(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[Prompt]:
        """Prompts for one query against many documents; the query is tokenized once."""
        q_ids = self._ids(self.query_text(query, instruction))
        q_truncated = len(q_ids) > self.max_query_tokens
        q_ids = q_ids[: self.max_query_tokens]
        doc_cap = min(self.model_max_length - len(q_ids) - self.fixed_length, self.max_length)
        # prepare_for_model(truncation="only_second") cuts sep + document to fit max_length.
        pair_cap = self.max_length - len(q_ids)
        out = []
        doc_id_lists = self._ids_batch([DOC_PROMPT.format(document=d) for d in documents])
        for document, d_ids in zip(documents, doc_id_lists, strict=True):
            truncated = q_truncated or len(d_ids) > doc_cap
            d_ids = d_ids[:doc_cap]
            body = q_ids + (self.sep_ids + d_ids)[:pair_cap]
            truncated = truncated or len(self.sep_ids) + len(d_ids) > pair_cap
            ids = self.prefix_ids + body + self.sep_ids + self.task_ids + self.suffix_ids
            out.append(Prompt(query, document, instruction or None, tuple(ids), truncated))
        return out

    def build_pairs(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[Prompt]:
        """Prompts for arbitrary (query, document) pairs, in input order."""
        return [self.build(q, [d], instruction)[0] for q, d in pairs]
