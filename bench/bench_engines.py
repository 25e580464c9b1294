"""Engine benchmark: the official wrapper (torch fp32) vs the ONNX engine (fp32, int8), interleaved.

Engines: `wrapper` (MxbaiRerankV2.rank), `onnx-fp32` (the default engine), `onnx-int8` (per-token int8
activations x per-channel weights, one prompt per run) and `onnx-int8-tensor`: onnxruntime's dynamic int8
with one activation scale per tensor, what the int8 engine was before it was measured on trained weights
(quantized here from the fp32 graph, for comparison only: it ranks almost at random on trained weights).

On a random-weight model of a real shape (bench/configs/<shape>.config.json; speed depends on the shape
only), 1 query x N documents whose prompts are about 150 and about 300 tokens. Each round times every
engine on every workload, rotating the engine order, so that load from other processes on a shared machine
hits all engines alike; the table reports the median pairs/s over rounds, the ratio to the wrapper, and
memory (RSS growth at load, and peak RSS above the pre-call level while scoring).

The model is built once with tests/tiny_model.build_shaped_model and prepared with this checkout's
`rerank-gateway export --quantize int8` (int8 gate opened: random weights say nothing about fidelity),
cached under .cache/bench-models/ (the prepared folder is keyed by the export code, so it is rebuilt when the
export changes). `--trained` runs the same on the trained model of the base-v2 shape (bench/trained_model.py,
needs the `trained` extra) instead; speed depends only on the shape, fidelity does not. Building and
exporting take several minutes on 2 cores; a full run of the default workload takes 10 to 20 minutes there.

    python bench/bench_engines.py
    python bench/bench_engines.py --docs 8 --rounds 1 --tokens 150        # a quick look

The header names the CPU's vector features (AVX2, AVX-512, VNNI, AMX): int8 gains most where VNNI exists.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CACHE = REPO_ROOT / ".cache" / "bench-models"
ENGINES = ("wrapper", "onnx-fp32", "onnx-int8", "onnx-int8-tensor")
TENSOR_INT8_GRAPH = "model.int8-tensor.onnx"


# --- model -------------------------------------------------------------------------------------------


def _prepare(hf_dir: Path, prepared: Path) -> Path:
    """Export `hf_dir` into `prepared` once (fp32 and int8), plus the per-tensor int8 graph for comparison."""
    if (prepared / ".complete").is_file():
        return prepared
    print(f"exporting {hf_dir} with rerank-gateway export into {prepared} (minutes) ...", file=sys.stderr)
    from gateway.cli import main

    tmp = prepared.with_name(prepared.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The default --verify-samples: they are also the int8 calibration prompts.
    args = ["export", str(hf_dir), "--out", str(tmp), "--quantize", "int8"]
    rc = main([*args, "--int8-max-abs-diff", "1000", "--int8-min-spearman", "-1"])
    if rc != 0:
        raise SystemExit(f"rerank-gateway export failed with exit status {rc}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(tmp / "model.onnx"),
        str(tmp / TENSOR_INT8_GRAPH),
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    (tmp / ".complete").write_text("ok\n")
    tmp.rename(prepared)
    return prepared


def _export_key() -> str:
    from engines import export as export_module
    from engines import quantize as quantize_module

    sources = inspect.getsource(export_module) + inspect.getsource(quantize_module)
    return hashlib.sha256(sources.encode()).hexdigest()[:10]


def shaped_model(shape: str) -> tuple[Path, Path]:
    """(HF folder, prepared folder) of a random-weight model of `shape`, built and exported once."""
    from tests import tiny_model

    hf_dir = CACHE / f"{shape}-random-hf"
    if not (hf_dir / ".complete").is_file():
        print(f"building a random-weight {shape} model in {hf_dir} ...", file=sys.stderr)
        shutil.rmtree(hf_dir, ignore_errors=True)
        tiny_model.build_shaped_model(hf_dir, shape)
        (hf_dir / ".complete").write_text("ok\n")
    return hf_dir, _prepare(hf_dir, CACHE / f"{shape}-random-prepared-{_export_key()}")


def trained(shape: str = "mxbai-rerank-base-v2") -> tuple[Path, Path]:
    """(HF folder, prepared folder) of the trained base-v2-shaped model (bench/trained_model.py)."""
    from bench.trained_model import build_trained_hf_dir

    hf_dir = CACHE / "trained-hf"
    if not (hf_dir / ".complete").is_file():
        shutil.rmtree(hf_dir, ignore_errors=True)
        build_trained_hf_dir(hf_dir, say=lambda m: print(m, file=sys.stderr))
        (hf_dir / ".complete").write_text("ok\n")
    return hf_dir, _prepare(hf_dir, CACHE / f"trained-prepared-{_export_key()}")


def cpu_features() -> str:
    """The vector features that decide int8 and bf16 speed, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown CPU features"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return "CPU: " + (", ".join(have) if have else "no AVX2")


