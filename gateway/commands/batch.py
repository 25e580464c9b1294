"""`rerank-gateway batch`: rank many (query, documents) cases from one JSON file, in this process."""

from __future__ import annotations

import argparse
import time

from gateway import local


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "batch",
        help="Rank every case of a cases file and print (or write) JSON results.",
        description=(
            'Read {"cases": [{"query", "documents", "instruction"?, "top_k"?}]} and print '
            '{"engine", "model", "results": [[{index, score, document}, ...] per case]}. '
            "--top-k and --instruction apply to cases that do not set their own."
        ),
    )
    parser.add_argument("--cases-file", required=True, metavar="F", help="JSON cases file.")
    parser.add_argument(
        "--output", "-o", default=None, metavar="OUT", help="Write the JSON here, not stdout."
    )
    local.add_engine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Every input is checked before the model loads.
    top_k = local.parse_top_k(args.top_k, "--top-k")
    cases = local.load_cases(
        args.cases_file, default_instruction=args.instruction or None, default_top_k=top_k
    )
    settings = local.settings_from_args(args)
    engine_name = local.engine_name_from_args(args, settings)
    local.check_model_location(settings)

    async def go() -> dict:
        from tqdm import tqdm

        ranker = await local.LocalRanker.open(settings, engine_name, quiet=args.quiet)
        started = time.perf_counter()
        results = []
        pairs = 0
        try:
            with tqdm(total=len(cases), desc="cases", unit="case", disable=args.quiet) as bar:
                for case in cases:
                    results.append(
                        await ranker.rank(
                            case.query,
                            case.documents,
                            instruction=case.instruction,
                            top_k=case.top_k,
                            normalize=args.normalize,
                            return_documents=not args.no_documents,
                        )
                    )
                    pairs += len(case.documents)
                    bar.update(1)
        finally:
            await ranker.close()
        elapsed_s = time.perf_counter() - started
        local.info(
            args.quiet,
            f"scored {pairs} pairs in {len(cases)} cases in {elapsed_s:.2f} s"
            + (f" ({pairs / elapsed_s:.1f} pairs/s)" if elapsed_s > 0 else ""),
        )
        return {
            "engine": engine_name,
            "model": str(ranker.model_dir) if ranker.model_dir else settings.model,
            "results": results,
        }

    out = local.run(go())
    local.write_json(out, args.output)
    if args.output:
        local.info(args.quiet, f"wrote {args.output}")
    return 0
