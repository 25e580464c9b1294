"""Memory benchmark: RSS of the ONNX engine serving one long prompt, one-shot vs chunked prefill.

For each prompt length, a fresh process loads the engine (fp32), warms it up and scores one short prompt;
its RSS then is `idle`. It scores one prompt of that many tokens; `peak` is the process's peak RSS during
that call (the kernel's VmHWM, reset just before it), `after` the RSS once the call has returned.
`one-shot` runs the prompt through model.onnx in one piece (what every folder exported before the chunk
graph does); `chunked` runs it through model.chunk.onnx a chunk at a time (engines/onnx_engine.py).

The model is a random-weight one of a real shape (bench/configs/<shape>.config.json; memory depends on the
shape only), built once and prepared with this checkout's `rerank-gateway export --quantize none`, cached
under .cache/bench-models/ (the prepared folder is keyed by the export code). Building and exporting take a
few minutes on 2 cores; an 8k-token prompt takes one to three minutes there per mode, and one-shot at 8k
needs about 12 GB of memory.

    python bench/bench_memory.py                                   # 1k/2k/4k/8k, both modes
    python bench/bench_memory.py --tokens 8192 --modes chunked     # one figure
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CACHE = REPO_ROOT / ".cache" / "bench-models"
MODES = ("one-shot", "chunked")
DEFAULT_TOKENS = (1024, 2048, 4096, 8192)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _child(model_dir: str, tokens: int, mode: str, threads: int, chunk_tokens: int) -> dict:
    """Runs in the measured process: load, warm up, idle RSS, one long prompt, peak and after RSS."""
    import asyncio
    import gc
    import random

    from core.contract import Prompt
    from engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(
        model_dir,
        intra_op_threads=threads,
        long_prompt_tokens=None if mode == "one-shot" else 1024,
        chunk_tokens=chunk_tokens,
    )
    asyncio.run(engine.start())
    rng = random.Random(tokens)

    def prompt(n: int) -> Prompt:
        return Prompt("q", "d", None, tuple(rng.randrange(200, 30000) for _ in range(n)))

    engine.score_sync([prompt(150), prompt(120)])
    gc.collect()
    idle = _status_kb("VmRSS")
    if not _reset_peak():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs); peak RSS would include the load")
    started = time.monotonic()
    (score,) = engine.score_sync([prompt(tokens)])
    seconds = time.monotonic() - started
    peak = _status_kb("VmHWM")
    gc.collect()
    after = _status_kb("VmRSS")
    return {
        "tokens": tokens,
        "mode": mode,
        "chunked": engine.chunked,
        "idle_mb": idle / 1024,
        "peak_mb": peak / 1024,
        "after_mb": after / 1024,
        "seconds": seconds,
        "score": score,
    }


def measure(
    model_dir: Path,
    tokens: int,
    mode: str,
    *,
    threads: int = 2,
    chunk_tokens: int = 512,
    timeout_s: float = 900,
) -> dict:
    """Idle, peak and after RSS (MB) of a fresh engine process scoring one `tokens`-token prompt."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from bench.bench_memory import _child; "
        "print('RESULT ' + json.dumps(_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), "
        "int(sys.argv[6]))))"
    )
    args = [str(REPO_ROOT), str(model_dir), str(tokens), mode, str(threads), str(chunk_tokens)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _export_key() -> str:
    from engines import export as export_module

    return hashlib.sha256(inspect.getsource(export_module).encode()).hexdigest()[:10]


def shaped_fp32_model(shape: str) -> Path:
    """The prepared fp32 folder of a random-weight model of `shape`, built and exported once."""
    from gateway.cli import main
    from tests import tiny_model

    hf_dir = CACHE / f"{shape}-random-hf"
    if not (hf_dir / ".complete").is_file():
        print(f"building a random-weight {shape} model in {hf_dir} ...", file=sys.stderr)
        shutil.rmtree(hf_dir, ignore_errors=True)
        tiny_model.build_shaped_model(hf_dir, shape)
        (hf_dir / ".complete").write_text("ok\n")
    prepared = CACHE / f"{shape}-random-fp32-{_export_key()}"
    if not (prepared / ".complete").is_file():
        print(f"exporting {hf_dir} into {prepared} (minutes) ...", file=sys.stderr)
        tmp = prepared.with_name(prepared.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        rc = main(["export", str(hf_dir), "--out", str(tmp), "--quantize", "none", "--verify-samples", "4"])
        if rc != 0:
            raise SystemExit(f"rerank-gateway export failed with exit status {rc}")
        (tmp / ".complete").write_text("ok\n")
        tmp.rename(prepared)
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mxbai-rerank-base-v2")
    parser.add_argument("--model-dir", type=Path, help="a prepared folder instead of the random shaped model")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    args = parser.parse_args(argv)

    model_dir = args.model_dir or shaped_fp32_model(args.shape)
    sizes = {p.name: p.stat().st_size for p in model_dir.iterdir() if p.is_file()}
    print(f"model: {model_dir}")
    print("files: " + ", ".join(f"{n} {s / 1e6:,.0f} MB" for n, s in sorted(sizes.items()) if s > 1e6))
    print(f"threads {args.threads}, chunk {args.chunk_tokens} tokens (chunked above 1,024 tokens)\n")
    header = f"{'tokens':>7} {'mode':>9} {'idle MB':>8} {'peak MB':>8} {'peak/idle':>9} {'after MB':>9}"
    print(header + f" {'after/idle':>10} {'seconds':>8}")
    for tokens in args.tokens:
        for mode in args.modes:
            r = measure(model_dir, tokens, mode, threads=args.threads, chunk_tokens=args.chunk_tokens)
            print(
                f"{tokens:>7,} {mode:>9} {r['idle_mb']:>8,.0f} {r['peak_mb']:>8,.0f} "
                f"{r['peak_mb'] / r['idle_mb']:>9.2f} {r['after_mb']:>9,.0f} "
                f"{r['after_mb'] / r['idle_mb']:>10.3f} {r['seconds']:>8.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
