"""OpenAPI extras and the /docs (Swagger UI) and /redoc pages, served from local assets (no CDN).

The assets are Swagger UI's and ReDoc's bundles shipped by the `fastapi-offline` package (or a copy put in
gateway/static/ at build time, which wins when present), so the docs render on an air-gapped host.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

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


def json_body(models: list[type[BaseModel]], description: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself: anyOf the given models."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {
                    "schema": {"anyOf": [{"$ref": REF_TEMPLATE.format(model=m.__name__)} for m in models]}
                }
            },
        }
    }


def install_openapi(app: FastAPI, extra_models: list[type[BaseModel]], *, auth_enabled: bool) -> None:
    """Generate the spec once, adding the schemas of models that routes reference by hand.

    Without API keys the Bearer scheme is left out, so the spec says what the server does: no auth.
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
        if not auth_enabled:
            spec["components"].pop("securitySchemes", None)
            for operations in spec.get("paths", {}).values():
                for operation in operations.values():
                    operation.pop("security", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
