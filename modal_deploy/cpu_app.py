"""Modal: the gateway on CPU (ONNX Runtime fp32), the same ASGI app as `rerank-gateway serve`.

Deploy and smoke-test (from the repository root, with a Modal token):

    modal deploy -m modal_deploy.cpu_app      # builds the images; the export image's build step exports and
                                              # the model into the `rerank-models` volume once (ONNX fp32)
    modal run -m modal_deploy.cpu_app         # /ready, POST /v1/rerank and POST /rerank on the deployed URL

    curl -X POST https://<workspace>--rerank-gateway-cpu-web.modal.run/v1/rerank \
         -H 'content-type: application/json' -d '{"query": "...", "documents": ["...", "..."]}'

Serving containers have no torch: 4 CPUs, 4 GiB, 0 to 20 replicas. The model is prepared once, at image
build, by `prepare_model` (torch CPU + the export extra) into the volume; rerun it after deleting the volume
with `modal run -m modal_deploy.cpu_app::prepare_model`.
Deploy-time environment: RERANK_MODEL, RERANK_MODEL_REVISION, RERANK_MODAL_CPU_MAX_INPUTS (concurrent
requests per replica, default 32: the scheduler batches them), RERANK_MODAL_MAX_CONTAINERS (default 20),
RERANK_API_KEYS (optional Bearer keys, baked into the serving image's environment).
"""

from __future__ import annotations

import os

import modal

from modal_deploy import common

MODELS_DIR = "/models"
CPU_CORES = 4.0
MEMORY_MIB = 4096
MIN_CONTAINERS = 0
MAX_CONTAINERS = common.env_int("RERANK_MODAL_MAX_CONTAINERS", 20)
MAX_INPUTS = common.env_int("RERANK_MODAL_CPU_MAX_INPUTS", 32)

MODEL = common.MODEL
MODEL_REVISION = common.MODEL_REVISION

app = modal.App("rerank-gateway-cpu")

models_vol = modal.Volume.from_name("rerank-models", create_if_missing=True)

# Settings the gateway reads (gateway.config.Settings, RERANK_ prefix). The serving containers find the
# prepared model at RERANK_CACHE_DIR/prepared/<model>@<revision>, where prepare_model writes it.
GATEWAY_ENV = {
    "RERANK_MODEL": MODEL,
    "RERANK_MODEL_REVISION": MODEL_REVISION,
    "RERANK_CACHE_DIR": MODELS_DIR,
    "RERANK_QUANTIZATION": "fp32",
    "RERANK_ONNX_INTRA_OP_THREADS": str(int(CPU_CORES)),
    **({"RERANK_API_KEYS": os.environ["RERANK_API_KEYS"]} if os.environ.get("RERANK_API_KEYS") else {}),
}


def prepare_model_into_volume(model: str, revision: str, models_dir: str = MODELS_DIR) -> str:
    """Export the model (ONNX fp32) into the volume, unless a complete copy is already there.

    The gateway's own resolution does it (gateway.compose.resolve_model), so the folder lands exactly
    where the serving containers look for it.
    """
    from gateway.compose import resolve_model
    from gateway.config import Settings

    settings = Settings(
        _env_file=None, model=model, model_revision=revision, cache_dir=models_dir, auto_export=True
    )
    prepared = resolve_model(settings)
    if not modal.is_local():  # inside Modal: make the new files visible to other containers
        models_vol.commit()
    print(f"prepared model folder: {prepared}")
    return str(prepared)


base_image = modal.Image.debian_slim(python_version=common.PYTHON_VERSION).uv_pip_install(
    *common.SERVING_REQUIREMENTS
)

serve_image = (
    base_image.env({**GATEWAY_ENV, "RERANK_AUTO_EXPORT": "false", "HF_HUB_OFFLINE": "1"})
    # Not NON_PYTHON_FILES (the default): gateway/static carries the offline docs assets.
    .add_local_python_source(*common.LOCAL_PACKAGES, ignore=list(common.SOURCE_IGNORE))
)

export_image = (
    base_image.uv_pip_install(f"torch=={common.TORCH_VERSION}", index_url=common.TORCH_CPU_INDEX_URL)
    .uv_pip_install(*common.EXPORT_REQUIREMENTS)
    .env({**GATEWAY_ENV, "RERANK_AUTO_EXPORT": "true", "HF_HOME": f"{MODELS_DIR}/hf"})
    .add_local_python_source(*common.LOCAL_PACKAGES, copy=True, ignore=list(common.SOURCE_IGNORE))
    # Build step: runs once per (model, revision); the image layer is cached afterwards.
    .run_function(
        prepare_model_into_volume,
        volumes={MODELS_DIR: models_vol},
        cpu=CPU_CORES,
        memory=4 * MEMORY_MIB,
        timeout=60 * common.MINUTES,
        kwargs={"model": MODEL, "revision": MODEL_REVISION},
    )
)


@app.function(
    image=export_image,
    volumes={MODELS_DIR: models_vol},
    cpu=CPU_CORES,
    memory=4 * MEMORY_MIB,
    timeout=60 * common.MINUTES,
)
def prepare_model() -> str:
    """Prepare the model into the volume now (after the volume was emptied, or for another revision)."""
    return prepare_model_into_volume(MODEL, MODEL_REVISION)


def gateway_app():
    """The ASGI app, built exactly as `rerank-gateway serve` builds it (settings from the environment)."""
    from gateway.app import create_app
    from gateway.compose import resolve_model
    from gateway.config import get_settings

    settings = get_settings()
    return create_app(settings, model_dir=resolve_model(settings))


@app.function(
    image=serve_image,
    cpu=CPU_CORES,
    memory=MEMORY_MIB,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=5 * common.MINUTES,
    volumes={MODELS_DIR: models_vol.read_only()},
    timeout=10 * common.MINUTES,
)
@modal.concurrent(max_inputs=MAX_INPUTS)
@modal.asgi_app()
def web():
    """POST /v1/rerank, /rerank, /v2/rerank; /health, /ready, /v1/models, /metrics, /docs."""
    return gateway_app()


@app.local_entrypoint()
def main() -> None:
    """Smoke-test the deployed gateway."""
    url = web.get_web_url()
    if not url:
        raise SystemExit("no web URL: deploy first with `modal deploy -m modal_deploy.cpu_app`")
    keys = [k.strip() for k in os.environ.get("RERANK_API_KEYS", "").split(",") if k.strip()]
    common.smoke_test_gateway(url, api_key=keys[0] if keys else None)
