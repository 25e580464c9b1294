"""`rerank-gateway export`: prepare a model folder (ONNX fp32 + int8, tokenizer, manifest) for serving."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="Export a hub id or HF folder to a prepared ONNX model folder (needs the export extra).",
        description=(
            "Download (or read) a mxbai-rerank-v2 model, export an ONNX graph whose only output is the raw "
            "score at the last position, optionally quantize it to dynamic int8, verify both graphs against "
            "torch and write rerank_manifest.json. Serve the result with RERANK_MODEL_PATH=OUT."
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
        default="int8",
        help="Also write model.int8.onnx (dynamic int8 weights). Default: int8.",
    )
    parser.add_argument(
        "--per-channel",
        action="store_true",
        help="Quantize weights per output channel instead of per tensor.",
    )
    parser.add_argument(
        "--verify-samples",
        type=int,
        default=8,
        metavar="N",
        help="Sample prompts the graphs are checked on against torch (default 8).",
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
    if args.verify_samples < 1:
        raise ValueError(f"--verify-samples must be at least 1, not {args.verify_samples}")
    # torch and transformers are imported only now: `--help` and serving never load them.
    from engines.export import DEFAULT_OPSET, export_model

    report = export_model(
        args.source,
        args.out,
        revision=args.revision,
        quantize=args.quantize,
        per_channel=args.per_channel,
        verify_samples=args.verify_samples,
        cache_dir=args.cache_dir,
        opset=args.opset or DEFAULT_OPSET,
        estimated_max=args.estimated_max,
    )
    print(f"prepared model folder: {report.out_dir} (serve it with RERANK_MODEL_PATH={report.out_dir})")
    return 0
