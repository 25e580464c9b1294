"""A rerank request's body: JSON media type, size, read deadline, and a parse whose errors name the field.

`json.loads` would parse a body in one C call that holds the GIL throughout: a 20 MB body of 10^6 tiny
documents stalls the event loop (and /health) for over a second even from a worker thread, and its errors
cannot say which field is at fault. So containers are walked here in Python and only scalars go to the
standard library's C scanner. That costs about a microsecond per value (nothing next to scoring), and buys:
- the documents are counted while they are parsed: the 413 comes after `max_documents + 1` items, whatever
  the body holds;
- a worker thread parsing a large body gives the GIL back between values, so the event loop keeps serving;
- nesting deeper than MAX_DEPTH, a lone UTF-16 surrogate (which no tokenizer or JSON encoder takes) and an
  integer over Python's 4,300-digit limit are each a 400 that names the field.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from json.decoder import scanstring
from json.scanner import make_scanner
from typing import Any

from gateway.errors import (
    BodyTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    clip,
)

# No rerank request needs deeper nesting; pydantic's serializer refuses ~255 levels when echoing documents.
MAX_DEPTH = 64
# Top-level keys whose arrays are the documents (Cohere, Jina: documents; TEI: texts).
DOCUMENT_KEYS = frozenset({"documents", "texts"})
# A budget on JSON values per body (strings, numbers, containers...): 1,000 documents with 100 fields each
# fit; a 20 MB body of 10^6 tiny objects in an ignored field stops here instead of costing seconds of CPU.
MIN_VALUES_BUDGET = 100_000
VALUES_PER_DOCUMENT = 100
# Bodies from this size on (or with many values) are parsed in a worker thread.
OFFLOAD_BYTES = 64 * 1024
OFFLOAD_VALUES = 2_000

_DECODER = json.JSONDecoder()
_SCAN = make_scanner(_DECODER)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE_CHARS = frozenset(" \t\n\r")
# Lone surrogates can only come from `\uD8xx`-style escapes (strict UTF-8 decoding refuses encoded ones).
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Python 3.11 (and 3.10.7+) refuse int() of more digits than this; older versions have no limit.
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300


def is_json_media_type(content_type: str | None) -> bool:
    """`application/json` or `application/<x>+json`, with any parameters (charset)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json(content_type: str | None) -> None:
    """415 unless the body is declared JSON (a browser's form or text/plain post cannot spend the model)."""
    if is_json_media_type(content_type):
        return
    got = f"got {clip(content_type)}" if content_type else "the request has no Content-Type header"
    raise UnsupportedMediaType(
        f"the body must be JSON sent with `Content-Type: application/json`; {got}",
        param="Content-Type",
        code="unsupported_media_type",
    )


async def read_body(
    chunks: AsyncIterator[bytes], *, declared_length: str | None, max_bytes: int, timeout_s: float
) -> bytes:
    """The raw body: 413 over `max_bytes` (from Content-Length or while reading), 408 past `timeout_s`."""
    if declared_length and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise BodyTooLarge(
            f"the body has {int(declared_length)} bytes; this server takes at most {max_bytes} "
            "(RERANK_MAX_BODY_BYTES): send fewer or shorter documents",
            code="body_too_large",
        )
    parts: list[bytes] = []
    size = 0
    deadline_s = time.monotonic() + timeout_s
    body = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(body.__anext__(), max(0.0, deadline_s - time.monotonic()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout_s:g} s (RERANK_BODY_READ_TIMEOUT_S): "
                f"{size} bytes came; send the whole body at once",
                code="body_timeout",
            ) from None
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(
                f"the body is over {max_bytes} bytes (RERANK_MAX_BODY_BYTES): "
                "send fewer or shorter documents",
                code="body_too_large",
            )
        parts.append(chunk)
    return b"".join(parts)


def should_offload(raw: bytes) -> bool:
    """Whether parsing `raw` could hold the event loop long enough to matter."""
    return len(raw) >= OFFLOAD_BYTES or raw.count(b",") > OFFLOAD_VALUES


