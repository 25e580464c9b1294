"""Production hardening (issue 11) through a real `rerank-gateway serve` process on the tiny model.

Connections: a request head must arrive in time (408) and be small (431), idle keep-alive connections close,
a body must arrive in time (408), and silent sockets cannot use up the file descriptors real clients need.
Bodies: bad input is never a 5xx (lone surrogates, huge integers, deep nesting), echoed values are short,
only JSON is taken (415), a million documents are refused before they are parsed (413) without stalling
/health, and integers are integers. Configuration: the served name is the manifest's, and `serve` on a
corrupt folder or against a sidecar serving another model says so in one line (exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port

HEAD_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 8192
# "It did not hang" bounds, generous for a busy 2-core machine.
BOUND_S = 15.0
GOOD = {"query": "how to keep bread fresh", "documents": ["Bread keeps in a bag.", "Coffee is hot."]}


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def child_env(model_dir: Path, work: Path, env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    out.update(
        PYTHONPATH=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
        RERANK_MODEL_PATH=str(model_dir),
        RERANK_CACHE_DIR=str(work / "cache"),
        RERANK_ONNX_INTRA_OP_THREADS="1",
        **env,
    )
    return out


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture
def start_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start `rerank-gateway serve` with extra settings (and an open-files limit); stopped at the end."""
    started: list[Server] = []

    def start(env: dict[str, str], *, max_open_files: int | None = None) -> Server:
        work = tmp_path_factory.mktemp("hardening")
        port = free_port()
        log_path = work / "server.log"

        def limit_files() -> None:
            if max_open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                serve_command(port),
                cwd=work,
                env=child_env(tiny_model_dir, work, env),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=limit_files,
            )
        server = Server(f"http://127.0.0.1:{port}", port, process, log_path)
        started.append(server)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{server.log()[-3000:]}"
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("hardening-shared")
    port = free_port()
    log_path = work / "server.log"
    env = {
        "RERANK_HEADER_READ_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "RERANK_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
        "RERANK_BODY_READ_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "RERANK_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(port),
            cwd=work,
            env=child_env(tiny_model_dir, work, env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    srv = Server(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, srv.log()[-3000:]
            try:
                if httpx.get(f"{srv.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.1)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def connections_closed(url: str, reason: str) -> float:
    """`rerank_connections_closed_total{reason}` from the server's /metrics."""
    needle = f'rerank_connections_closed_total{{reason="{reason}"}} '
    for line in httpx.get(f"{url}/metrics", timeout=BOUND_S).text.splitlines():
        if line.startswith(needle):
            return float(line[len(needle) :])
    return 0.0


def http_status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# --- connections --------------------------------------------------------------------------------------


def test_a_silent_connection_gets_408_and_is_closed(server):
    before = connections_closed(server.url, "header_timeout")
    with connect(server) as sock:
        started = time.monotonic()
        raw = read_until_closed(sock)
        waited = time.monotonic() - started
    status, body = http_status_and_body(raw)
    assert status == 408
    assert body["error"]["code"] == "header_timeout"
    assert "RERANK_HEADER_READ_TIMEOUT_S" in body["error"]["message"]
    assert HEAD_TIMEOUT_S - 0.5 <= waited < HEAD_TIMEOUT_S + BOUND_S
    assert connections_closed(server.url, "header_timeout") >= before + 1


def test_a_head_sent_byte_by_byte_gets_408_at_the_head_deadline(server):
    head = b"POST /rerank HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 100
    with connect(server) as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        sent = 0
        raw = b""
        # A byte every 0.2 s keeps every per-read timer alive; the head deadline counts from the start.
        while sent < len(head) and time.monotonic() - started < HEAD_TIMEOUT_S + BOUND_S:
            try:
                sock.sendall(head[sent : sent + 1])
                sent += 1
                raw += sock.recv(65536)
                if raw:
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(BOUND_S)
        raw += read_until_closed(sock)
    status, body = http_status_and_body(raw)
    assert status == 408, raw
    assert body["error"]["type"] == "request_timeout"
    assert sent < len(head)  # cut off before the head was done


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        rest = read_until_closed(sock)
        waited = time.monotonic() - started
    assert rest == b""  # closed without another word
    assert KEEP_ALIVE_S - 0.5 <= waited < KEEP_ALIVE_S + BOUND_S


def test_a_body_that_stops_coming_gets_408(server):
    with connect(server) as sock:
        sock.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"query": "q", "documents": ["'
        )
        raw = read_until_closed(sock)
    status, body = http_status_and_body(raw)
    assert status == 408
    assert body["error"]["code"] == "body_timeout"
    assert "RERANK_BODY_READ_TIMEOUT_S" in body["error"]["message"]


def test_a_head_over_the_limit_is_431_whether_it_comes_whole_or_in_pieces(server, client):
    response = client.get("/health", headers={"x-big": "a" * (MAX_HEADER_BYTES + 100)})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert "RERANK_MAX_HEADER_BYTES" in response.json()["error"]["message"]
    assert connections_closed(server.url, "headers_too_large") >= 1
    # A head that arrives in pieces is cut off as soon as it passes the limit.
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 65536)
        raw = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 431"), raw[:200]
    # Twenty clients each stream a 1 MB header that never ends: the server keeps none of it (the issue
    # measured 224 -> 748 MB for twenty unfinished 25 MB headers).
    rss_before = server.rss_mb()
    socks = [connect(server) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: ")
        for _ in range(16):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a" * 65536)
        rss_during = server.rss_mb()
    finally:
        for sock in socks:
            sock.close()
    assert rss_during - rss_before < 64, (rss_before, rss_during)
    assert client.get("/health").status_code == 200


def test_silent_sockets_cannot_use_up_the_servers_file_descriptors(start_server):
    # With 256 open files the default connection cap is 256 - 128; 300 silent sockets would take them all.
    srv = start_server({"RERANK_HEADER_READ_TIMEOUT_S": "60"}, max_open_files=256)
    silent = []
    try:
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND_S))
        started = time.monotonic()
        response = httpx.post(f"{srv.url}/rerank", json=GOOD, timeout=BOUND_S)
        took = time.monotonic() - started
        still_open = 0
        for sock in silent:
            sock.setblocking(False)
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    continue  # closed by the server
            except BlockingIOError:
                still_open += 1
            except ConnectionResetError:
                continue
    finally:
        for sock in silent:
            sock.close()
    assert response.status_code == 200, response.text
    assert took < BOUND_S
    # The longest-idle sockets were closed to make room: at most the cap stays open.
    assert still_open <= 256 - 128, still_open
    assert connections_closed(srv.url, "evicted_idle") >= 300 - (256 - 128)
    assert "Too many open files" not in srv.log()


# --- bad input is a 400 naming the field, one log line, never a 5xx -----------------------------------

LONE = "\ud800"
DEEP: dict = {"text": "deep"}
for _ in range(500):
    DEEP = {"nested": DEEP, "text": "deep"}
HUGE_INT = "1" * 5000
ECHO = {"return_documents": True}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/rerank", {**GOOD, "query": "bread" + LONE}, "query"),
        ("/rerank", {**GOOD, "documents": ["fine", "bad" + LONE]}, "documents[1]"),
        ("/rerank", {**GOOD, "instruction": LONE}, "instruction"),
        ("/rerank", {"query": "q", "texts": [LONE + "x"]}, "texts[0]"),
        (
            "/v1/rerank",
            {**GOOD, "documents": [{"text": "t", "meta": LONE}], "return_documents": True},
            "documents[0].meta",
        ),
        (
            "/v1/rerank",
            {**GOOD, "documents": [{"text": "t", LONE: 1}], "return_documents": True},
            "documents[0]",
        ),
        ("/v1/rerank", {**GOOD, "documents": [DEEP], "return_documents": True}, "documents[0].nested"),
    ],
    ids=["query", "document", "instruction", "tei-text", "object-value", "object-key", "nested-500"],
)
def test_lone_surrogates_and_deep_nesting_are_400_naming_the_field(server, client, path, body, param):
    lines_before = len(server.log().splitlines())
    content = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as its \ud800 escape
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param), error
    assert f"`{error['param']}`" in error["message"]
    time.sleep(0.2)  # let the access log line land
    new_lines = server.log().splitlines()[lines_before:]
    assert len(new_lines) <= 1, new_lines
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("template", "param"),
    [
        ('{"query": "q", "documents": ["a"], "top_n": %s}', "top_n"),
        ('{"query": "q", "documents": [{"text": "a", "n": %s}], "return_documents": true}', "documents[0].n"),
        ('{"query": "q", "documents": ["a"], "unknown": [%s]}', "unknown[0]"),
    ],
    ids=["top_n", "document-field", "ignored-field"],
)
def test_an_integer_of_more_than_4300_digits_is_400_naming_the_field(server, client, template, param):
    content = (template % HUGE_INT).encode()
    response = client.post("/v1/rerank", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "4300 digits" in error["message"]
    assert "Traceback" not in server.log()


def test_echoed_values_are_cut_to_about_a_hundred_characters(client):
    response = client.post("/rerank", json={**GOOD, "model": "m" * 5_000_000})
    assert response.status_code == 404
    assert len(response.content) < 1_000
    assert "5000000 characters" in response.json()["error"]["message"]
    response = client.get("/" + "p" * 8000)
    assert response.status_code == 404
    assert len(response.json()["error"]["message"]) < 300
    response = client.post("/rerank", json=GOOD, headers={"x-rerank-dialect": "d" * 5000})
    assert response.status_code == 400
    assert len(response.json()["error"]["message"]) < 300


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"],
)
def test_a_body_not_sent_as_json_is_415(client, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/rerank", content=json.dumps(GOOD).encode(), headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["type"] == "unsupported_media_type"
    assert error["param"] == "Content-Type"
    assert "application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_media_types_are_taken(client, content_type):
    response = client.post(
        "/rerank", content=json.dumps(GOOD).encode(), headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text


async def test_a_million_documents_are_refused_before_parsing_and_health_does_not_stall(server):
    content = b'{"query": "q", "documents": [' + b",".join([b'"a"'] * 1_000_000) + b"]}"
    worst_s = 0.0
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as health,
        httpx.AsyncClient(base_url=server.url, timeout=60) as big,
    ):
        stop = asyncio.Event()

        async def poll() -> None:
            nonlocal worst_s
            while not stop.is_set():
                started = time.monotonic()
                assert (await health.get("/health")).status_code == 200
                worst_s = max(worst_s, time.monotonic() - started)
                await asyncio.sleep(0.01)

        poller = asyncio.create_task(poll())
        started = time.monotonic()
        response = await big.post("/rerank", content=content, headers={"content-type": "application/json"})
        took = time.monotonic() - started
        stop.set()
        await poller
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_documents"
    assert "RERANK_MAX_DOCUMENTS_PER_REQUEST" in error["message"]
    assert took < BOUND_S
    # The issue measured /health stalled 1.6 s while the body was parsed; now no parse holds the loop.
    assert worst_s < 0.5, worst_s


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("top_n", True, 400),
        ("top_n", "3", 400),
        ("top_n", 2.5, 400),
        ("top_n", 2.0, 200),  # JSON Schema's integer includes 2.0
        ("max_tokens_per_doc", False, 400),
        ("return_documents", "true", 400),
        ("raw_scores", 1, 400),
    ],
)
def test_integers_and_booleans_are_what_the_spec_says(client, field, value, status):
    response = client.post("/rerank", json={**GOOD, field: value})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == field