# --- memory --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples this process's RSS every few ms while active; `peak` is the highest seen."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# --- engines -------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One engine under test: a blocking `score(query, documents) -> scores` and its memory figures."""

    name: str
    score: Callable[[str, list[str]], list[float]]
    load_rss_bytes: int
    peak_extra_bytes: int = 0


def load_runners(
    names: list[str], hf_dir: Path, prepared: Path, args, warmup: tuple[str, list[str]]
) -> list[Runner]:
    """Load each engine and warm it up; its RSS growth is measured after the warm-up (weights are mmapped)."""
    from core.contract import PromptBuilder

    builder = PromptBuilder.from_dir(prepared)
    loop = asyncio.new_event_loop()
    runners = []
    for name in names:
        before = rss_bytes()
        if name == "wrapper":
            import torch
            from mxbai_rerank import MxbaiRerankV2

            wrapper = MxbaiRerankV2(
                str(hf_dir), device="cpu", torch_dtype=torch.float32, disable_transformers_warnings=True
            )

            def score(query, documents, wrapper=wrapper):
                # The wrapper as its users call it: rank() with an explicit batch size.
                results = wrapper.rank(
                    query,
                    documents,
                    batch_size=args.wrapper_batch,
                    top_k=len(documents),
                    return_documents=False,
                )
                out = [0.0] * len(documents)
                for r in results:
                    out[r.index] = r.score
                return out

        elif name == "onnx-int8-tensor":
            import numpy as np
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(
                str(prepared / TENSOR_INT8_GRAPH), options, providers=["CPUExecutionProvider"]
            )

            def score(query, documents, session=session):
                # One prompt per run, as the old int8 engine ran it.
                out = []
                for p in builder.build(query, documents):
                    ids = np.array([p.input_ids], dtype=np.int64)
                    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                    out.append(float(session.run(["score"], feed)[0][0]))
                return out

        else:
            from engines.onnx_engine import OnnxEngine

            engine = OnnxEngine(
                prepared,
                quantization=name.removeprefix("onnx-"),
                intra_op_threads=args.threads,
                verify_hashes=False,
            )
            loop.run_until_complete(engine.start())

            def score(query, documents, engine=engine):
                prompts = builder.build(query, documents)
                return loop.run_until_complete(engine.score(prompts)).scores

        score(*warmup)
        runners.append(Runner(name, score, rss_bytes() - before))
    return runners


# --- workload and measurement -------------------------------------------------------------------------


def workload(prepared: Path, tokens: int, docs: int) -> tuple[str, list[str], list[int]]:
    from core.contract import PromptBuilder
    from tests import cases

    builder = PromptBuilder.from_dir(prepared)
    query, _ = cases.pair_of_prompt_tokens(builder.count_tokens, tokens, seed=tokens)
    documents = [
        cases.pair_of_prompt_tokens(builder.count_tokens, tokens, seed=tokens + j)[1] for j in range(docs)
    ]
    lengths = [len(p) for p in builder.build(query, documents)]
    return query, documents, lengths


