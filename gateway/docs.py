"""OpenAPI extras and the /docs (Swagger UI) and /redoc pages, served from local assets (no CDN).

The assets are Swagger UI's and ReDoc's bundles shipped by the `fastapi-offline` package (or a copy put in
gateway/static/ at build time, which wins when present), so the docs render on an air-gapped host.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.dialects import Dialect

STATIC_URL = "/static/docs"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")
LOCAL_STATIC = Path(__file__).resolve().parent / "static"
REF_TEMPLATE = "#/components/schemas/{model}"


def assets_dir() -> Path:
    """Where the Swagger UI / ReDoc bundles are: gateway/static/ if filled, else fastapi-offline's copy."""
    if all((LOCAL_STATIC / name).is_file() for name in ASSETS):
        return LOCAL_STATIC
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "static"
        if all((folder / name).is_file() for name in ASSETS):
            return folder
    raise RuntimeError(
        "the Swagger UI / ReDoc assets are missing: pip install fastapi-offline, or copy "
        f"{', '.join(ASSETS)} into {LOCAL_STATIC}"
    )


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc with local assets under /static/docs."""
    folder = assets_dir()
    app.mount(STATIC_URL, StaticFiles(directory=folder), name="docs-static")
    favicon = f"{STATIC_URL}/favicon.png" if (folder / "favicon.png").is_file() else ""

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{favicon}" if favicon else "data:,",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{favicon}" if favicon else "data:,",
            with_google_fonts=False,
        )


def json_body(dialects: Sequence[Dialect], description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself: anyOf the dialects' requests, with one
    example per dialect (from the registry)."""
    models = list(dict.fromkeys(d.request_model for d in dialects))
    schema: dict[str, Any] = {"anyOf": [{"$ref": REF_TEMPLATE.format(model=m.__name__)} for m in models]}
    if len(models) == 1:
        schema = schema["anyOf"][0]
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {
                    "schema": schema,
                    "examples": {d.name: {"summary": d.title, "value": d.example} for d in dialects},
                }
            },
        }
    }


def install_openapi(
    app: FastAPI,
    extra_models: list[type[BaseModel]],
    *,
    auth_enabled: bool,
    settings: Settings | None = None,
) -> None:
    """Generate the spec once, adding the schemas of models that routes reference by hand.

    Without API keys the Bearer scheme is left out, so the spec says what the server does: no auth. With
    `settings`, the request schemas carry this server's limits (see `describe_request_limits`).
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        _, defs = models_json_schema([(m, "validation") for m in extra_models], ref_template=REF_TEMPLATE)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        if settings is not None:
            describe_request_limits(schemas, settings)
        if not auth_enabled:
            spec["components"].pop("securitySchemes", None)
            for operations in spec.get("paths", {}).values():
                for operation in operations.values():
                    operation.pop("security", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


# Request schemas of the query + documents dialects (Cohere v1/v2, Jina; Mixedbread names them `input`).
DOCUMENTS_DIALECTS = ("CohereV1Request", "CohereV2Request", "JinaRequest")
MIXEDBREAD_DIALECT = "MixedbreadRequest"
# Request schemas whose documents are strings only.
STRING_DIALECTS = {"TeiRequest": "texts", "InfinityRequest": "documents"}
SCORE_DIALECT = "ScoreRequest"
# What the server refuses although no JSON Schema can say it, because it depends on other values of the
# body; each with its error code.
CROSS_FIELD_RULES = (
    "A document object must hold at least one of `rank_fields` (else 400 `missing_rank_field`); documents "
    "x max_chunks_per_doc (capped at RERANK_MAX_CHUNKS_PER_DOC_LIMIT) must stay under 10,000 (else 400 "
    "`too_many_chunks`)."
)
SCORE_RULES = (
    "`text_1` is one query: a string, a list of one, or one query repeated for each `text_2` item (else 400 "
    "`several_queries`)."
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of a pydantic `X | None` property (the property itself when it has none)."""
    for branch in schema.get("anyOf", ()):
        if branch.get("type") != "null":
            return branch
    return schema


def describe_request_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """Put what the server enforces into the request schemas, so that schema-valid means accepted.

    The limits come from the settings (RERANK_MAX_*); the rest is what the handler checks beyond pydantic:
    without `rank_fields` a document object needs a string `text`; `rank_fields` names at least one field;
    a body with `texts` is TEI, so the other dialects of the same routes cannot carry it;
    `return_raw_scores` is the alias of `raw_scores`.
    """
    doc_chars = settings.max_document_chars
    string_doc = {"type": "string", "maxLength": doc_chars}
    object_doc = {"type": "object", "additionalProperties": True}
    text_doc = {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string", "maxLength": doc_chars}},
        "additionalProperties": True,
    }

    def documents(schema: dict[str, Any], field: str) -> None:
        props = schema["properties"]
        props["query"]["maxLength"] = settings.max_query_chars
        props[field]["maxItems"] = settings.max_documents_per_request
        props[field]["minItems"] = 1
        props[field]["items"] = {"anyOf": [string_doc, object_doc]}
        _nullable(props["rank_fields"])["minItems"] = 1
        # Without rank_fields (absent or null) the `text` field is ranked: objects must have it.
        schema["if"] = {"required": ["rank_fields"], "properties": {"rank_fields": {"type": "array"}}}
        schema["else"] = {"properties": {field: {"items": {"anyOf": [string_doc, text_doc]}}}}
        schema["description"] = f"{schema.get('description', '')} {CROSS_FIELD_RULES}".strip()

    for name in DOCUMENTS_DIALECTS:
        schema = schemas.get(name)
        if schema is None:
            continue
        documents(schema, "documents")
        schema["properties"]["return_raw_scores"] = {
            "type": "boolean",
            "description": "Same as `raw_scores` (vLLM's name); when both are sent, `raw_scores` wins.",
        }
        schema["not"] = {"required": ["texts"]}
    if MIXEDBREAD_DIALECT in schemas:
        documents(schemas[MIXEDBREAD_DIALECT], "input")
    for name, field in STRING_DIALECTS.items():
        schema = schemas.get(name)
        if schema is None:
            continue
        props = schema["properties"]
        props["query"]["maxLength"] = settings.max_query_chars
        props[field]["maxItems"] = settings.max_documents_per_request
        props[field]["items"] = string_doc
    score = schemas.get(SCORE_DIALECT)
    if score is not None:
        props = score["properties"]
        query = {"type": "string", "maxLength": settings.max_query_chars}
        props["text_1"]["anyOf"] = [
            query,
            {"type": "array", "items": query, "minItems": 1, "maxItems": settings.max_documents_per_request},
        ]
        props["text_2"]["anyOf"] = [
            string_doc,
            {
                "type": "array",
                "items": string_doc,
                "minItems": 1,
                "maxItems": settings.max_documents_per_request,
            },
        ]
        score["description"] = f"{score.get('description', '')} {SCORE_RULES}".strip()
