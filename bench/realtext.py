"""The real-text case set (tests/data/realtext_cases.json): queries and documents of prose, code and several
languages, for measuring how faithfully an engine ranks on trained weights.

`load_cases()` reads it; `build_prompts(builder, cases, max_tokens=...)` turns it into contract prompts
grouped by query, keeping only prompts up to `max_tokens` and only queries left with two documents or more.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CASES_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "realtext_cases.json"


@dataclass(frozen=True, slots=True)
class Case:
    """One query and the documents it ranks."""

    id: str
    kind: str
    language: str
    query: str
    documents: tuple[str, ...]
    instruction: str | None = None


def load_cases(path: Path = CASES_FILE) -> list[Case]:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        Case(
            id=c["id"],
            kind=c["kind"],
            language=c["language"],
            query=c["query"],
            documents=tuple(c["documents"]),
            instruction=c.get("instruction"),
        )
        for c in raw["cases"]
    ]


def build_prompts(
    builder, cases: Sequence[Case], *, max_tokens: int | None = None, docs_per_case: int | None = None
):
    """(case, prompts) per query: prompts of up to `max_tokens` tokens, at most `docs_per_case` a query."""
    out = []
    for case in cases:
        prompts = builder.build(case.query, list(case.documents), case.instruction)
        if max_tokens is not None:
            prompts = [p for p in prompts if len(p) <= max_tokens]
        if docs_per_case is not None:
            prompts = prompts[:docs_per_case]
        if len(prompts) >= 2:
            out.append((case, prompts))
    return out
