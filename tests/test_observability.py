"""Observability: request metrics with bounded labels, `/metrics` (content, auth), and a real Prometheus
scraping a real gateway (marker `load`)."""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from gateway import metrics
from gateway.config import Settings
from gateway.observability import install_observability
from tests.conftest import gateway_server, require_real_component

# The Cohere SDKs send this header; /v1/rerank then answers (and counts) as Cohere v1, else as Jina.
COHERE_SDK = {"X-Fern-SDK-Name": "cohere"}
GATEWAY_PORT = 18401
PROMETHEUS_PORT = 18402
ALL_METRICS = [
    metrics.REQUESTS,
    metrics.REQUESTS_IN_FLIGHT,
    metrics.REQUEST_LATENCY,
    metrics.QUEUE_LATENCY,
    metrics.INFERENCE_LATENCY,
    metrics.BATCH_SIZE,
    metrics.BATCH_TOKENS,
    metrics.PADDING_WASTE,
    metrics.QUEUE_DEPTH,
    metrics.DOCUMENTS_TRUNCATED,
    metrics.DOCUMENTS_CHUNKED,
    metrics.ENGINE_HEALTHY,
    metrics.CIRCUIT_STATE,
    metrics.FALLBACKS,
    metrics.DROPPED,
    metrics.ENGINE_ERRORS,
]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def requests_count(dialect: str, route: str, status: str) -> float:
    return sample("rerank_requests_total", dialect=dialect, route=route, status=status)


def toy_app() -> FastAPI:
    """A small app with the observability installed: rerank-like, templated, streaming and stuck routes."""
    app = FastAPI()
    install_observability(app, Settings(_env_file=None))

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict:
        request.state.dialect = "jina"
        return {"results": []}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        if item_id > 10:
            raise HTTPException(404, "no such item")
        return {"id": item_id}

    @app.post("/typo")
    async def typo(request: Request) -> dict:
        request.state.dialect = "cohere-v9"  # not a dialect: must not mint a label value
        return {}

    app.state.first_chunk_sent = asyncio.Event()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():
            yield b"first "
            # Blocks until the client side has seen the first chunk: a buffering middleware deadlocks here.
            await asyncio.wait_for(app.state.first_chunk_sent.wait(), timeout=5)
            yield b"second"

        return StreamingResponse(body(), media_type="text/plain")

    app.state.stuck_started = asyncio.Event()

    @app.post("/rerank")
    async def stuck(request: Request) -> dict:
        request.state.dialect = "tei"
        app.state.stuck_started.set()
        await asyncio.sleep(3600)
        return {}

    return app


def test_requests_are_counted_by_dialect_route_template_and_status():
    before = {
        "jina": requests_count("jina", "/v1/rerank", "200"),
        "item_ok": requests_count("other", "/items/{item_id}", "200"),
        "item_404": requests_count("other", "/items/{item_id}", "404"),
        "unmatched": requests_count("other", "<unmatched>", "404"),
        "typo": requests_count("other", "/typo", "200"),
        "latency": sample("rerank_request_duration_seconds_count", dialect="jina"),
    }
    with TestClient(toy_app()) as client:
        assert client.post("/v1/rerank", json={}).status_code == 200
        assert client.post("/v1/rerank", json={}).status_code == 200
        assert client.get("/items/3").status_code == 200
        assert client.get("/items/42").status_code == 404
        assert client.get("/items/43").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        assert client.post("/typo").status_code == 200
    assert requests_count("jina", "/v1/rerank", "200") - before["jina"] == 2
    assert requests_count("other", "/items/{item_id}", "200") - before["item_ok"] == 1
    assert requests_count("other", "/items/{item_id}", "404") - before["item_404"] == 2
    assert requests_count("other", "<unmatched>", "404") - before["unmatched"] == 1
    assert requests_count("other", "/typo", "200") - before["typo"] == 1
    assert sample("rerank_request_duration_seconds_count", dialect="jina") - before["latency"] == 2
    # Raw paths never become label values.
    exposition = metrics.REGISTRY.get_sample_value
    assert (
        exposition("rerank_requests_total", {"dialect": "other", "route": "/items/42", "status": "404"})
        is None
    )
    assert (
        exposition("rerank_requests_total", {"dialect": "cohere-v9", "route": "/typo", "status": "200"})
        is None
    )


async def _call(app, scope: dict, body: bytes = b"") -> list[dict]:
    """Drive `app` as a server would, returning the ASGI messages it sent."""
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body") == b"first ":
            app.state.first_chunk_sent.set()

    await app(scope, receive, send)
    return sent


