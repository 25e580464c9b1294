"""What every dialect shares at the HTTP edge: the error body, document parsing, and the common options.

Pydantic models here describe the wire format (and the OpenAPI spec); they never travel past the route.
Unknown fields are ignored (`extra="ignore"`), as vLLM does, because real clients send extras.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

from gateway.errors import InvalidRequest, clip
from gateway.service import RerankQuery

# --- errors -------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong and which field to change."""

    message: str = Field(description="What is wrong and what to change.")
    type: str = Field(description="Error class, e.g. invalid_request_error, payload_too_large.")
    param: str | None = Field(None, description="The request field at fault, e.g. `documents[2]`.")
    code: str | None = Field(None, description="A stable machine-readable code.")


class ErrorResponse(BaseModel):
    """The gateway's error body (Cohere dialects and every route outside the rerank dialects)."""

    error: ErrorDetail


class DetailErrorResponse(ErrorResponse):
    """The error body of the Jina / vLLM, Infinity and Mixedbread dialects: `error` plus `detail`."""

    # Optional in the schema only: errors raised before a route runs (401, admission) have no `detail`.
    detail: str | None = Field(
        None,
        description="The message again, at the top level: the Jina integrations of LangChain, llama-index "
        "and Haystack raise `resp['detail']`.",
    )


# --- request fields shared by the query + documents dialects -------------------------------------------