# --- configuration: the served name, a corrupt folder, a sidecar serving another model ---------------


def manifest_name(model_dir: Path) -> str:
    source = json.loads((model_dir / "rerank_manifest.json").read_text())["source"]
    return Path(source).name if source.count("/") != 1 else source


def test_the_served_name_is_the_manifests_not_the_default_hub_id(client, tiny_model_dir):
    name = manifest_name(tiny_model_dir)
    assert name != "mixedbread-ai/mxbai-rerank-base-v2"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [name]
    assert client.post("/rerank", json=GOOD).json()["model"] == name
    assert client.get("/ready").json()["model"] == name
    response = client.post("/rerank", json={**GOOD, "model": "mixedbread-ai/mxbai-rerank-base-v2"})
    assert response.status_code == 404


def test_rerank_served_model_name_overrides_the_manifest(make_settings, tiny_model_dir):
    from gateway.app import create_app
    from gateway.compose import served_names
    from gateway.config import Settings

    app = create_app(Settings(_env_file=None, model_path=tiny_model_dir), model_dir=tiny_model_dir)
    assert served_names(app.state.settings) == [manifest_name(tiny_model_dir)]
    app = create_app(
        Settings(_env_file=None, model_path=tiny_model_dir, served_model_name="my-reranker"),
        model_dir=tiny_model_dir,
    )
    assert served_names(app.state.settings) == ["my-reranker"]
    # RERANK_MODEL set explicitly stays accepted as another name.
    app = create_app(make_settings(), model_dir=tiny_model_dir)
    assert served_names(app.state.settings)[1] == "mixedbread-ai/mxbai-rerank-base-v2"


