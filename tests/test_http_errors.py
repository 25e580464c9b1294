"""The error table through real HTTP: every bad input is a 4xx `{"error": {message, type, param, code}}`
whose message names the field (TEI: TEI's own shape), on a real `rerank-gateway serve` with small limits."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, gateway_server

KEY = "key-two"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_DOCS = 5
MAX_DOC_CHARS = 300
MAX_QUERY_CHARS = 100
MAX_BODY_BYTES = 4000
MAX_CHUNKS = 4
GOOD = {"query": "how to keep bread fresh", "documents": ["Bread keeps in a bag.", "Coffee is hot."]}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "RERANK_API_KEYS": f"key-one,{KEY}",
        "RERANK_MODEL_ALIASES": "rerank-v3.5",
        "RERANK_MAX_DOCUMENTS_PER_REQUEST": str(MAX_DOCS),
        "RERANK_MAX_DOCUMENT_CHARS": str(MAX_DOC_CHARS),
        "RERANK_MAX_QUERY_CHARS": str(MAX_QUERY_CHARS),
        "RERANK_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "RERANK_MAX_CHUNKS_PER_DOC_LIMIT": str(MAX_CHUNKS),
    }
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("errors"), env=env) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60.0) as c:
        yield c


def assert_error(
    response: httpx.Response, status: int, error_type: str, param: str | None, *needles: str
) -> dict:
    """The response is `status` with the error body naming `param`, and its message says each needle.

    Jina-dialect bodies carry the message again as a top-level `detail`; TEI-dialect bodies are TEI's own
    `{"error": "<message>", "error_type": ...}` (no `param`), checked by `assert_tei_error`.
    """
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "detail"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["param"] == param
    assert isinstance(error["code"], str)
    if "detail" in body:
        assert body["detail"] == error["message"]
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert response.headers["x-request-id"]
    return error


def assert_tei_error(response: httpx.Response, status: int, tei_type: str, *needles: str) -> str:
    """A TEI-dialect error: TEI's shape and class, and a message that says each needle."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == tei_type
    for needle in needles:
        assert needle in body["error"], body["error"]
    assert response.headers["x-request-id"]
    return body["error"]


def with_(**changes: object) -> dict:
    body = dict(GOOD)
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


# (route, body, status, type, param, words the message must contain)
BAD_BODIES = [
    ("/v1/rerank", with_(query=...), 400, "invalid_request_error", "query", ["`query`", "required"]),
    (
        "/v1/rerank",
        with_(documents=...),
        400,
        "invalid_request_error",
        "documents",
        ["`documents`", "required"],
    ),
    ("/rerank", with_(documents=[]), 400, "invalid_request_error", "documents", ["`documents`", "empty"]),
    ("/v2/rerank", with_(top_n=0), 400, "invalid_request_error", "top_n", ["`top_n`", "at least 1"]),
    ("/v2/rerank", with_(top_n=-3), 400, "invalid_request_error", "top_n", ["`top_n`", "at least 1"]),
    ("/v2/rerank", with_(top_n="three"), 400, "invalid_request_error", "top_n", ["`top_n`", "integer"]),
    ("/rerank", with_(query=42), 400, "invalid_request_error", "query", ["`query`", "string", "number"]),
    (
        "/rerank",
        with_(documents="one doc"),
        400,
        "invalid_request_error",
        "documents",
        ["`documents`", "array"],
    ),
    ("/rerank", with_(documents=["ok", 7]), 400, "invalid_request_error", "documents[1]", ["`documents[1]`"]),
    ("/rerank", with_(documents=["ok", None]), 400, "invalid_request_error", "documents[1]", ["null"]),
    ("/rerank", with_(documents=[{"title": "t"}]), 400, "invalid_request_error", "documents[0]", ["`text`"]),
    (
        "/v1/rerank",
        with_(documents=[{"text": "a"}], rank_fields=["title"]),
        400,
        "invalid_request_error",
        "documents[0]",
        ["rank_fields", "title"],
    ),
    ("/v1/rerank", with_(rank_fields=[]), 400, "invalid_request_error", "rank_fields", ["`rank_fields`"]),
    ("/rerank", with_(return_documents="maybe"), 400, "invalid_request_error", "return_documents", ["true"]),
    ("/rerank", with_(max_tokens_per_doc=0), 400, "invalid_request_error", "max_tokens_per_doc", [">= 1"]),
    (
        "/rerank",
        with_(documents=["d"] * (MAX_DOCS + 1)),
        413,
        "payload_too_large",
        "documents",
        [str(MAX_DOCS + 1), f"at most {MAX_DOCS}", "RERANK_MAX_DOCUMENTS_PER_REQUEST"],
    ),
    (
        "/rerank",
        with_(documents=["short", "x" * (MAX_DOC_CHARS + 1)]),
        413,
        "payload_too_large",
        "documents[1]",
        ["`documents[1]`", str(MAX_DOC_CHARS), "RERANK_MAX_DOCUMENT_CHARS"],
    ),
    (
        "/rerank",
        with_(query="q" * (MAX_QUERY_CHARS + 1)),
        413,
        "payload_too_large",
        "query",
        ["`query`", str(MAX_QUERY_CHARS), "RERANK_MAX_QUERY_CHARS"],
    ),
    ("/rerank", with_(model="gpt-4"), 404, "model_not_found", "model", ["'gpt-4'", "RERANK_MODEL_ALIASES"]),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "param", "needles"),
    BAD_BODIES,
    ids=[f"{c[2]}-{c[4]}-{i}" for i, c in enumerate(BAD_BODIES)],
)
def test_bad_body_gets_a_4xx_that_names_the_field(client, path, body, status, error_type, param, needles):
    assert_error(client.post(path, json=body, headers=AUTH), status, error_type, param, *needles)


