"""The tricky case set every engine and the contract are checked on, as plain data (stdlib only).

Used by the contract, export and engine tests here and by the vLLM tier in the other environment, so it
imports nothing beyond the standard library. Token counts come from a `count_tokens(text) -> int`
callable (e.g. `PromptBuilder.count_tokens`), never from a tokenizer imported here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# The template's fixed part with the Qwen2 tokenizer (prefix + task + suffix + "\n"); see SCORING.md.
FIXED_TEMPLATE_TOKENS = 79

QUERIES = [
    "What is the capital of France?",
    "how do I reverse a list in python?",
    "  leading and trailing spaces  ",
    "query ending with a newline\n",
    "Wer hat das Telefon erfunden?",
    "東京タワーの高さは?",
    "北京的人口是多少？",
    "🔥 best pizza near me 🍕?",
    "SELECT * FROM users WHERE id = 1;",
    "x",
    "¿Dónde está la biblioteca?",
    "Что такое машинное обучение?",
]

DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "The capital of France is Paris.\n",
    "Document ending with spaces.   ",
    "Document ending with newlines.\n\n\n",
    "Tabs\tand\ttrailing tab\t",
    "",
    " ",
    "\n\n",
    "東京タワーは高さ333メートルの電波塔です。",
    "北京是中华人民共和国的首都，人口超过两千万。",
    "Pizza 🍕 and fire 🔥 emojis 👩‍👩‍👧‍👦 with a family ZWJ sequence.",
    "def reverse(xs):\n    return xs[::-1]\n",
    "```python\nprint('hello')\n```",
    "Alexander Graham Bell wird die Erfindung des Telefons zugeschrieben.",
    "La biblioteca está al lado de la plaza.",
    "Машинное обучение — это раздел искусственного интеллекта.",
    "Ends with a question?",
    "Ends with an exclamation!",
    "<|im_start|> looks like a special token <|im_end|>",
    "Numbers 0 1 0 1 and the word yes.",
]

INSTRUCTIONS = [
    None,
    "",
    "Find passages that answer the question.",
    "Retrieve code snippets relevant to the query.\n",
    "只返回中文文档。",
]


@dataclass(frozen=True)
class Case:
    """One query against several documents, with an optional instruction."""

    name: str
    query: str
    documents: tuple[str, ...]
    instruction: str | None = None


def short_cases() -> list[Case]:
    """Every query against every document, with each instruction applied to a few of them."""
    cases = [Case(f"q{i}", q, tuple(DOCUMENTS)) for i, q in enumerate(QUERIES)]
    for j, instruction in enumerate(INSTRUCTIONS):
        if instruction is None:
            continue
        cases.append(Case(f"instr{j}", QUERIES[j % len(QUERIES)], tuple(DOCUMENTS[:8]), instruction))
    return cases


# A small multilingual vocabulary, so that long texts have mixed token lengths, like real documents.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from search relevance document query model "
    "retrieval ranking passage answer question capital city river mountain history science computer "
    "Paris Berlin Tokyo 東京 北京 数据 検索 données recherche Suche Daten ciudad поиск данные 🔍 "
    "def return class import lambda {} [] () == != <= 0 1 2 3 42 3.14 ? . , ; : ! -"
)
_WORDS = tuple(_WORD_TEXT.split())


def long_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-text of `n_words` words with punctuation and occasional newlines."""
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(_WORDS))
        if i % 17 == 16:
            out.append(".\n" if i % 3 else ".")
    return " ".join(out)