def parse_object(raw: bytes, *, max_documents: int) -> dict[str, Any]:
    """The body as a JSON object; every failure is an InvalidRequest (400) or PayloadTooLarge (413)."""
    if not raw.strip():
        raise InvalidRequest(
            'the request body is empty: send a JSON object such as {"query": "...", "documents": ["..."]}',
            code="empty_body",
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not UTF-8 text (byte {exc.start}): send JSON in UTF-8", code="invalid_json"
        ) from None
    walker = _Walker(text, max_documents, check_surrogates=_ESCAPED_SURROGATE.search(text) is not None)
    value = walker.parse()
    if not isinstance(value, dict):
        raise InvalidRequest(
            'the request body must be a JSON object such as {"query": "...", "documents": ["..."]}, '
            f"got {_json_type(value)}",
            code="invalid_json",
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _param(path: tuple[str | int, ...]) -> str:
    """`('documents', 2, 'meta')` -> `documents[2].meta`, kept short (long keys and deep paths are cut)."""
    out = ""
    for n, part in enumerate(path):
        if n == 6:
            out += "..."
            break
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if len(part) <= 40 else part[:37] + "..."
            out += ("." if out else "") + key
    return out or "body"


class _Walker:
    """Recursive descent over containers (depth-bounded); scalars go to the C scanner.

    A value's path is built only when there is an error to report: containers pass their own path down,
    scalars get their parent's path and their key.
    """

    def __init__(self, text: str, max_documents: int, *, check_surrogates: bool) -> None:
        self.text = text
        self.max_documents = max_documents
        self.check_surrogates = check_surrogates
        self.values_left = max(MIN_VALUES_BUDGET, max_documents * VALUES_PER_DOCUMENT)

    def parse(self) -> Any:
        text = self.text
        i = _skip(text, 0)
        value, i = self._value(i, (), None, 0, False)
        i = _skip(text, i)
        if i != len(text):
            raise self._syntax("Extra data", i)
        return value

    # --- errors ----------------------------------------------------------------------------------------

    def _syntax(self, message: str, pos: int) -> InvalidRequest:
        err = json.JSONDecodeError(message, self.text, pos)
        return InvalidRequest(
            f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
            code="invalid_json",
        )

    def _check_text(self, value: str, path: tuple[str | int, ...], what: str = "") -> None:
        found = _SURROGATE.search(value)
        if found is None:
            return
        param = _param(path)
        raise InvalidRequest(
            f"`{param}` {what}contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x}) at character "
            f"{found.start()}, which is not valid Unicode: send a pair (high then low surrogate) or the "
            "character itself in UTF-8",
            param=param,
            code="invalid_unicode",
        )

    def _too_deep(self, path: tuple[str | int, ...]) -> InvalidRequest:
        param = _param(path)
        return InvalidRequest(
            f"`{param}` is nested too deeply: the request body may nest objects and arrays at most "
            f"{MAX_DEPTH} levels",
            param=param,
            code="nested_too_deeply",
        )

    # --- values ----------------------------------------------------------------------------------------

    def _value(
        self, i: int, parent: tuple[str | int, ...], key: str | int | None, depth: int, count: bool
    ) -> tuple[Any, int]:
        self.values_left -= 1
        if self.values_left < 0:
            raise PayloadTooLarge(
                "the request body holds more JSON values (strings, numbers, objects, arrays) than a rerank "
                "request can use: send fewer documents, or documents with fewer fields",
                code="too_many_values",
            )
        char = self.text[i : i + 1]
        if char == "{" or char == "[":
            path = parent if key is None else (*parent, key)
            if depth >= MAX_DEPTH:
                raise self._too_deep(path)
            if char == "{":
                return self._object(i + 1, path, depth + 1)
            return self._array(i + 1, path, depth + 1, count)
        try:
            value, end = _SCAN(self.text, i)
        except StopIteration:
            raise self._syntax("Expecting value", i) from None
        except json.JSONDecodeError as exc:
            raise self._syntax(exc.msg, exc.pos) from None
        except ValueError:
            # int() refuses more than sys.get_int_max_str_digits() digits (a CPU guard since Python 3.11).
            param = _param(parent if key is None else (*parent, key))
            raise InvalidRequest(
                f"`{param}` is an integer of more than {_INT_DIGITS} digits: send a smaller number",
                param=param,
                code="number_too_large",
            ) from None
        if self.check_surrogates and type(value) is str:
            self._check_text(value, parent if key is None else (*parent, key))
        return value, end

    def _object(self, i: int, path: tuple[str | int, ...], depth: int) -> tuple[dict[str, Any], int]:
        text = self.text
        value = self._value
        out: dict[str, Any] = {}
        i = _skip(text, i)
        if text[i : i + 1] == "}":
            return out, i + 1
        while True:
            if text[i : i + 1] != '"':
                raise self._syntax("Expecting property name enclosed in double quotes", i)
            try:
                key, i = scanstring(text, i + 1, True)
            except json.JSONDecodeError as exc:
                raise self._syntax(exc.msg, exc.pos) from None
            if self.check_surrogates:
                self._check_text(key, path, "has a key that ")
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise self._syntax("Expecting ':' delimiter", i)
            i = _skip(text, i + 1)
            out[key], i = value(i, path, key, depth, depth == 1 and key in DOCUMENT_KEYS)
            i = _skip(text, i)
            char = text[i : i + 1]
            if char == ",":
                i = _skip(text, i + 1)
            elif char == "}":
                return out, i + 1
            else:
                raise self._syntax("Expecting ',' delimiter", i)

    def _array(self, i: int, path: tuple[str | int, ...], depth: int, count: bool) -> tuple[list[Any], int]:
        text = self.text
        value = self._value
        limit = self.max_documents if count else -1
        out: list[Any] = []
        i = _skip(text, i)
        if text[i : i + 1] == "]":
            return out, i + 1
        n = 0
        while True:
            if n == limit:
                param = _param(path)
                raise PayloadTooLarge(
                    f"`{param}` has at least {n + 1} documents; this server takes at most "
                    f"{self.max_documents} per request (RERANK_MAX_DOCUMENTS_PER_REQUEST): split the request",
                    param=param,
                    code="too_many_documents",
                )
            item, i = value(i, path, n, depth, False)
            out.append(item)
            n += 1
            i = _skip(text, i)
            char = text[i : i + 1]
            if char == ",":
                i = _skip(text, i + 1)
            elif char == "]":
                return out, i + 1
            else:
                raise self._syntax("Expecting ',' delimiter", i)


def _skip(text: str, i: int) -> int:
    """The position of the first non-whitespace character at or after `i`."""
    if text[i : i + 1] in _WHITESPACE_CHARS:
        return _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
    return i


async def parse_object_async(raw: bytes, *, max_documents: int) -> dict[str, Any]:
    """`parse_object`, in a worker thread when the body is large enough to hold the event loop."""
    if should_offload(raw):
        return await asyncio.to_thread(parse_object, raw, max_documents=max_documents)
    return parse_object(raw, max_documents=max_documents)
