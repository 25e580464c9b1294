"""Property-based fuzzing of every route from the gateway's own OpenAPI spec (schemathesis), over real HTTP.

Valid and invalid requests alike must never get a 5xx, every status must be declared for its route, and
every response (body, content type, headers) must match the spec. The spec describes what the server
accepts, strictly: a schema-valid request is accepted (positive_data_acceptance, schemathesis ST202) and a
schema-invalid one is refused (negative_data_rejection). The one rule a JSON Schema cannot state (a document
object must hold one of the request's own `rank_fields`) is said in the spec's words and exempted here by
its error code only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.config import Settings
from tests.conftest import free_port, gateway_server

# Error codes of the rules the spec states in words only (see gateway.docs.CROSS_FIELD_RULES).
CROSS_FIELD_CODES = {"missing_rank_field", "too_many_chunks", "several_queries"}


def schema_valid_data_is_accepted(ctx, response, case):
    """positive_data_acceptance, less the cross-field rule the spec can only state in words."""
    if response.status_code == 400:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code in CROSS_FIELD_CODES:
            return True
    return positive_data_acceptance(ctx, response, case)


def schema_invalid_data_is_refused(ctx, response, case):
    """negative_data_rejection, with 413 counted as a refusal (over a stated maxLength or maxItems)."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    schema_invalid_data_is_refused,
    schema_valid_data_is_accepted,
]

# Small limits, so the fuzzer reaches the 413 paths too; the spec states them, so schema-valid bodies stay
# within them (the body limit is a byte count no schema states: it leaves room for every schema-valid body).
LIMITS = {
    "max_documents_per_request": 20,
    "max_document_chars": 2000,
    "max_query_chars": 500,
    "max_body_bytes": 1_000_000,
    "chunk_tokens": 16,
    "max_length": 512,
}


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {f"RERANK_{name.upper()}": str(value) for name, value in LIMITS.items()}
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("fuzz"), env=env) as url:
        yield url


# The spec comes from the app factory at collection time (no model needed to build it) with the server's
# limits; the test below checks that the running server serves this same spec.
SPEC = create_app(Settings(_env_file=None, **LIMITS)).openapi()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
EXAMPLES_PER_MODE = 30


def test_the_server_serves_the_spec_and_it_lists_every_route(base_url):
    served = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    assert served["paths"] == SPEC["paths"]
    dialect_routes = {"/v1/rerank", "/rerank", "/v2/rerank", "/v1/reranking", "/score", "/v1/score"}
    other_routes = {"/infinity/rerank", "/health", "/ready", "/v1/models", "/models", "/infinity/models"}
    assert dialect_routes | other_routes <= set(served["paths"])


# Negative (schema-violating) requests only exist for operations that take input.
CASES = [
    (op, mode)
    for op in OPERATIONS
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or op.body or op.headers or op.query
]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{op.label}-{mode.value}" for op, mode in CASES])
def test_no_5xx_and_every_response_matches_the_spec(operation, mode, base_url):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

    check()
