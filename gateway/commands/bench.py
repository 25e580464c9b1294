"""`rerank-gateway bench`: build BEIR rerank workloads, benchmark a running gateway, plot the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,8,32, got {text!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("every concurrency level must be at least 1")
    return levels


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="Build BEIR rerank workloads and benchmark a running gateway.",
        description="Benchmark tools (needs the [bench] extra: matplotlib, ir-datasets).",
    )
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    build = bench_sub.add_parser(
        "build-beir",
        help="Write a rerank workload from a BEIR dataset.",
        description=(
            "Per query: its judged-relevant documents plus negatives that BM25 ranks highest among a seeded "
            "sample of the corpus (topped up at random), shuffled. Downloads the dataset with ir_datasets "
            "(cached under $IR_DATASETS_HOME, default ~/.ir_datasets) unless --source-dir points at an "
            "unzipped BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."
        ),
    )
    build.add_argument(
        "--dataset", required=True, help="BEIR name: scifact, nq, trec-covid, fiqa, ... or beir/<id>."
    )
    build.add_argument("--split", default="test", help="Qrels split (default test).")
    build.add_argument("--out", required=True, metavar="F", help="Workload JSON to write.")
    build.add_argument("--queries", type=_positive, default=100, metavar="N", help="Queries to sample (100).")
    build.add_argument("--top-k", type=_positive, default=20, metavar="K", help="Candidates per query (20).")
    build.add_argument(
        "--negatives",
        type=_non_negative,
        default=None,
        metavar="M",
        help="Most negatives per query (default: fill up to --top-k).",
    )
    build.add_argument("--negative-mining", choices=("bm25", "random"), default="bm25")
    build.add_argument(
        "--pool-size", type=_positive, default=20_000, metavar="N", help="Corpus sample negatives come from."
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--source-dir", metavar="DIR", help="Read a BEIR-format folder instead of downloading."
    )
    build.add_argument("--quiet", action="store_true", help="No progress bars.")
    build.set_defaults(func=run_build)

    run = bench_sub.add_parser(
        "run",
        help="Benchmark a running gateway at several concurrency levels.",
        description=(
            "Send --requests rerank requests per concurrency level, check every answer, and write "
            "results.json, latency_vs_concurrency.png and throughput.png to --out."
        ),
    )
    run.add_argument("--url", required=True, help="Gateway base URL, e.g. http://127.0.0.1:8080.")
    run.add_argument(
        "--workload", required=True, metavar="F", help="Workload JSON (bench build-beir, data/*.json)."
    )
    run.add_argument(
        "--concurrency", type=_levels, default=(1, 8, 32), help="Levels, comma separated (1,8,32)."
    )
    run.add_argument("--requests", type=_positive, default=200, metavar="N", help="Requests per level (200).")
    run.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        metavar="N",
        help="Documents per request (default: the query's).",
    )
    run.add_argument(
        "--dialect",
        choices=("cohere", "cohere-v2", "jina", "tei"),
        default="cohere",
        help="Request body shape.",
    )
    run.add_argument("--top-n", type=_positive, default=None, metavar="N")
    run.add_argument("--model", default=None, help="`model` field to send.")
    run.add_argument("--api-key", default=os.environ.get("RERANK_BENCH_API_KEY"), help="Bearer key.")
    run.add_argument("--timeout-s", type=float, default=60.0)
    run.add_argument(
        "--warmup", type=_non_negative, default=4, metavar="N", help="Unrecorded requests first."
    )
    run.add_argument(
        "--metrics", action="store_true", help="Poll /metrics: batch sizes, queue depth, fallbacks."
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", required=True, metavar="DIR")
    run.add_argument("--quiet", action="store_true", help="No progress bars.")
    run.set_defaults(func=run_bench)

    plot = bench_sub.add_parser(
        "plot",
        help="Plot one or more results.json files on shared axes.",
        description="Write latency_vs_concurrency.png and throughput.png comparing several runs.",
    )
    plot.add_argument("results", nargs="+", metavar="RESULTS_JSON")
    plot.add_argument("--labels", default=None, help="Comma-separated legend labels (default: file names).")
    plot.add_argument("--out", required=True, metavar="DIR")
    plot.set_defaults(func=run_plot)


def run_build(args: argparse.Namespace) -> int:
    from bench.beir_workload import build_workload, open_source, save_workload

    source = open_source(args.dataset, split=args.split, source_dir=args.source_dir)
    workload = build_workload(
        source,
        queries=args.queries,
        top_k=args.top_k,
        negatives=args.negatives,
        negative_mining=args.negative_mining,
        pool_size=args.pool_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    path = save_workload(workload, args.out)
    stats = workload.stats()
    print(
        f"wrote {path}: {stats['queries']} queries, "
        f"{stats['documents_per_query_mean']:.1f} documents per query, "
        f"{stats['document_chars_mean']:.0f} characters per document",
        file=sys.stderr,
    )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from bench.beir_workload import load_workload
    from bench.client import BenchConfig, format_table, run_benchmark, write_results
    from bench.plots import write_plots

    workload = load_workload(args.workload)
    config = BenchConfig(
        url=args.url,
        concurrency=args.concurrency,
        requests=args.requests,
        batch_size=args.batch_size,
        dialect=args.dialect,
        top_n=args.top_n,
        model=args.model,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        warmup_requests=args.warmup,
        poll_metrics=args.metrics,
        seed=args.seed,
    )
    results = asyncio.run(run_benchmark(config, workload, progress=not args.quiet))
    results["plots"] = [p.name for p in write_plots([(workload.name, results)], args.out)]
    path = write_results(results, args.out)
    print(format_table(results))
    print(f"wrote {path} and {', '.join(results['plots'])}", file=sys.stderr)
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from bench.plots import write_plots

    labels = (
        [s.strip() for s in args.labels.split(",")]
        if args.labels
        else [Path(p).parent.name or p for p in args.results]
    )
    if len(labels) != len(args.results):
        raise ValueError(
            f"--labels names {len(labels)} runs but {len(args.results)} results files were given"
        )
    runs = []
    for label, path in zip(labels, args.results, strict=True):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
            raise ValueError(f"{path} is not a `rerank-gateway bench run` results.json")
        runs.append((label, data))
    for written in write_plots(runs, args.out):
        print(written)
    return 0
