"""vLLM's score API: `POST /score` and `/v1/score` with `text_1` (the query) and `text_2` (the documents).

Shapes follow vLLM's `ScoreRequest` (`model`, `text_1`, `text_2`, `truncate_prompt_tokens`, `use_activation`)
and `ScoreResponse` (`{id, object: "list", created, model, data[{index, object: "score", score}], usage}`),
scores in input order. `text_1` is one query (a string or a list of one, or a list that repeats one
query for each `text_2`): the mxbai prompt ranks documents against one query. `use_activation: false`
returns raw scores, as vLLM does.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from gateway.errors import InvalidRequest
from gateway.schemas.common import STRICT_REQUEST, ParsedDocuments, PromptCap, parse_documents, positive
from gateway.service import RerankOutcome, RerankQuery


class ScoreRequest(BaseModel):
    """vLLM score request."""

    model_config = STRICT_REQUEST

    model: str | None = Field(None, description="Optional; when given, the served name or an alias.")
    text_1: str | list[str] = Field(description="The query (or one query per `text_2` item, all equal).")
    text_2: str | list[str] = Field(description="The documents to score.")
    truncate_prompt_tokens: PromptCap | None = Field(
        None,
        description=(
            "-1 or absent: documents are cut to fit the model (the contract's own cut). A positive k cuts "
            "each prompt to at most k tokens by removing document tokens (the template is never cut)."
        ),
    )
    use_activation: bool | None = Field(None, description="false: the raw score (logit difference).")


class ScoreData(BaseModel):
    index: int = Field(description="Position of the pair (the `text_2` item).")
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    """vLLM score response: one score per `text_2` item, in input order."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


def to_query(req: ScoreRequest) -> tuple[RerankQuery, ParsedDocuments]:
    documents = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    queries = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    if len(queries) != 1 and (len(queries) != len(documents) or len(set(queries)) != 1):
        raise InvalidRequest(
            "`text_1` must be one query (a string, a list of one, or one query repeated for each `text_2` "
            f"item); got {len(queries)} queries for {len(documents)} texts: send one request per query",
            param="text_1",
            code="several_queries",
        )
    docs = parse_documents(documents, None, param="text_2")
    return (
        RerankQuery(
            query=queries[0] if queries else "",
            documents=docs.texts,
            max_prompt_tokens=positive(req.truncate_prompt_tokens),
            raw_scores=req.use_activation is False,
            documents_param="text_2",
        ),
        docs,
    )


def render(req: ScoreRequest, outcome: RerankOutcome, *, request_id: str, model: str) -> dict:
    by_index = sorted(outcome.ranked, key=lambda r: r.index)
    body = ScoreResponse(
        id=f"score-{request_id}",
        created=int(time.time()),
        model=model,
        data=[ScoreData(index=r.index, score=r.score) for r in by_index],
        usage=ScoreUsage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
    )
    return body.model_dump(mode="json")
