"""`rerank-gateway rank`: rank the documents of a JSON file against one query, in this process."""

from __future__ import annotations

import argparse
import time

from gateway import local


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "rank",
        help="Rank a docs file against a query and print JSON results.",
        description=(
            "Score every document of a JSON file (a list of strings or of objects with 'text') against "
            "QUERY and print [{index, score, document}] best first. score is the raw model score; "
            "--normalize adds relevance_score in 0..1."
        ),
    )
    parser.add_argument("--query", required=True, help="The search query.")
    parser.add_argument("--docs-file", required=True, metavar="F", help="JSON list of documents.")
    local.add_engine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Every input, the server's request limits included, is checked before the model loads.
    query = local.check_query(args.query, "--query")
    documents = local.load_documents(args.docs_file)
    top_k = local.parse_top_k(args.top_k, "--top-k")
    settings = local.settings_from_args(args)
    engine_name = local.engine_name_from_args(args, settings)
    request = local.rerank_query(
        query, documents, instruction=args.instruction, top_k=top_k, normalize=args.normalize
    )
    local.check_limits(settings, request)
    local.check_model_location(settings)

    async def go() -> list[dict]:
        service, _ = await local.open_service(
            settings, engine_name, normalize=args.normalize, quiet=args.quiet
        )
        try:
            started = time.perf_counter()
            outcome = await service.rerank(request)
            local.info(
                args.quiet,
                f"scored {len(documents)} documents in {time.perf_counter() - started:.2f} s",
            )
        finally:
            await service.engine.close()
        return local.results(
            outcome, documents, normalize=args.normalize, return_documents=not args.no_documents
        )

    local.write_json(local.run(go()), None)
    return 0
