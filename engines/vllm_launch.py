"""The one source of truth for how the vLLM sidecar is launched (tests, compose, Dockerfile.gpu, Modal).

`python -m engines.vllm_launch` reads the options from the environment and execs vLLM;
`python -m engines.vllm_launch --print` prints the command instead. Standard library only: it runs inside
the vLLM image or virtual environment, where the gateway's own dependencies are not installed.
`run_sidecar` runs vLLM as a child instead (`rerank-gateway vllm launch`, `make vllm-up`): its output passes
through, and a known start-up failure (a CPU KV cache that does not fit) ends with one line naming the fix.

Why these flags (README.md, "The scoring contract"):
- `--runner pooling --convert classify` and the `--hf-overrides` below turn the causal LM into a one-row
  classifier whose weight is W["1"] - W["0"], read at the last token: raw = logit("1") - logit("0"),
  exactly the official score. `--task score` no longer exists in current vLLM.
- The gateway sends token ids built by core.contract (never text) to `/classify` with
  `use_activation: false`, so vLLM's sigmoid is skipped and its template-less text joining never runs.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_MODEL = "mixedbread-ai/mxbai-rerank-base-v2"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Qwen2ForCausalLM -> sequence classifier with one logit = logit("1") - logit("0"), as the official wrapper.
HF_OVERRIDES = {
    "architectures": ["Qwen2ForSequenceClassification"],
    "classifier_from_token": ["0", "1"],
    "method": "from_2_way_softmax",
}
# The contract's longest prompt is max_length (8192) plus the 79-token template; leave headroom.
DEFAULT_MAX_MODEL_LEN = 8448
DEFAULT_PORT = 8000

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True, slots=True)
class VllmLaunchOptions:
    """Everything that decides how the sidecar starts."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    # The name the gateway sends in `model` (RERANK_VLLM_MODEL); vLLM defaults it to `model`.
    served_model_name: str | None = None
    # "auto" follows the checkpoint (bf16 for mxbai v2); float32 gives CPU scores equal to ONNX fp32.
    dtype: str = "auto"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Eager start-up is fast (no CUDA graph capture); compiled mode has higher GPU throughput.
    enforce_eager: bool = False
    # Note: vLLM's --api-key guards only /v1, /v2 and /inference; /classify stays open (keep it private).
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()
    # The interpreter that has vLLM installed (its own venv or image: it needs transformers 5.x).
    python: str = sys.executable
    # Extra environment for the sidecar process, e.g. VLLM_CPU_KVCACHE_SPACE on CPU.
    env: tuple[tuple[str, str], ...] = ()

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


def build_argv(opts: VllmLaunchOptions) -> list[str]:
    """The command line that starts the sidecar."""
    argv = [
        opts.python,
        "-m",
        SERVER_MODULE,
        "--model",
        opts.model,
        "--runner",
        "pooling",
        "--convert",
        "classify",
        "--hf-overrides",
        json.dumps(HF_OVERRIDES, separators=(",", ":")),
        "--dtype",
        opts.dtype,
        "--max-model-len",
        str(opts.max_model_len),
        "--host",
        opts.host,
        "--port",
        str(opts.port),
    ]
    if opts.revision:
        argv += ["--revision", opts.revision]
    if opts.served_model_name:
        argv += ["--served-model-name", opts.served_model_name]
    if opts.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(opts.max_num_batched_tokens)]
    if opts.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    if opts.enforce_eager:
        argv.append("--enforce-eager")
    if opts.api_key:
        argv += ["--api-key", opts.api_key]
    argv += list(opts.extra_args)
    return argv


def build_env(opts: VllmLaunchOptions, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The sidecar's environment: `base` (default: this process's) plus the options' extra variables."""
    env = dict(os.environ if base is None else base)
    env.update(dict(opts.env))
    return env


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: use true or false")


def _number(environ: Mapping[str, str], name: str, kind: type, default):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


# Environment variable -> option. RERANK_MODEL, RERANK_MODEL_REVISION, RERANK_VLLM_MODEL and
# RERANK_VLLM_API_KEY are the gateway's own settings too, so one .env configures both sides consistently.
ENV_VARS = {
    "model": "RERANK_MODEL",
    "revision": "RERANK_MODEL_REVISION",
    "served_model_name": "RERANK_VLLM_MODEL",
    "dtype": "RERANK_VLLM_DTYPE",
    "max_model_len": "RERANK_VLLM_MAX_MODEL_LEN",
    "max_num_seqs": "RERANK_VLLM_MAX_NUM_SEQS",
    "max_num_batched_tokens": "RERANK_VLLM_MAX_NUM_BATCHED_TOKENS",
    "gpu_memory_utilization": "RERANK_VLLM_GPU_MEMORY_UTILIZATION",
    "host": "RERANK_VLLM_HOST",
    "port": "RERANK_VLLM_PORT",
    "enforce_eager": "RERANK_VLLM_ENFORCE_EAGER",
    "api_key": "RERANK_VLLM_API_KEY",
    "extra_args": "RERANK_VLLM_EXTRA_ARGS",
    "python": "RERANK_VLLM_PYTHON",
}