# TEI bodies (`texts`): TEI's error shape and class (TEI's table: Empty for no inputs, else Validation).
TEI_BAD_BODIES = [
    ({"query": "q", "texts": []}, 400, "Empty", ["`texts`", "empty"]),
    ({"query": "q", "texts": ["a", 3]}, 400, "Validation", ["`texts[1]`"]),
    (
        {"query": "q", "texts": ["a"], "truncation_direction": "up"},
        400,
        "Validation",
        ["`truncation_direction`"],
    ),
    ({"query": "q", "texts": ["x" * (MAX_DOC_CHARS + 1)]}, 413, "Validation", ["`texts[0]`"]),
    ({"query": "q", "texts": ["a"], "top_n": 0}, 400, "Validation", ["`top_n`", "at least 1"]),
    ({"query": "q", "texts": ["a"], "model": "gpt-4"}, 404, "Validation", ["'gpt-4'"]),
]


@pytest.mark.parametrize(("body", "status", "tei_type", "needles"), TEI_BAD_BODIES)
def test_tei_errors_come_in_teis_own_shape(client, body, status, tei_type, needles):
    assert_tei_error(client.post("/rerank", json=body, headers=AUTH), status, tei_type, *needles)


def test_jina_errors_carry_a_top_level_detail(client):
    response = client.post("/rerank", json=with_(top_n=0), headers=AUTH)
    error = assert_error(response, 400, "invalid_request_error", "top_n", "`top_n`")
    assert response.json()["detail"] == error["message"]


def test_cohere_errors_have_no_detail(client):
    response = client.post("/v2/rerank", json=with_(top_n=0), headers=AUTH)
    assert set(response.json()) == {"error"}


def test_max_chunks_per_doc_over_the_limit_is_capped_not_refused(client):
    response = client.post("/v1/rerank", json=with_(max_chunks_per_doc=1024), headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"query": "q", "documents": ["a"]', "not valid JSON"),
        (b"{'query': 'q'}", "not valid JSON"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b'["q", "a"]', "JSON object"),
        (b"42", "JSON object"),
        (b'{"query": "\xff\xfe"}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
    ],
    ids=["truncated", "single-quotes", "empty", "blank", "array", "number", "not-utf8", "deep"],
)
def test_unparseable_body_is_400(client, content, needle):
    response = client.post(
        "/v1/rerank", content=content, headers={**AUTH, "content-type": "application/json"}
    )
    if needle == "body":  # 200 kB of brackets is over the body limit: refused before parsing
        assert_error(response, 413, "payload_too_large", None, "RERANK_MAX_BODY_BYTES")
    else:
        assert_error(response, 400, "invalid_request_error", None, needle)


def test_deeply_nested_json_within_the_size_limit_is_400(client):
    depth = MAX_BODY_BYTES // 2 - 40
    content = b'{"query": "q", "documents": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(content) <= MAX_BODY_BYTES
    response = client.post("/rerank", content=content, headers={**AUTH, **JSON})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "nested_too_deeply"
    assert error["param"].startswith("documents[0][0]")
    assert "nested too deeply" in error["message"]
    assert "64 levels" in error["message"]


def test_body_over_the_limit_is_413_from_content_length(client):
    body = with_(documents=["word " * 50] * 4, query="q")
    response = client.post("/rerank", json={**body, "padding": "p" * MAX_BODY_BYTES}, headers=AUTH)
    assert_error(response, 413, "payload_too_large", None, str(MAX_BODY_BYTES), "RERANK_MAX_BODY_BYTES")