def run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    full_env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_serve_on_a_corrupt_folder_prints_the_same_one_line_as_rank(tiny_model_dir, tmp_path, damage):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    graph_name = json.loads((broken / "rerank_manifest.json").read_text())["graphs"]["fp32"][0]
    graph = broken / graph_name
    data = bytearray(graph.read_bytes())
    if damage == "flipped-byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    graph.write_bytes(bytes(data))
    docs = tmp_path / "docs.json"
    docs.write_text('["a", "b"]')
    env = {
        "RERANK_MODEL_PATH": str(broken),
        "RERANK_CACHE_DIR": str(tmp_path / "cache"),
        "RERANK_QUANTIZATION": "fp32",
    }
    rank = run_cli(["rank", "--query", "q", "--docs-file", str(docs)], env, tmp_path)
    serve = run_cli(["serve", "--port", str(free_port())], env, tmp_path)
    assert (rank.returncode, serve.returncode) == (2, 2), serve.stderr
    assert "Traceback" not in serve.stderr
    serve_lines = serve.stderr.strip().splitlines()
    assert len(serve_lines) == 1, serve.stderr
    rank_line = rank.stderr.strip().splitlines()[-1]
    assert serve_lines[0].replace("rerank-gateway serve:", "rerank-gateway rank:") == rank_line
    assert graph_name in serve_lines[0]


class OtherModelSidecar:
    """A stand-in for a vLLM sidecar that is up and serves a model of another name."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = b"" if self.path == "/health" else b'{"object": "list", "data": [{"id": "other"}]}'
                self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_serve_against_a_sidecar_serving_another_model_is_one_error_line(tiny_model_dir, tmp_path):
    sidecar = OtherModelSidecar()
    try:
        env = {
            "RERANK_MODEL_PATH": str(tiny_model_dir),
            "RERANK_CACHE_DIR": str(tmp_path / "cache"),
            "RERANK_VLLM_URL": sidecar.url,
            "RERANK_VLLM_MODEL": "tiny-reranker",
        }
        result = run_cli(["serve", "--port", str(free_port())], env, tmp_path)
    finally:
        sidecar.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"rerank-gateway serve: error: the vLLM sidecar at {sidecar.url} serves 'other', not "
        "'tiny-reranker': set RERANK_VLLM_MODEL to the name it serves, or launch it with "
        "--served-model-name tiny-reranker"
    ], result.stderr
