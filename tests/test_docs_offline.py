"""/docs and /redoc render with no network: every asset is served by the gateway itself.

The HTML is checked for external references, the assets are fetched from the gateway, and headless
Chromium (Debian's `chromium`), with every non-local request sent to a dead proxy, must render Swagger
UI's operation list and ReDoc's operation titles.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.dialects import PATHS as RERANK_PATHS
from tests.conftest import free_port, gateway_server, require_real_component


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with gateway_server(free_port(), tiny_model_dir, tmp_path_factory.mktemp("docs")) as url:
        yield url


def references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|url)\s*[=:(]\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(base_url, page):
    response = httpx.get(base_url + page, timeout=30)
    assert response.status_code == 200
    html = response.text
    refs = references(html)
    assert refs, "no asset references found in the page"
    for ref in refs:
        assert ref.startswith("/"), f"{page} loads {ref} from elsewhere"
        assert not ref.startswith("//"), f"{page} loads {ref} from elsewhere"
    assert "cdn" not in html.lower()
    assert "fonts.googleapis" not in html
    # Every referenced asset comes from the gateway, non-empty.
    for ref in refs:
        asset = httpx.get(base_url + ref, timeout=30)
        assert asset.status_code == 200, ref
        assert len(asset.content) > (100 if ref.endswith(".png") else 1000) or ref.endswith(".json"), ref


def chromium_dom(url: str, tmp_path: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        require_real_component("chromium", "no chromium binary on PATH (apt-get install chromium)")
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            # Anything not on this host goes to a dead proxy (loopback bypasses proxies implicitly):
            # the page must render from the gateway's own assets.
            "--proxy-server=http://127.0.0.1:9",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_swagger_ui_renders_the_operations_offline(base_url, tmp_path):
    dom = chromium_dom(base_url + "/docs", tmp_path)
    rendered = set(re.findall(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', dom))
    assert set(RERANK_PATHS) <= rendered, dom[-2000:]
    assert {"/health", "/ready", "/v1/models"} <= rendered


def test_redoc_renders_the_operations_offline(base_url, tmp_path):
    spec = httpx.get(base_url + "/openapi.json", timeout=30).json()
    titles = {spec["paths"][path]["post"]["summary"] for path in RERANK_PATHS}
    assert len(titles) > 3  # one per dialect combination, from the dialect registry
    dom = chromium_dom(base_url + "/redoc", tmp_path)
    for title in titles:
        assert title in dom, (title, dom[-2000:])
