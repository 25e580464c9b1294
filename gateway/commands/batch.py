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
    # Every input, the server's request limits included, is checked before the model loads.
    top_k = local.parse_top_k(args.top_k, "--top-k")
    cases = local.load_cases(
        args.cases_file, default_instruction=args.instruction or None, default_top_k=top_k
    )
    settings = local.settings_from_args(args)
    engine_name = local.engine_name_from_args(args, settings)
    requests = [
        local.rerank_query(
            case.query,
            case.documents,
            instruction=case.instruction,
            top_k=case.top_k,
            normalize=args.normalize,
        )
        for case in cases
    ]
    for i, request in enumerate(requests):
        local.check_limits(settings, request, f"cases file {str(args.cases_file)!r}, case {i}")
    local.check_model_location(settings)

    async def go() -> dict:
        from tqdm import tqdm

        service, model_dir = await local.open_service(
            settings, engine_name, normalize=args.normalize, quiet=args.quiet
        )
        started = time.perf_counter()
        results = []
        pairs = 0
        try:
            with tqdm(total=len(cases), desc="cases", unit="case", disable=args.quiet) as bar:
                for case, request in zip(cases, requests, strict=True):
                    outcome = await service.rerank(request)
                    results.append(
                        local.results(
                            outcome,
                            case.documents,
                            normalize=args.normalize,
                            return_documents=not args.no_documents,
                        )
                    )
                    pairs += outcome.pairs_scored
                    bar.update(1)
        finally:
            await service.engine.close()
        elapsed_s = time.perf_counter() - started
        local.info(
            args.quiet,
            f"scored {pairs} pairs in {len(cases)} cases in {elapsed_s:.2f} s"
            + (f" ({pairs / elapsed_s:.1f} pairs/s)" if elapsed_s > 0 else ""),
        )
        return {"engine": engine_name, "model": str(model_dir), "results": results}

    out = local.run(go())
    local.write_json(out, args.output)
    if args.output:
        local.info(args.quiet, f"wrote {args.output}")
    return 0