def options_from_env(environ: Mapping[str, str] | None = None) -> VllmLaunchOptions:
    """Launch options from environment variables (see ENV_VARS); unset ones keep their defaults."""
    e = os.environ if environ is None else environ
    d = VllmLaunchOptions()
    return VllmLaunchOptions(
        model=e.get(ENV_VARS["model"]) or d.model,
        revision=e.get(ENV_VARS["revision"]) or None,
        served_model_name=e.get(ENV_VARS["served_model_name"]) or None,
        dtype=e.get(ENV_VARS["dtype"]) or d.dtype,
        max_model_len=_number(e, ENV_VARS["max_model_len"], int, d.max_model_len),
        max_num_seqs=_number(e, ENV_VARS["max_num_seqs"], int, None),
        max_num_batched_tokens=_number(e, ENV_VARS["max_num_batched_tokens"], int, None),
        gpu_memory_utilization=_number(e, ENV_VARS["gpu_memory_utilization"], float, None),
        host=e.get(ENV_VARS["host"]) or d.host,
        port=_number(e, ENV_VARS["port"], int, d.port),
        enforce_eager=_flag(e, ENV_VARS["enforce_eager"], d.enforce_eager),
        api_key=e.get(ENV_VARS["api_key"]) or None,
        extra_args=tuple(shlex.split(e.get(ENV_VARS["extra_args"], ""))),
        python=e.get(ENV_VARS["python"]) or d.python,
    )


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line overrides of the environment, shared by `python -m engines.vllm_launch` and the CLI."""
    parser.add_argument("--model", help=f"Hub id or local folder (env {ENV_VARS['model']}).")
    parser.add_argument("--revision", help=f"Hub revision (env {ENV_VARS['revision']}).")
    parser.add_argument(
        "--served-model-name", help=f"Name the gateway sends (env {ENV_VARS['served_model_name']})."
    )
    parser.add_argument("--dtype", help=f"auto, bfloat16, float16 or float32 (env {ENV_VARS['dtype']}).")
    parser.add_argument("--max-model-len", type=int, help=f"env {ENV_VARS['max_model_len']}")
    parser.add_argument("--max-num-seqs", type=int, help=f"env {ENV_VARS['max_num_seqs']}")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, help=f"env {ENV_VARS['gpu_memory_utilization']}"
    )
    parser.add_argument("--host", help=f"env {ENV_VARS['host']}")
    parser.add_argument("--port", type=int, help=f"env {ENV_VARS['port']}")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"Skip CUDA graphs: fast start-up (env {ENV_VARS['enforce_eager']}).",
    )
    parser.add_argument("--python", help=f"Interpreter with vLLM installed (env {ENV_VARS['python']}).")


def apply_overrides(opts: VllmLaunchOptions, args: argparse.Namespace) -> VllmLaunchOptions:
    """`opts` with every command-line override that was given."""
    fields = (
        "model",
        "revision",
        "served_model_name",
        "dtype",
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "host",
        "port",
        "enforce_eager",
        "python",
    )
    changes = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return dataclasses.replace(opts, **changes)


def format_command(opts: VllmLaunchOptions) -> str:
    """A copy-pasteable shell line: the options' extra environment, then the argv."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in opts.env)
    cmd = shlex.join(build_argv(opts))
    return f"{env} {cmd}" if env else cmd


def exec_sidecar(opts: VllmLaunchOptions) -> None:
    """Replace this process with the vLLM server (signals then reach vLLM directly)."""
    argv = build_argv(opts)
    os.execvpe(argv[0], argv, build_env(opts))  # noqa: S606 - argv is a list, no shell involved


# --- running vLLM as a child, and explaining how it died -----------------------------------------------

