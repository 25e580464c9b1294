"""The vLLM sidecar's launch command: one source (engines/vllm_launch.py) for tests, compose,
Dockerfile.gpu, Modal and `rerank-gateway vllm args`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engines.vllm_launch import HF_OVERRIDES, build_argv, options_from_env


def test_launch_options_come_from_the_environment_and_make_the_mxbai_classifier_flags():
    opts = options_from_env(
        {
            "RERANK_MODEL": "/models/mxbai-rerank-large-v2",
            "RERANK_MODEL_REVISION": "abc123",
            "RERANK_VLLM_MODEL": "mxbai-large",
            "RERANK_VLLM_DTYPE": "bfloat16",
            "RERANK_VLLM_MAX_MODEL_LEN": "4096",
            "RERANK_VLLM_MAX_NUM_SEQS": "32",
            "RERANK_VLLM_GPU_MEMORY_UTILIZATION": "0.8",
            "RERANK_VLLM_HOST": "0.0.0.0",
            "RERANK_VLLM_PORT": "8001",
            "RERANK_VLLM_ENFORCE_EAGER": "true",
            "RERANK_VLLM_EXTRA_ARGS": "--max-num-batched-tokens 16384",
            "RERANK_VLLM_PYTHON": "/opt/vllm/bin/python",
        }
    )
    argv = build_argv(opts)
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model"] == "/models/mxbai-rerank-large-v2"
    assert flags["--revision"] == "abc123"
    assert flags["--served-model-name"] == "mxbai-large"
    assert flags["--runner"] == "pooling"
    assert flags["--convert"] == "classify"
    assert json.loads(flags["--hf-overrides"]) == HF_OVERRIDES
    assert HF_OVERRIDES["method"] == "from_2_way_softmax"
    assert HF_OVERRIDES["classifier_from_token"] == ["0", "1"]  # raw = logit("1") - logit("0")
    assert (flags["--dtype"], flags["--max-model-len"], flags["--max-num-seqs"]) == ("bfloat16", "4096", "32")
    assert (flags["--gpu-memory-utilization"], flags["--host"], flags["--port"]) == ("0.8", "0.0.0.0", "8001")
    assert "--enforce-eager" in argv
    assert argv[-2:] == ["--max-num-batched-tokens", "16384"]
    assert "--task" not in argv  # removed from current vLLM


def test_default_launch_fits_the_contracts_longest_prompt_and_compiles_cuda_graphs():
    opts = options_from_env({})
    argv = build_argv(opts)
    # The contract builds prompts of up to max_length (8192) + the 79-token template.
    assert int(argv[argv.index("--max-model-len") + 1]) >= 8192 + 79
    assert "--enforce-eager" not in argv
    assert opts.served_name == opts.model == "mixedbread-ai/mxbai-rerank-base-v2"
    assert options_from_env({"RERANK_VLLM_ENFORCE_EAGER": "0"}).enforce_eager is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RERANK_VLLM_ENFORCE_EAGER": "maybe"}, "RERANK_VLLM_ENFORCE_EAGER='maybe': use true or false"),
        ({"RERANK_VLLM_PORT": "eighty"}, "RERANK_VLLM_PORT='eighty' is not a valid int"),
    ],
)
def test_launcher_rejects_a_bad_environment_with_one_line(env, message):
    run = subprocess.run(
        [sys.executable, "-m", "engines.vllm_launch", "--print"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_prints_the_same_command_as_the_launcher():
    env = {"PATH": "/usr/bin:/bin", "RERANK_VLLM_PORT": "8123", "RERANK_VLLM_MODEL": "tiny"}
    launcher = subprocess.run(
        [sys.executable, "-m", "engines.vllm_launch", "--print", "--dtype", "float32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cli = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "vllm", "args", "--dtype", "float32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert cli.stdout == launcher.stdout
    assert "--port 8123 --served-model-name tiny" in cli.stdout