def spearman(a, b) -> float:
    from engines.fidelity import spearman as rho

    return rho(a, b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mxbai-rerank-base-v2")
    parser.add_argument(
        "--trained", action="store_true", help="The trained base-v2-shaped model instead of random weights."
    )
    parser.add_argument("--docs", type=int, default=32, help="Documents per query (default 32).")
    parser.add_argument("--tokens", default="150,300", help="Prompt sizes in tokens (default 150,300).")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (median reported).")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"Subset of {','.join(ENGINES)}.")
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)."
    )
    parser.add_argument(
        "--wrapper-batch", type=int, default=8, help="batch_size given to the wrapper's rank()."
    )
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = set(names) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}: choose from {', '.join(ENGINES)}")
    sizes = [int(t) for t in args.tokens.split(",")]

    prepare = trained if args.trained else shaped_model
    if args.prepare_only:
        prepare(args.shape)
        return 0
    # Build and export in a child process: this one's RSS then measures only the engines.
    child = [sys.executable, __file__, "--prepare-only", "--shape", args.shape]
    subprocess.run(child + (["--trained"] if args.trained else []), check=True)
    hf_dir, prepared = prepare(args.shape)
    load_start = os.getloadavg()
    base_rss = rss_bytes()
    workloads = {t: workload(prepared, t, args.docs) for t in sizes}
    warm_query, warm_docs, _ = workloads[sizes[0]]
    runners = load_runners(names, hf_dir, prepared, args, (warm_query, warm_docs[:2]))

    times: dict[tuple[int, str], list[float]] = {}
    scores: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):
        for t in sizes:
            query, documents, _ = workloads[t]
            order = runners[r % len(runners) :] + runners[: r % len(runners)]
            for runner in order:
                before = rss_bytes()
                with PeakRss() as peak:
                    started = time.perf_counter()
                    scores[(t, runner.name)] = runner.score(query, documents)
                    elapsed = time.perf_counter() - started
                runner.peak_extra_bytes = max(runner.peak_extra_bytes, peak.peak - before)
                times.setdefault((t, runner.name), []).append(elapsed)
                print(
                    f"round {r + 1} {t:4d} tokens {runner.name:10s} {len(documents) / elapsed:6.2f} pairs/s",
                    file=sys.stderr,
                    flush=True,
                )
    load_end = os.getloadavg()

    print(
        f"\n{args.shape} {'trained' if args.trained else 'random'} weights, 1 query x {args.docs} documents, "
        f"{args.rounds} interleaved rounds; {cpu_features()}; "
        f"{os.cpu_count()} cores, load average {load_start[0]:.1f} at start and {load_end[0]:.1f} at end "
        f"(other processes share the CPU); wrapper: MxbaiRerankV2.rank(batch_size={args.wrapper_batch}) "
        f"torch {__import__('torch').get_num_threads() if 'wrapper' in names else '-'} threads; onnx: "
        f"intra-op threads {args.threads or 'auto'}, process RSS before loading {base_rss / 2**30:.2f} GiB\n"
    )
    header = (
        f"| {'prompt tokens':>13} | {'engine':10} | {'pairs/s':>7} | {'range':>11} | {'x wrapper':>9} | "
        f"{'RSS at load':>11} | {'peak extra RSS':>14} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for t in sizes:
        lengths = workloads[t][2]
        wrapper_rate = None
        if "wrapper" in names:
            wrapper_rate = statistics.median(args.docs / s for s in times[(t, "wrapper")])
        for runner in runners:
            rates = [args.docs / s for s in times[(t, runner.name)]]
            rate = statistics.median(rates)
            ratio = f"{rate / wrapper_rate:.2f}x" if wrapper_rate else "-"
            label = f"{min(lengths)}-{max(lengths)}"
            print(
                f"| {label:>13} | {runner.name:10} | {rate:7.2f} | {min(rates):5.2f}-{max(rates):5.2f} | "
                f"{ratio:>9} | {runner.load_rss_bytes / 2**30:8.2f} GiB | "
                f"{runner.peak_extra_bytes / 2**30:11.2f} GiB |"
            )
    print()
    for t in sizes:
        have = {n for (tt, n) in scores if tt == t}
        if {"wrapper", "onnx-fp32"} <= have:
            d = max(abs(a - b) for a, b in zip(scores[(t, "wrapper")], scores[(t, "onnx-fp32")], strict=True))
            print(f"{t} tokens: max |onnx fp32 - wrapper| = {d:.2e}")
        for int8 in ("onnx-int8", "onnx-int8-tensor"):
            if {int8, "onnx-fp32"} <= have:
                a, b = scores[(t, int8)], scores[(t, "onnx-fp32")]
                d = max(abs(x - y) for x, y in zip(a, b, strict=True))
                print(f"{t} tokens: max |{int8} - fp32| = {d:.3g}, Spearman = {spearman(a, b):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
