"""`rerank-gateway vllm args|launch|health`: the sidecar's launch command, the launch itself, a probe."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

from engines import vllm_launch


class _VllmCommandError(ValueError):
    """A user-facing error of this command (the CLI prints ValueError as one line)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "vllm",
        help="Launch or probe the vLLM sidecar (exact mxbai-v2 scores over /classify).",
        description=(
            "The vLLM sidecar is launched from one place (engines/vllm_launch.py): options come from "
            "RERANK_MODEL, RERANK_MODEL_REVISION, RERANK_VLLM_MODEL, RERANK_VLLM_DTYPE, "
            "RERANK_VLLM_MAX_MODEL_LEN, RERANK_VLLM_MAX_NUM_SEQS, RERANK_VLLM_GPU_MEMORY_UTILIZATION, "
            "RERANK_VLLM_HOST, RERANK_VLLM_PORT, RERANK_VLLM_ENFORCE_EAGER, RERANK_VLLM_API_KEY, "
            "RERANK_VLLM_EXTRA_ARGS and RERANK_VLLM_PYTHON, overridden by the flags below."
        ),
    )
    actions = parser.add_subparsers(dest="vllm_action", metavar="ACTION", required=True)

    args_p = actions.add_parser("args", help="Print the launch command.")
    vllm_launch.add_override_arguments(args_p)
    args_p.add_argument("--json", action="store_true", help="Print the argv as a JSON list.")
    args_p.add_argument("extra", nargs=argparse.REMAINDER, help="Further vLLM flags, after --.")
    args_p.set_defaults(func=run_args)

    launch_p = actions.add_parser(
        "launch",
        help="Run the vLLM server until it exits (a KV cache that does not fit: one line naming the fix).",
    )
    vllm_launch.add_override_arguments(launch_p)
    launch_p.add_argument("extra", nargs=argparse.REMAINDER, help="Further vLLM flags, after --.")
    launch_p.set_defaults(func=run_launch)

    health_p = actions.add_parser("health", help="Probe a running sidecar (/health, /v1/models).")
    health_p.add_argument("--url", help="Sidecar base URL (default: RERANK_VLLM_URL).")
    health_p.add_argument("--timeout-ms", type=int, default=2_000, help="Per-request timeout.")
    health_p.set_defaults(func=run_health)


def _options(args: argparse.Namespace) -> vllm_launch.VllmLaunchOptions:
    opts = vllm_launch.apply_overrides(vllm_launch.options_from_env(), args)
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return dataclasses.replace(opts, extra_args=(*opts.extra_args, *extra)) if extra else opts


def run_args(args: argparse.Namespace) -> int:
    opts = _options(args)
    if args.json:
        print(json.dumps(vllm_launch.build_argv(opts)))
    else:
        print(vllm_launch.format_command(opts))
    return 0


def run_launch(args: argparse.Namespace) -> int:
    opts = _options(args)
    if opts.python == sys.executable and importlib.util.find_spec("vllm") is None:
        raise _VllmCommandError(
            "vLLM is not installed in this Python: point RERANK_VLLM_PYTHON (or --python) at the "
            "interpreter of its own environment (scripts/install_vllm.sh creates .venv-vllm)"
        )
    print(vllm_launch.format_command(opts), file=sys.stderr, flush=True)
    status, explanation = vllm_launch.run_sidecar(opts)
    if explanation:
        # vLLM's own traceback runs to ~170 lines; its cause and the fix end the output in one line.
        print(f"rerank-gateway vllm launch: error: {explanation}", file=sys.stderr, flush=True)
    return status


def run_health(args: argparse.Namespace) -> int:
    from engines.vllm_pool import parse_urls
    from gateway.config import get_settings

    settings = get_settings()
    value = args.url or settings.vllm_url
    if not value:
        raise _VllmCommandError("no sidecar URL: pass --url or set RERANK_VLLM_URL")
    try:
        urls = parse_urls(value)
    except ValueError as exc:
        raise _VllmCommandError(str(exc)) from exc
    reports = [_health_report(url, args.timeout_ms / 1000, settings.vllm_api_key) for url in urls]
    # One sidecar: its report; a pool (several comma-separated URLs): one report per backend.
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0 if all(r.get("health") == 200 for r in reports) else 1


def _health_report(url: str, timeout: float, api_key: str | None) -> dict[str, object]:
    import httpx

    report: dict[str, object] = {"url": url}
    try:
        # /v1/models sits behind vLLM's --api-key; /health does not.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(timeout=timeout, headers=headers, trust_env=False) as client:
            health = client.get(f"{url}/health")
            report["health"] = health.status_code
            if health.status_code == 200:
                models = client.get(f"{url}/v1/models")
                if models.status_code == 200:
                    report["models"] = [
                        {"id": m.get("id"), "max_model_len": m.get("max_model_len")}
                        for m in models.json().get("data", [])
                    ]
    except httpx.HTTPError as exc:
        report["health"] = None
        report["error"] = repr(exc)
    return report