def test_body_over_the_limit_is_413_while_streaming_without_content_length(client):
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "q", "documents": ["'
        for _ in range(MAX_BODY_BYTES // 100 + 5):
            yield b"x" * 100
        yield b'"]}'

    response = client.post("/rerank", content=chunks(), headers={**AUTH, **JSON})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large", None, "RERANK_MAX_BODY_BYTES")


def test_unknown_fields_are_ignored(client):
    body = with_(user="u-1", priority=3, truncate_prompt_tokens=-1, chat_template_kwargs={"x": 1})
    response = client.post("/rerank", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_an_alias_is_accepted_as_model(client):
    response = client.post("/v2/rerank", json=with_(model="rerank-v3.5"), headers=AUTH)
    assert response.status_code == 200, response.text


def test_unknown_dialect_header_is_400(client):
    response = client.post("/rerank", json=GOOD, headers={**AUTH, "x-rerank-dialect": "openai"})
    assert_error(response, 400, "invalid_request_error", "x-rerank-dialect", "cohere-v1", "tei")


# --- API keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "missing API key"),
        ({"authorization": "Bearer wrong"}, "invalid API key"),
        ({"authorization": "Basic a2V5LXR3bw=="}, "Bearer"),
        ({"authorization": "Bearer"}, "Bearer"),
        ({"authorization": f"Bearer {KEY}x"}, "invalid API key"),
    ],
    ids=["missing", "wrong", "basic", "empty-bearer", "prefix-of-key"],
)
@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_needs_a_valid_key(client, path, headers, needle):
    response = client.post(path, json=GOOD, headers=headers)
    assert_error(response, 401, "authentication_error", "Authorization", needle)
    assert response.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_is_accepted(client):
    for key in ("key-one", KEY):
        response = client.post("/rerank", json=GOOD, headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text


def test_a_bad_key_is_refused_before_the_body_is_read(client):
    response = client.post("/rerank", content=b"{not json", headers={"authorization": "Bearer wrong"})
    assert_error(response, 401, "authentication_error", "Authorization")


def test_models_needs_a_key(client):
    assert_error(client.get("/v1/models"), 401, "authentication_error", "Authorization")
    assert client.get("/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/openapi.json", "/docs"])
def test_health_ready_metrics_and_docs_stay_open(client, path):
    assert client.get(path).status_code == 200


# --- routes and methods --------------------------------------------------------------------------


def test_unknown_route_is_404_in_the_error_shape(client):
    assert_error(client.get("/v1/rerankz"), 404, "not_found", None, "/v1/rerankz")


def test_wrong_method_is_405_in_the_error_shape(client):
    response = client.get("/v1/rerank", headers=AUTH)
    assert_error(response, 405, "method_not_allowed", None, "GET")
    assert "POST" in response.headers["allow"]


def test_client_request_id_is_echoed_on_errors(client):
    response = client.post("/rerank", json=with_(top_n=0), headers={**AUTH, "x-request-id": "req-7"})
    assert response.headers["x-request-id"] == "req-7"
    # An id that is not short printable ASCII is replaced, never echoed.
    response = client.post("/rerank", json=with_(top_n=0), headers={**AUTH, "x-request-id": "a b"})
    assert response.headers["x-request-id"] != "a b"


# --- the serve and client commands ---------------------------------------------------------------


def run_cli(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        env=child_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_without_the_model_folder_is_one_line_naming_the_setting(tmp_path):
    result = run_cli(
        "serve", "--port", str(free_port()), env={"RERANK_MODEL_PATH": str(tmp_path / "nope")}, cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "RERANK_MODEL_PATH" in lines[0]
    assert "Traceback" not in result.stderr


def test_client_reports_a_refused_connection_in_one_line(tmp_path):
    docs = tmp_path / "docs.json"
    docs.write_text('["a", "b"]')
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("client", "--url", f"http://127.0.0.1:{port}", "--query", "q", "--docs-file", str(docs))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot connect" in lines[0]
    assert "connection refused" in lines[0]


def test_client_reports_the_servers_error_message(url, tmp_path):
    docs = tmp_path / "docs.json"
    docs.write_text('["a", "b"]')
    result = run_cli("client", "--url", url, "--query", "q", "--docs-file", str(docs), "--api-key", "wrong")
    assert result.returncode == 2
    assert "401" in result.stderr
    assert "invalid API key" in result.stderr
    result = run_cli("client", "--url", url, "--query", "q", "--docs-file", str(docs), "--api-key", KEY)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["results"]) == 2


# --- before the engine is loaded ------------------------------------------------------------------


async def test_before_the_engine_is_warm_ready_is_503_and_rerank_asks_to_retry(tiny_model_dir):
    from gateway.app import create_app
    from gateway.config import Settings

    # ASGITransport runs no lifespan: the app is as it is while the model still loads.
    app = create_app(Settings(_env_file=None, model_path=tiny_model_dir))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        assert (await c.get("/health")).status_code == 200
        ready = await c.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "loading"
        response = await c.post("/rerank", json=GOOD)
        assert_error(response, 503, "service_unavailable", None, "loading", "/ready")
        # A body that is not a request is still a 400, loaded or not (the service's own limits, such as
        # top_n >= 1, are checked once it is loaded).
        assert_error(await c.post("/rerank", json=with_(query=...)), 400, "invalid_request_error", "query")


def test_ready_reports_the_engine_once_warm(client):
    body = client.get("/ready").json()
    assert body["status"] == "ready"
    assert body["engines"] == {"onnx": {"healthy": True, "precision": "fp32"}}