def text_of_tokens(count_tokens: Callable[[str], int], n_tokens: int, seed: int = 0) -> str:
    """A text of about `n_tokens` tokens (within max(2, n/500)) under the given tokenizer."""
    if n_tokens <= 0:
        return ""
    tolerance = max(2, n_tokens // 500)
    sample = long_text(400, seed)
    tokens_per_word = count_tokens(sample) / 400
    words = max(1, round(n_tokens / tokens_per_word))
    text = long_text(words, seed)
    # Token count grows about proportionally with word count; a few corrections converge.
    for _ in range(6):
        n = count_tokens(text)
        if abs(n - n_tokens) <= tolerance:
            break
        words = max(1, words + round((n_tokens - n) / tokens_per_word) or (1 if n < n_tokens else -1))
        text = long_text(words, seed)
    return text


def pair_of_prompt_tokens(
    count_tokens: Callable[[str], int], n_prompt_tokens: int, *, query_tokens: int = 12, seed: int = 0
) -> tuple[str, str]:
    """A (query, document) whose full prompt (template included) is about `n_prompt_tokens` tokens."""
    # "query: " and "document: " add two tokens each; the template adds FIXED_TEMPLATE_TOKENS.
    doc_tokens = n_prompt_tokens - FIXED_TEMPLATE_TOKENS - query_tokens - 4
    if doc_tokens < 1:
        raise ValueError(f"a prompt of {n_prompt_tokens} tokens leaves no room for a document")
    query = text_of_tokens(count_tokens, query_tokens, seed=seed + 1000).replace("\n", " ") + "?"
    return query, text_of_tokens(count_tokens, doc_tokens, seed=seed)


@dataclass(frozen=True)
class TruncationSetting:
    """A (max_length, max_position_embeddings) pair and the truncation branches it is meant to hit."""

    max_length: int
    max_position_embeddings: int
    branches: tuple[str, ...]


# Branches of core/contract.py: "query" (cut at max_length*3//4), "doc_cap_max_length" (document cut at
# max_length), "doc_cap_model" (document cut at model_max_length - query - fixed), "pair" (query + "\n" +
# document cut to max_length), "clamped" (max_length lowered to model_max_length - fixed).
TRUNCATION_SETTINGS = (
    TruncationSetting(8192, 32768, ("query", "doc_cap_max_length", "pair")),
    TruncationSetting(64, 32768, ("query", "doc_cap_max_length", "pair")),
    TruncationSetting(100, 200, ("query", "doc_cap_max_length", "doc_cap_model", "pair")),
    TruncationSetting(400, 256, ("clamped", "query", "doc_cap_model", "pair")),
)


def effective_max_length(
    max_length: int, max_position_embeddings: int, fixed: int = FIXED_TEMPLATE_TOKENS
) -> int:
    """max_length after the contract's clamp by model_max_length."""
    return min(max_length, max_position_embeddings - fixed)


def truncation_cases(
    count_tokens: Callable[[str], int],
    max_length: int,
    max_position_embeddings: int,
    fixed: int = FIXED_TEMPLATE_TOKENS,
) -> Iterator[Case]:
    """Queries and documents sized around every truncation boundary of this setting."""
    ml = effective_max_length(max_length, max_position_embeddings, fixed)
    q_cap = ml * 3 // 4
    # Query lengths around its cap, and short ones that leave the document room to hit each cap.
    query_sizes = sorted({1, 5, max(1, ml // 4), max(1, q_cap - 3), q_cap + 1, q_cap + 40, ml + 50})
    doc_sizes = sorted({1, max(1, ml // 2), max(1, ml - 6), ml - 2, ml, ml + 3, ml + 60, 2 * ml + 7})
    for qi, qn in enumerate(query_sizes):
        query = text_of_tokens(count_tokens, qn, seed=100 + qi).replace("\n", " ")
        if qi % 2:
            query += "?"
        docs = []
        for di, dn in enumerate(doc_sizes):
            doc = text_of_tokens(count_tokens, dn, seed=200 + di)
            docs.append(doc + (".", "\n", "  ", "?")[di % 4])
        docs.append("")
        instruction = "Judge relevance strictly." if qi % 3 == 2 else None
        yield Case(
            f"trunc-ml{max_length}-mpe{max_position_embeddings}-q{qn}", query, tuple(docs), instruction
        )
