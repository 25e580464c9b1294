"""`rerank-gateway export`: prepare a model folder (ONNX fp32, optionally int8, tokenizer, manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.fidelity import DEFAULT_INT8_BOUND, FidelityBound


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="Export a hub id or HF folder to a prepared ONNX model folder (needs the export extra).",
        description=(
            "Download (or read) a mxbai-rerank-v2 model, export an ONNX graph whose only output is the raw "
            "score at the last position, optionally quantize it to int8, verify the graphs against torch "
            "(and int8 against fp32, refusing an unfaithful int8 graph) and write rerank_manifest.json. "
            "Serve the result with RERANK_MODEL_PATH=OUT."
        ),
    )
    parser.add_argument(
        "source", metavar="SOURCE", help="Hub id (owner/name) or a local Hugging Face folder."
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="New folder to write.")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (hub ids only).")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="none: the fp32 graph only (the default engine). int8: also model.int8.onnx (per-token int8 "
        "activations, per-channel weights), written only if it follows fp32 within the bounds below.",
    )
    parser.add_argument(
        "--int8-max-abs-diff",
        type=float,
        default=DEFAULT_INT8_BOUND.max_abs_diff,
        metavar="X",
        help="int8 gate: largest |int8 - fp32| raw score allowed on the samples (default %(default)s).",
    )
    parser.add_argument(
        "--int8-min-spearman",
        type=float,
        default=DEFAULT_INT8_BOUND.spearman_min,
        metavar="R",
        help="int8 gate: lowest per-query Spearman correlation with fp32 allowed (default %(default)s).",
    )
    parser.add_argument(
        "--verify-samples",
        type=int,
        default=16,
        metavar="N",
        help="Sample prompts the graphs are checked on against torch (default 16).",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, metavar="D", help="Hugging Face download cache folder."
    )
    parser.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17).")
    parser.add_argument(
        "--estimated-max",
        type=float,
        default=None,
        metavar="X",
        help="Normalization constant recorded in the manifest (normalized = sigmoid(raw - X / 2)). Default: "
        "from the hub id or the model's shape (9.0 base-v2, 12.0 large-v2); required for other shapes.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.verify_samples < 2:
        raise ValueError(f"--verify-samples must be at least 2, not {args.verify_samples}")
    # torch and transformers are imported only now: `--help` and serving never load them.
    from engines.export import DEFAULT_OPSET, export_model

    report = export_model(
        args.source,
        args.out,
        revision=args.revision,
        quantize=args.quantize,
        int8_bound=FidelityBound(args.int8_max_abs_diff, args.int8_min_spearman),
        verify_samples=args.verify_samples,
        cache_dir=args.cache_dir,
        opset=args.opset or DEFAULT_OPSET,
        estimated_max=args.estimated_max,
    )
    print(f"prepared model folder: {report.out_dir} (serve it with RERANK_MODEL_PATH={report.out_dir})")
    return 0
