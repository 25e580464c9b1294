"""What both Modal apps share: the model, pinned versions, environment knobs and the smoke tests.

Module-level values are read from the deploying machine's environment when `modal deploy` imports the app;
the apps copy what their containers need into the image environment, so a container that imports this
module again sees the same values.
"""

from __future__ import annotations

import os
import time

MINUTES = 60  # seconds

DEFAULT_MODEL = "mixedbread-ai/mxbai-rerank-base-v2"
MODEL = os.environ.get("RERANK_MODEL") or DEFAULT_MODEL
# Pin a commit for reproducible deploys; "main" follows the hub.
MODEL_REVISION = os.environ.get("RERANK_MODEL_REVISION") or "main"

PYTHON_VERSION = "3.11"
# The gateway's runtime dependencies at the versions the test suite runs with (each satisfies pyproject.toml's
# range; tests/test_deploy_files.py checks that). No torch: serving runs on onnxruntime.
SERVING_REQUIREMENTS = (
    "fastapi==0.165.0",
    "fastapi-offline==1.7.7",
    "uvicorn[standard]==0.54.0",
    "httpx==0.28.1",
    "pydantic==2.14.4",
    "pydantic-settings==2.16.3",
    "tokenizers==0.22.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
    "prometheus-client==0.26.0",
    "huggingface_hub==0.36.2",
    "tqdm==4.70.1",
)
# The export extra (torch comes from its CPU wheel index: the default index resolves the CUDA build).
TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
EXPORT_REQUIREMENTS = (
    "transformers==4.57.6",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "onnx-ir==1.1.0",
    "safetensors==0.8.0",
)
# Local packages every container imports (gateway/static holds the offline docs assets when filled).
LOCAL_PACKAGES = ("core", "gateway", "engines", "modal_deploy")
SOURCE_IGNORE = ("**/__pycache__/**", "**/*.pyc", "**/.pytest_cache/**")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean deploy-time knob: 1/true/yes/on or 0/false/no/off."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: use true or false")


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    """An integer deploy-time knob with a lower bound."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


SMOKE_QUERY = "What is the capital of France?"
SMOKE_DOCUMENTS = (
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower was finished in 1889.",
)


def wait_healthy(base_url: str, *, timeout_s: float, path: str = "/health") -> None:
    """Poll `path` until it answers 200 (a cold start loads the model first)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(base_url.rstrip("/") + path, timeout=30)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(5)
    raise RuntimeError(f"{base_url}{path} not healthy after {timeout_s:.0f}s ({last})")


def smoke_test_gateway(base_url: str, *, api_key: str | None = None, timeout_s: float = 10 * MINUTES) -> None:
    """The deployed gateway answers /ready, Cohere-style /v1/rerank and TEI-style /rerank sensibly."""
    import httpx

    base = base_url.rstrip("/")
    wait_healthy(base, timeout_s=timeout_s, path="/ready")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        cohere = client.post(
            "/v1/rerank", json={"query": SMOKE_QUERY, "documents": list(SMOKE_DOCUMENTS), "top_n": 2}
        )
        cohere.raise_for_status()
        results = cohere.json()["results"]
        assert len(results) == 2, results
        assert results[0]["index"] == 1, f"expected the Paris document first, got {results}"
        tei = client.post("/rerank", json={"query": SMOKE_QUERY, "texts": list(SMOKE_DOCUMENTS)})
        tei.raise_for_status()
        ranked = tei.json()
        assert sorted(r["index"] for r in ranked) == [0, 1, 2], ranked
        assert ranked[0]["index"] == 1, ranked
    print(f"smoke test passed: {base} (/ready, /v1/rerank, /rerank)")
    print(f"top result: {results[0]}")
