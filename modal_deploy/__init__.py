"""Modal deployments: the vLLM sidecar on a GPU (vllm_app) and the CPU gateway (cpu_app)."""
