"""`rerank-gateway client`: send a docs file to a running gateway (or any Cohere/Jina/TEI server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from urllib.parse import urlsplit

DIALECT_PATHS = {"cohere": "/v1/rerank", "jina": "/v1/rerank", "tei": "/rerank"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "client",
        help="Rerank a docs file through a running server and print its JSON response.",
        description=(
            "POST QUERY and the documents of a docs file (a JSON list of strings or of objects with 'text') "
            "to a rerank server and print the response. --url is the server's base URL (the dialect's path "
            "is added: /v1/rerank for cohere and jina, /rerank for tei) or a full URL with a path."
        ),
    )
    parser.add_argument("--url", required=True, help="Base URL, e.g. http://127.0.0.1:8080.")
    parser.add_argument("--query", required=True, help="The search query.")
    parser.add_argument("--docs-file", required=True, metavar="F", help="JSON list of documents.")
    parser.add_argument("--top-n", default=None, metavar="N", help="Return the N best documents.")
    parser.add_argument(
        "--api-key", default=None, metavar="K", help="Bearer key (default: $RERANK_API_KEY, if set)."
    )
    parser.add_argument(
        "--dialect", default="cohere", metavar="{cohere,jina,tei}", help="Request shape (default: cohere)."
    )
    parser.add_argument("--instruction", default=None, help="mxbai instruction put before the query.")
    parser.add_argument("--raw-scores", action="store_true", help="Ask for raw scores instead of 0..1.")
    parser.add_argument(
        "--timeout", default=60.0, type=float, metavar="S", help="Seconds to wait (default 60)."
    )
    parser.set_defaults(func=run)


def build_request(args: argparse.Namespace, documents: list[str]) -> tuple[str, dict, dict[str, str]]:
    """URL, JSON body and headers for the chosen dialect."""
    from gateway.local import InputError, parse_top_k

    if args.dialect not in DIALECT_PATHS:
        raise InputError(f"unknown dialect {args.dialect!r}: choose cohere, jina or tei")
    top_n = parse_top_k(args.top_n, "--top-n")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--url must be an http(s) URL such as http://127.0.0.1:8080, got {args.url!r}")
    url = args.url if parts.path not in ("", "/") else args.url.rstrip("/") + DIALECT_PATHS[args.dialect]
    headers = {"content-type": "application/json"}
    api_key = args.api_key or os.environ.get("RERANK_API_KEY")
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    body: dict = {"query": args.query}
    if args.dialect == "tei":
        body.update(texts=documents, return_text=True)
    else:
        body.update(documents=documents, return_documents=True)
        if args.dialect == "cohere":
            # Our gateway tells Cohere from Jina on /v1/rerank by this header; other servers ignore it.
            headers["x-rerank-dialect"] = "cohere-v1"
    if top_n is not None:
        body["top_n"] = top_n
    if args.instruction:
        body["instruction"] = args.instruction
    if args.raw_scores:
        body["raw_scores"] = True
    return url, body, headers


def run(args: argparse.Namespace) -> int:
    import httpx

    from gateway.local import InputError, check_query, load_documents

    check_query(args.query, "--query")
    documents = list(load_documents(args.docs_file))
    url, body, headers = build_request(args, documents)
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=args.timeout)
    except httpx.ConnectError as exc:
        raise InputError(
            f"cannot connect to {url}: {_reason(exc)} (is `rerank-gateway serve` running?)"
        ) from None
    except httpx.TimeoutException:
        raise InputError(f"{url} did not answer within {args.timeout:g} s (--timeout)") from None
    except httpx.HTTPError as exc:
        raise InputError(f"request to {url} failed: {_reason(exc)}") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if not isinstance(message, str):
            message = (response.text or response.reason_phrase).strip()[:300]
        raise InputError(f"{url} answered {response.status_code}: {message}")
    if data is None:
        raise InputError(f"{url} answered {response.status_code} with a body that is not JSON")
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    return 0


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0]