def _scope(method: str, path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


async def test_streamed_responses_pass_through_chunk_by_chunk():
    app = toy_app()
    before = requests_count("other", "/stream", "200")
    sent = await asyncio.wait_for(_call(app, _scope("GET", "/stream")), timeout=10)
    bodies = [m.get("body") for m in sent if m["type"] == "http.response.body"]
    assert bodies[:2] == [b"first ", b"second"]
    assert requests_count("other", "/stream", "200") - before == 1


async def test_a_cancelled_request_counts_as_client_closed_and_leaves_no_request_in_flight():
    app = toy_app()
    before = requests_count("tei", "/rerank", "499")
    in_flight = sample("rerank_requests_in_flight")
    task = asyncio.create_task(_call(app, _scope("POST", "/rerank"), b"{}"))
    await asyncio.wait_for(app.state.stuck_started.wait(), timeout=5)
    assert sample("rerank_requests_in_flight") == in_flight + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert requests_count("tei", "/rerank", "499") - before == 1
    assert sample("rerank_requests_in_flight") == in_flight


# --- the real app -----------------------------------------------------------------------------------------


def _rerank_body() -> dict:
    return {
        "query": "how do I keep bread fresh",
        "documents": ["Freeze sliced bread.", "Espresso is coffee."],
    }


def test_metrics_route_exposes_every_metric_in_the_text_format(make_settings):
    from gateway.app import create_app

    with TestClient(create_app(make_settings())) as client:
        assert client.post("/v1/rerank", json=_rerank_body(), headers=COHERE_SDK).status_code == 200
        assert (
            client.post("/rerank", json={"query": "bread", "texts": ["Freeze it.", "Coffee."]}).status_code
            == 200
        )
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for metric in ALL_METRICS:
        assert f"# TYPE {metric._name}" in text, metric._name
    assert 'rerank_requests_total{dialect="cohere-v1",route="/v1/rerank",status="200"}' in text
    assert 'rerank_requests_total{dialect="tei",route="/rerank",status="200"}' in text
    assert 'rerank_requests_total{dialect="jina",route="/v1/rerank",status="200"}' in text
    assert 'rerank_request_duration_seconds_bucket{dialect="cohere-v1",le="+Inf"}' in text


def test_metrics_route_needs_a_key_only_when_asked(make_settings):
    from gateway.app import create_app

    protected = create_app(make_settings(api_keys=["k1", "k2"], metrics_require_auth=True))
    with TestClient(protected) as client:
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "error" in wrong.json()
        assert client.get("/metrics", headers={"Authorization": "Bearer k2"}).status_code == 200
    open_metrics = create_app(make_settings(api_keys=["k1"], metrics_require_auth=False))
    with TestClient(open_metrics) as client:
        assert client.get("/metrics").status_code == 200


# --- a real Prometheus ------------------------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def live_gateway(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("obs-gateway")
    with gateway_server(GATEWAY_PORT, tiny_model_dir, work) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(live_gateway: str, tmp_path_factory: pytest.TempPathFactory):
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if binary is None:
        require_real_component(
            "Prometheus", "the prometheus binary is not installed (apt-get install prometheus)"
        )
    if not _free(PROMETHEUS_PORT):
        require_real_component("Prometheus", f"port {PROMETHEUS_PORT} is taken")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: rerank-gateway\n"
        f"    static_configs:\n      - targets: ['{live_gateway.removeprefix('http://')}']\n"
    )
    log = work / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                require_real_component(
                    "Prometheus", f"it exited with {proc.returncode}: {log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                require_real_component("Prometheus", f"not ready in 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def promql(prometheus_url: str, query: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(prometheus_url: str, query: str, accept, timeout_s: float = 40.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = promql(prometheus_url, query)
        if accept(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"PromQL {query!r} never returned what was expected; last result: {result}")
        time.sleep(0.5)


@pytest.mark.load
def test_prometheus_scrapes_request_counter_and_latency_histogram(live_gateway: str, prometheus: str):
    stop = threading.Event()
    sent = {"cohere": 0, "tei": 0}
    failures: list[str] = []

    def traffic() -> None:
        # Steady traffic while Prometheus scrapes, so rate() sees increases between samples.
        with httpx.Client(base_url=live_gateway, timeout=30) as client:
            while not stop.is_set():
                cohere = client.post("/v1/rerank", json=_rerank_body(), headers=COHERE_SDK)
                tei = client.post("/rerank", json={"query": "bread", "texts": ["Freeze it.", "Coffee."]})
                if (cohere.status_code, tei.status_code) != (200, 200):
                    failures.append(f"cohere {cohere.status_code}, tei {tei.status_code}")
                    return
                sent["cohere"] += 1
                sent["tei"] += 1
                time.sleep(0.1)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        wait_for(prometheus, 'up{job="rerank-gateway"}', lambda r: r and r[0]["value"][1] == "1")
        counter = wait_for(
            prometheus,
            'sum by (dialect, route, status) (rerank_requests_total{status="200", dialect=~"cohere-v1|tei"})',
            lambda r: len(r) == 2 and all(float(s["value"][1]) >= 3 for s in r),
        )
        quantile = wait_for(
            prometheus,
            "histogram_quantile(0.9, sum by (le) "
            '(rate(rerank_request_duration_seconds_bucket{dialect="cohere-v1"}[10s])))',
            lambda r: r and math.isfinite(float(r[0]["value"][1])),
        )
        buckets = promql(prometheus, 'rerank_request_duration_seconds_bucket{dialect="cohere-v1"}')
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failures
    labels = {(s["metric"]["dialect"], s["metric"]["route"]) for s in counter}
    assert labels == {("cohere-v1", "/v1/rerank"), ("tei", "/rerank")}
    assert 0 < float(quantile[0]["value"][1]) < 30
    les = {s["metric"]["le"] for s in buckets}
    assert {"0.005", "1.0", "+Inf"} <= les
    # Scraped values never exceed what was sent (the counter counts requests, not something else).
    cohere = next(s for s in counter if s["metric"]["dialect"] == "cohere-v1")
    assert float(cohere["value"][1]) <= sent["cohere"]


@pytest.mark.load
def test_promtool_accepts_the_metrics_exposition(live_gateway: str):
    promtool = shutil.which("promtool")
    if promtool is None:
        require_real_component("promtool", "not installed (apt-get install prometheus)")
    with httpx.Client(base_url=live_gateway, timeout=30) as client:
        assert client.post("/v1/rerank", json=_rerank_body(), headers=COHERE_SDK).status_code == 200
        exposition = client.get("/metrics").text
    assert "rerank_requests_total{" in exposition
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