# What vllm-cpu (0.32: vllm/v1/worker/cpu_worker.py, vllm/v1/core/kv_cache_utils.py) raises when its KV cache
# does not fit. Without VLLM_CPU_KVCACHE_SPACE it reserves --gpu-memory-utilization (0.9) of all RAM, which
# a busy or small machine does not have; an explicit size of a GiB or two is plenty for a reranker.
_RESERVE_FAILED = (
    "is less than desired CPU memory utilization",
    "No available memory for the cache blocks",
)
_EXPLICIT_TOO_LARGE = "allocation is less than requested memory for kv"
_TOO_SMALL = "KV cache is needed, which is larger than the available KV cache memory"
_GIB = re.compile(r"\(([\d.]+)/([\d.]+) GiB\)")
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def explain_failure(lines: Iterable[str], env: Mapping[str, str] | None = None) -> str | None:
    """One line naming the fix when vLLM's output shows a KV cache that does not fit, else None."""
    e = os.environ if env is None else env
    space = (e.get(KVCACHE_ENV) or "").strip()
    for line in lines:
        if any(marker in line for marker in _RESERVE_FAILED):
            found = _GIB.search(line)
            free = f" ({found.group(1)} of {found.group(2)} GiB free)" if found else ""
            return (
                f"vLLM could not reserve its KV cache in CPU memory{free}: set {KVCACHE_ENV}=1 "
                "(GiB; 1-2 is plenty for a reranker) and launch again"
            )
        if _EXPLICIT_TOO_LARGE in line:
            if space:
                return f"{KVCACHE_ENV}={space} (GiB) is more than the free memory: lower it (1 is enough)"
            return (
                f"vLLM could not size its KV cache in CPU memory: set {KVCACHE_ENV}=1 (GiB) and launch again"
            )
        if _TOO_SMALL in line:
            return (
                f"the KV cache is too small for one prompt of --max-model-len: raise {KVCACHE_ENV} (CPU, "
                "GiB) or RERANK_VLLM_GPU_MEMORY_UTILIZATION (GPU), or lower RERANK_VLLM_MAX_MODEL_LEN"
            )
    return None


# A line that explains a failure is kept; every other line only passes through.
def _is_explaining(line: str) -> bool:
    return any(m in line for m in (*_RESERVE_FAILED, _EXPLICIT_TOO_LARGE, _TOO_SMALL))


def _pump(source, sink, kept: list[str]) -> None:
    """Copy `source` to `sink` as it arrives (progress bars redraw with \\r, not lines), keeping the lines
    that explain a failure."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    partial = ""
    fd = source.fileno()
    while chunk := os.read(fd, 65536):
        text = decoder.decode(chunk)
        try:
            sink.write(text)
            sink.flush()
        except (OSError, ValueError):  # the terminal went away: keep draining so vLLM never blocks
            pass
        *lines, partial = (partial + text).split("\n")
        partial = partial[-65536:]
        kept.extend(line for line in lines if _is_explaining(line))
    if _is_explaining(partial):
        kept.append(partial)
    source.close()


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def run_sidecar(opts: VllmLaunchOptions, *, stdout=None, stderr=None) -> tuple[int, str | None]:
    """Run the vLLM server as a child until it exits: (exit status, one line explaining the failure or None).

    Its output passes through to `stdout` / `stderr` (default: this process's). The child has its own
    process group and every stop signal this process receives is forwarded to it once, so Ctrl-C stops vLLM
    the way it would stop it run directly (a terminal's Ctrl-C would otherwise reach vLLM twice).
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    env = build_env(opts)
    # Handlers first: a signal that arrives while vLLM starts is held, then forwarded once it runs.
    child: list[subprocess.Popen] = []
    held: list[int] = []

    def forward(signum: int, _frame) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            held.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _FORWARDED:
            previous[sig] = signal.signal(sig, forward)
    try:
        proc = subprocess.Popen(  # an argv list: no shell involved
            build_argv(opts), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0
        )
        child.append(proc)
        for signum in held:
            proc.send_signal(signum)
        kept: list[str] = []
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out, kept), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err, kept), daemon=True),
        ]
        for t in pumps:
            t.start()
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for t in pumps:
        t.join()
    status = 128 - rc if rc < 0 else rc
    return status, (explain_failure(kept, env) if status != 0 else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.vllm_launch",
        description="Launch the vLLM sidecar for mxbai-rerank-v2 with exact raw scores.",
    )
    parser.add_argument("--print", action="store_true", help="Print the command instead of running it.")
    add_override_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    try:
        opts = apply_overrides(options_from_env(), args)
    except ValueError as exc:
        parser.error(str(exc))
    if extra:
        # Unknown flags go to vLLM untouched (after an optional `--`).
        extra = extra[1:] if extra[0] == "--" else extra
        opts = dataclasses.replace(opts, extra_args=(*opts.extra_args, *extra))
    if args.print:
        print(format_command(opts))
        return 0
    exec_sidecar(opts)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
