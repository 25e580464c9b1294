"""The README's commands, as written, against what the project really has.

Every `rerank-gateway ...` line of the README's bash blocks names a subcommand and flags that its `--help`
lists; every `curl` example is sent, body as written, to a real `rerank-gateway serve` and answered 200; every
`make` line dry-runs (`make -n`) with its variables; every file or folder a command names exists. The long
commands themselves (scripts/test.sh, serve.sh, compose, podman, vLLM, Modal, kubectl) run in their tiers or
are checked by tests/test_ops.py, tests/test_container.py and tests/test_kubernetes.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port, gateway_server

README = (REPO_ROOT / "README.md").read_text()


def bash_lines() -> list[str]:
    """The README's bash blocks as commands: continuation lines joined, comments and blanks dropped."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line)


CLI_LINES = [strip_comment(line) for line in bash_lines() if line.startswith("rerank-gateway ")]
CURL_LINES = [line for line in bash_lines() if line.startswith("curl ")]
MAKE_LINES = [strip_comment(line) for line in bash_lines() if re.match(r"^(\w+=\S+ )*make ", line)]


def test_the_readme_shows_the_commands_these_tests_check():
    assert len(CLI_LINES) >= 8
    assert len(CURL_LINES) >= 2
    assert len(MAKE_LINES) >= 3


def cli_help(*words: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *words, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("line", CLI_LINES, ids=[" ".join(line.split()[:3]) for line in CLI_LINES])
def test_readme_cli_line_names_a_real_subcommand_and_real_flags(line: str):
    words = line.split()
    sub = words[1]
    # `rerank-gateway vllm args|launch|health` lists alternatives; `bench build-beir` has a second word.
    subs = [[sub, s] for s in words[2].split("|")] if sub in ("vllm", "bench") else [[sub]]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
    for words_ in subs:
        text = cli_help(*words_)
        missing = sorted(f for f in flags if f not in text)
        assert not missing, (
            f"README: `{line}` uses {missing}, which `{' '.join(words_)} --help` does not list"
        )
    # Files the line names exist in the repository.
    for path in re.findall(r"\b(data/[\w./-]+)", line):
        assert (REPO_ROOT / path).is_file(), f"README names {path}, which is not in the repository"


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"RERANK_QUANTIZATION": "fp32", "RERANK_ESTIMATED_MAX": "12.0"}
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("readme"), env=env) as base:
        yield base


@pytest.mark.parametrize("line", CURL_LINES, ids=[f"curl-{i}" for i in range(len(CURL_LINES))])
def test_readme_curl_example_is_answered_as_written(line: str, url: str):
    argv = shlex.split(line)
    target = next(a for a in argv[1:] if not a.startswith("-") and "localhost:" in a)
    path = "/" + target.split("/", 1)[1]
    body = json.loads(argv[argv.index("-d") + 1])
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    results = payload["results"] if isinstance(payload, dict) else payload
    assert results, payload
    if "top_n" in body:
        assert len(results) == body["top_n"]


@pytest.mark.parametrize("line", MAKE_LINES, ids=[f"make-{i}" for i in range(len(MAKE_LINES))])
def test_readme_make_line_dry_runs(line: str):
    words = shlex.split(line)
    env_vars = [w for w in words[: words.index("make")] if "=" in w]
    args = words[words.index("make") + 1 :]
    run = subprocess.run(
        ["make", "-n", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**dict(v.split("=", 1) for v in env_vars), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, f"`{line}`: {run.stderr[-1000:]}"
    for var in (a for a in args if "=" in a):
        assert var.split("=", 1)[1] in run.stdout, f"`{line}`: {var} does not reach the command"


def test_readme_paths_exist():
    named = set(re.findall(r"`((?:scripts|bench|deploy|loadtest|modal_deploy|data|tests)/[\w./-]+)`", README))
    missing = sorted(p for p in named if "*" not in p and not (REPO_ROOT / p.rstrip("/")).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
