"""Request and response models per client dialect (one module each), and the 400 that names a bad field.

Which dialect a request speaks, and everything else a dialect decides, is in the registry (gateway.dialects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from gateway.errors import InvalidRequest, clip


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
