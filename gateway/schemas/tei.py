"""The Hugging Face text-embeddings-inference dialect: `{"query", "texts"}` on `/rerank`.

Shapes follow TEI's router (`RerankRequest`: query, texts, truncate, truncation_direction, raw_scores,
return_text; response: a bare list of `Rank{index, score, text?}`). TEI applies a sigmoid unless
`raw_scores`; here the non-raw score is the mxbai normalized score.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel, field_validator

from gateway.schemas.common import STRICT_REQUEST, ParsedDocuments, TopN, parse_documents
from gateway.service import RerankOutcome, RerankQuery


class TeiRequest(BaseModel):
    """TEI rerank request (plus the mxbai extras `instruction`, `model`, `top_n`)."""

    model_config = STRICT_REQUEST

    query: str = Field(description="The search query.")
    texts: list[str] = Field(description="The texts to rank.", json_schema_extra={"minItems": 1})
    raw_scores: bool = Field(False, description="Return the raw score instead of the normalized 0..1 one.")
    return_text: bool = Field(False, description="Echo each text in the result.")
    truncate: bool | None = Field(
        False,
        description=(
            "Texts are always cut to fit the model (from the end, as the official mxbai wrapper does). "
            "With `truncate: true`, they are cut from the side `truncation_direction` names instead."
        ),
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] = Field(
        "right", description="Which end of a text `truncate: true` removes: right keeps the beginning."
    )
    model: str | None = Field(None, description="Optional; when given, the served name or an alias.")
    top_n: TopN | None = Field(None, description="mxbai extra: keep only the best `top_n` texts.")
    instruction: str | None = Field(None, description="mxbai extra: instruction put before the query.")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _direction_either_case(cls, v: object) -> object:
        # TEI (serde) spells them Left / Right; lower case is accepted too, nothing else (as the spec says).
        return {"Left": "left", "Right": "right"}.get(v, v) if isinstance(v, str) else v


class TeiRank(BaseModel):
    """One ranked text."""

    index: int = Field(description="Position of the text in the request's `texts`.")
    text: str | None = Field(None, description="The text, with `return_text`.")
    score: float = Field(description="Normalized score in 0..1, or the raw score with `raw_scores`.")


class TeiResponse(RootModel[list[TeiRank]]):
    """TEI rerank response: ranked texts, best first."""


def to_query(req: TeiRequest) -> tuple[RerankQuery, ParsedDocuments]:
    """The dialect-free query (texts are `documents` here), and the texts to echo."""
    docs = parse_documents(req.texts, None, param="texts")
    return (
        RerankQuery(
            query=req.query,
            documents=docs.texts,
            instruction=req.instruction,
            top_n=req.top_n,
            fit_side=req.truncation_direction if req.truncate else None,  # type: ignore[arg-type]
            raw_scores=req.raw_scores,
            documents_param="texts",
        ),
        docs,
    )


def render(req: TeiRequest, outcome: RerankOutcome, docs: ParsedDocuments) -> list[dict[str, Any]]:
    """The TEI response body: a bare list of ranks."""
    ranks = [
        TeiRank(index=r.index, text=docs.texts[r.index], score=r.score)
        if req.return_text
        else TeiRank(index=r.index, score=r.score)
        for r in outcome.ranked
    ]
    return TeiResponse(ranks).model_dump(mode="json", exclude_unset=True)


TeiErrorType = Literal["Validation", "Tokenizer", "Overloaded", "Backend", "Unhealthy", "Empty"]


class TeiErrorResponse(BaseModel):
    """TEI's error body (text-embeddings-inference `ErrorResponse`), which Haystack's TEI ranker reads."""

    error: str = Field(description="What is wrong and what to change.")
    error_type: TeiErrorType = Field(description="TEI's error class.")


def error_type_of(status_code: int, code: str | None) -> TeiErrorType:
    """TEI's class of a gateway error: TEI's own table, by status (empty inputs are `Empty`)."""
    if code == "empty_documents":
        return "Empty"
    if status_code == 429:
        return "Overloaded"
    if status_code == 503:
        return "Unhealthy"
    if status_code >= 500:
        return "Backend"
    return "Validation"
