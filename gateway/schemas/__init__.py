"""Request and response models per client dialect, and the rule that picks a request's dialect.

The rule (also in the OpenAPI descriptions), first match wins:
1. an `X-Rerank-Dialect` header (`cohere-v1`, `cohere-v2`, `jina`, `tei`) names it outright;
2. a body with `texts` is TEI, on any route;
3. `/v2/rerank` is Cohere v2;
4. `/rerank` is Jina / vLLM;
5. `/v1/rerank` is Cohere v1 when the client shows it is a Cohere client (the Cohere SDKs send
   `X-Fern-SDK-Name: cohere` and a `cohere/...` User-Agent) or sends a Cohere-only field (`rank_fields`,
   `max_chunks_per_doc`); otherwise Jina / vLLM, whose response (`id`, `results[{index,
   relevance_score}]`, plus `model` and `usage`) Cohere-style parsers read as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequest, clip
from gateway.schemas.cohere import CohereV1Request, CohereV2Request
from gateway.schemas.jina import JinaRequest
from gateway.schemas.tei import TeiRequest

Dialect = Literal["cohere-v1", "cohere-v2", "jina", "tei"]
DIALECTS: tuple[Dialect, ...] = ("cohere-v1", "cohere-v2", "jina", "tei")
DIALECT_HEADER = "x-rerank-dialect"
COHERE_ONLY_FIELDS = ("rank_fields", "max_chunks_per_doc")

REQUEST_MODELS: dict[Dialect, type[BaseModel]] = {
    "cohere-v1": CohereV1Request,
    "cohere-v2": CohereV2Request,
    "jina": JinaRequest,
    "tei": TeiRequest,
}

DIALECT_RULE = (
    "Which dialect answers, first match wins: (1) an `X-Rerank-Dialect` header (`cohere-v1`, `cohere-v2`, "
    "`jina`, `tei`); (2) a body with `texts` is TEI, on any route; (3) `/v2/rerank` is Cohere v2; "
    "(4) `/rerank` is Jina/vLLM; (5) `/v1/rerank` is Cohere v1 for Cohere clients (the Cohere SDKs' "
    "`X-Fern-SDK-Name: cohere` or `cohere/...` User-Agent) or bodies with `rank_fields` or "
    "`max_chunks_per_doc`, and Jina/vLLM otherwise."
)


def route_dialect(path: str) -> Dialect:
    """The dialect a route implies before the body is read (for metrics on bodies that fail to parse)."""
    if path.startswith("/v2/"):
        return "cohere-v2"
    if path == "/v1/rerank":
        return "cohere-v1"
    return "jina"


def _is_cohere_client(headers: Mapping[str, str]) -> bool:
    sdk = headers.get("x-fern-sdk-name", "").lower()
    agent = headers.get("user-agent", "").lower()
    return "cohere" in sdk or agent.startswith("cohere")


def detect_dialect(path: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Dialect:
    """Apply the dialect rule above to one request."""
    explicit = headers.get(DIALECT_HEADER)
    if explicit is not None:
        name = explicit.strip().lower()
        if name not in DIALECTS:
            raise InvalidRequest(
                f"unknown dialect {clip(explicit)} in the X-Rerank-Dialect header: use one of "
                + ", ".join(DIALECTS),
                param=DIALECT_HEADER,
                code="unknown_dialect",
            )
        return name  # type: ignore[return-value]
    if "texts" in payload:
        return "tei"
    if path.startswith("/v2/"):
        return "cohere-v2"
    if path == "/v1/rerank" and (
        _is_cohere_client(headers) or any(payload.get(f) is not None for f in COHERE_ONLY_FIELDS)
    ):
        return "cohere-v1"
    return "jina"


def param_of(loc: tuple[Any, ...]) -> str:
    """`('documents', 2, 'text')` -> `documents[2].text`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "float_type": "a number",
    "float_parsing": "a number",
}


def invalid_request_from(exc: ValidationError) -> InvalidRequest:
    """The first validation error as one 400 that names the field and says what to send instead."""
    return invalid_request_from_errors(exc.errors(include_url=False))


def invalid_request_from_errors(
    errors: Sequence[Mapping[str, Any]], *, fastapi_locations: bool = False
) -> InvalidRequest:
    """Pydantic error dicts -> one 400 naming the first field at fault.

    FastAPI's own errors start their `loc` with where the value was (body, query, header, path).
    """
    if not errors:
        return InvalidRequest("the request is invalid", code="invalid_request")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    if fastapi_locations and loc[:1] in (("body",), ("query",), ("header",), ("path",)):
        loc = loc[1:]
    param = param_of(loc)
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        message = f"`{param}` is required: add it to the request body"
    elif kind in _EXPECTED:
        message = f"`{param}` must be {_EXPECTED[kind]}, got {_describe(err.get('input'))}"
    elif kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        op = ">=" if kind == "greater_than_equal" else ">"
        hint = "; leave it out to get every document" if param == "top_n" else ""
        message = f"`{param}` must be {op} {bound}, got {clip(err.get('input'))}{hint}"
    elif kind == "literal_error":
        message = f"`{param}` must be one of {ctx.get('expected', '')}, got {clip(err.get('input'))}"
    else:
        message = f"`{param}`: {err.get('msg', 'invalid value')}"
    return InvalidRequest(message, param=param, code="invalid_" + (kind or "value"))


def _describe(value: Any) -> str:
    from gateway.schemas.common import json_type

    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    return json_type(value)