def _whole_number(value: Any) -> Any:
    """JSON Schema's `integer` includes 3.0; strict validation refuses every other float, bool and string."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# A count as the spec says it: an integer >= 1 (3 and 3.0, never true or "3"). The bound sits inside the
# annotation: outside it, pydantic cannot put `minimum` into the JSON Schema through the before-validator.
Count = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
# `top_n` / `top_k`: an integer whose bound (>= 1) the spec states and the service enforces
# (RerankLimits.check: the one place every dialect's count of results is checked, in the dialect's words).
TopN = Annotated[int, BeforeValidator(_whole_number), Field(json_schema_extra={"minimum": 1})]
# vLLM's truncate_prompt_tokens: -1 (fit the model) or a positive token count.
PromptCap = Annotated[int, Field(ge=-1), BeforeValidator(_whole_number)]
# Request models validate strictly: what the OpenAPI spec calls an integer or a boolean must be one.
STRICT_REQUEST = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

DOCUMENTS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "description": (
        "The documents to rank: strings, or objects with a `text` field (other fields are kept and "
        "returned with `return_documents`). With `rank_fields`, the named fields are ranked instead."
    ),
    "items": {
        "anyOf": [
            {"type": "string"},
            {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "additionalProperties": True,
            },
        ]
    },
}


class RerankOptions(BaseModel):
    """Fields every query + documents dialect accepts (Cohere v1/v2, Jina/vLLM), plus mxbai extras."""

    model_config = STRICT_REQUEST

    model: str | None = Field(
        None,
        description="Model name; optional. When given it must be the served name or one of its aliases.",
    )
    query: str = Field(description="The search query.")
    documents: list[Any] = Field(json_schema_extra=DOCUMENTS_SCHEMA)
    top_n: TopN | None = Field(
        None, description="Return only the `top_n` best documents (default: all of them)."
    )
    rank_fields: list[str] | None = Field(
        None,
        description=(
            "For documents given as objects: the fields to rank on, in order. One field is ranked as its "
            "value; several are joined as `field: value` lines. Default: the `text` field."
        ),
    )
    max_tokens_per_doc: Count | None = Field(
        None, description="Cut each document to this many tokens before scoring."
    )
    max_chunks_per_doc: Count | None = Field(
        None,
        description=(
            "Split long documents into chunks of the server's chunk size (RERANK_CHUNK_TOKENS tokens), "
            "score at most this many chunks per document, and give each document its best chunk's score. "
            "Without it, a document is scored whole (cut at the model's length limit). A maximum, as "
            "Cohere documents it: values over RERANK_MAX_CHUNKS_PER_DOC_LIMIT are capped to it, and only "
            "documents x chunks >= 10,000 is refused (400 `too_many_chunks`)."
        ),
    )
    truncate_prompt_tokens: PromptCap | None = Field(
        None,
        description=(
            "vLLM: -1 or absent, documents are cut to fit the model; a positive k cuts each prompt to at "
            "most k tokens by removing document tokens (the template is never cut)."
        ),
    )
    max_tokens_per_query: Count | None = Field(
        None, description="vLLM: cut the query to this many tokens before scoring."
    )
    instruction: str | None = Field(
        None, description="mxbai extra: an instruction put before the query in every prompt."
    )
    raw_scores: bool = Field(
        False,
        validation_alias=AliasChoices("raw_scores", "return_raw_scores"),
        description=(
            "mxbai extra: return the model's raw score (logit difference, unbounded) as `relevance_score` "
            "instead of the normalized 0..1 score. `return_raw_scores` is accepted too."
        ),
    )


# --- documents: strings or objects -> texts to rank ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedDocuments:
    """The texts to rank and, per document, what `return_documents` echoes back."""

    texts: tuple[str, ...]
    echoes: tuple[dict[str, Any], ...]


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_documents(
    documents: Sequence[Any], rank_fields: Sequence[str] | None, *, param: str = "documents"
) -> ParsedDocuments:
    """Texts to rank from strings or objects; every bad item is a 400 naming `documents[i]`.

    An empty list parses to no texts: the service refuses it (RerankLimits.check), for every dialect.
    """
    if rank_fields is not None and not rank_fields:
        raise InvalidRequest(
            "`rank_fields` is empty: name at least one field, or leave it out to rank the `text` field",
            param="rank_fields",
        )
    texts: list[str] = []
    echoes: list[dict[str, Any]] = []
    for i, item in enumerate(documents):
        where = f"{param}[{i}]"
        if isinstance(item, str):
            texts.append(item)
            echoes.append({"text": item})
            continue
        if not isinstance(item, dict):
            raise InvalidRequest(
                f"`{where}` must be a string or an object with a `text` field, got {_json_type(item)}",
                param=where,
                code="invalid_type",
            )
        if rank_fields:
            present = [f for f in rank_fields if item.get(f) is not None]
            if not present:
                raise InvalidRequest(
                    f"`{where}` has none of the rank_fields {clip(list(rank_fields))}: add one of them to "
                    "the document or change `rank_fields`",
                    param=where,
                    code="missing_rank_field",
                )
            if len(present) == 1:
                texts.append(_field_text(item[present[0]]))
            else:
                texts.append("\n".join(f"{f}: {_field_text(item[f])}" for f in present))
        else:
            text = item.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"`{where}` is an object without a string `text` field: add `text`, or name the fields "
                    "to rank in `rank_fields`",
                    param=where,
                    code="missing_text",
                )
            texts.append(text)
        echoes.append(item)
    return ParsedDocuments(tuple(texts), tuple(echoes))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    return _json_type(value)


# --- response pieces shared by Cohere and Jina ----------------------------------------------------------

# The ranked document as sent: `{"text": ...}` for a string, the object itself (all its fields) otherwise.
ResultDocument = dict[str, Any]


def options_to_query(req: RerankOptions) -> tuple[RerankQuery, ParsedDocuments]:
    """The dialect-free query of a Cohere or Jina request, and the documents to echo."""
    docs = parse_documents(req.documents, req.rank_fields)
    return (
        RerankQuery(
            query=req.query,
            documents=docs.texts,
            instruction=req.instruction,
            top_n=req.top_n,
            max_tokens_per_doc=req.max_tokens_per_doc,
            max_chunks_per_doc=req.max_chunks_per_doc,
            raw_scores=req.raw_scores,
            max_prompt_tokens=positive(req.truncate_prompt_tokens),
            max_query_tokens=req.max_tokens_per_query,
        ),
        docs,
    )


def positive(value: int | None) -> int | None:
    """vLLM's `truncate_prompt_tokens`: a positive cap, or None for -1 / absent (fit the model)."""
    return value if value is not None and value > 0 else None
