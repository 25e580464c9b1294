"""Property-based fuzzing of every route from the gateway's own OpenAPI spec (schemathesis), over real HTTP.

Valid and invalid requests alike must never get a 5xx, every status must be declared for its route, and
every response (body, content type, headers) must match the spec.
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
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.config import Settings
from tests.conftest import free_port, gateway_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        # Small limits, so the fuzzer reaches the 413 paths too.
        "RERANK_MAX_DOCUMENTS_PER_REQUEST": "20",
        "RERANK_MAX_DOCUMENT_CHARS": "2000",
        "RERANK_MAX_QUERY_CHARS": "500",
        "RERANK_MAX_BODY_BYTES": "20000",
        "RERANK_CHUNK_TOKENS": "16",
        "RERANK_MAX_LENGTH": "512",
    }
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("fuzz"), env=env) as url:
        yield url


# The spec comes from the app factory at collection time (no model needed to build it); the test below
# checks that the running server serves this same spec.
SPEC = create_app(Settings(_env_file=None)).openapi()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
EXAMPLES_PER_MODE = 30


def test_the_server_serves_the_spec_and_it_lists_every_route(base_url):
    served = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    assert served["paths"] == SPEC["paths"]
    assert {"/v1/rerank", "/rerank", "/v2/rerank", "/health", "/ready", "/v1/models"} <= set(served["paths"])


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
