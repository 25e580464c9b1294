# Thin entry points into the rerank-gateway CLI, pytest, docker compose and Modal.
# Every variable can be overridden: `make local-run QUERY="..." DOCS=my_docs.json`.
# Model settings come from RERANK_* variables (or .env), e.g. RERANK_MODEL_PATH=/path/to/prepared.

VENV ?= .venv
BIN := $(if $(wildcard $(VENV)/bin/rerank-gateway),$(VENV)/bin/,)
CLI := $(BIN)rerank-gateway
PYTHON := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
MODAL := $(BIN)modal
COMPOSE ?= docker compose
DOCKER ?= docker

# `make run` binds 127.0.0.1 (this machine only); `make run HOST=0.0.0.0` serves the network.
HOST ?= 127.0.0.1
PORT ?= 8080
URL ?= http://$(HOST):$(PORT)
QUERY ?= How do I keep bread fresh?
DOCS ?= data/example_docs.json
CASES ?= data/rerank_samples.json
TOP_K ?= 5
# The vLLM sidecar's own environment (scripts/install_vllm.sh creates it; transformers 5.x lives there).
VLLM_PYTHON ?= $(if $(wildcard .venv-vllm/bin/python),.venv-vllm/bin/python,python3)
VLLM_PORT ?= 8000
VLLM_URL ?= http://127.0.0.1:$(VLLM_PORT)
# Benchmarks. The seed's names (BENCH_DATASET, BENCH_LIMIT, BENCH_URL, BENCH_METRICS) and BEIR_DATASET all work.
BEIR_DATASET ?= scifact
BENCH_DATASET ?= $(BEIR_DATASET)
BENCH_LIMIT ?= 100
BENCH_TOP_K ?= 20
BENCH_SOURCE_DIR ?=
WORKLOAD ?= out/workload-$(BENCH_DATASET).json
BENCH_URL ?= $(URL)
BENCH_METRICS ?= 1
BENCH_OUT ?= out/bench
CONCURRENCY ?= 1,8,32
REQUESTS ?= 200
# The vLLM image's environment, passed through to `make vllm-up-docker` when set.
VLLM_DOCKER_ENV := RERANK_MODEL RERANK_MODEL_REVISION RERANK_VLLM_MODEL RERANK_VLLM_DTYPE \
	RERANK_VLLM_MAX_MODEL_LEN RERANK_VLLM_MAX_NUM_SEQS RERANK_VLLM_MAX_NUM_BATCHED_TOKENS \
	RERANK_VLLM_GPU_MEMORY_UTILIZATION RERANK_VLLM_ENFORCE_EAGER RERANK_VLLM_API_KEY RERANK_VLLM_EXTRA_ARGS HF_TOKEN

.PHONY: help setup run local-run local-run-cpu local-run-mps batch-run vllm-up vllm-up-docker vllm-health \
	vllm-client gpu-check modal-serve modal-deploy modal-smoke modal-serve-cpu modal-deploy-cpu modal-smoke-cpu \
	modal-serve-onnx modal-deploy-onnx bench-build bench-run test test-fast compose-up compose-up-gpu \
	compose-down image-cpu image-gpu podman-setup

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## Create .venv with every extra (torch CPU build).
	bash scripts/setup.sh

run:  ## Set up .venv if needed and serve on HOST:PORT (default 127.0.0.1:8080; HOST=0.0.0.0 for the network).
	bash scripts/serve.sh --host $(HOST) --port $(PORT)

local-run:  ## Rank DOCS against QUERY in this process (ONNX engine).
	$(CLI) rank --query "$(QUERY)" --docs-file $(DOCS) --top-k $(TOP_K) --normalize

local-run-cpu:  ## The same, forced onto the CPU.
	$(CLI) rank --query "$(QUERY)" --docs-file $(DOCS) --top-k $(TOP_K) --normalize --device cpu

local-run-mps:  ## The same on Apple's GPU (MPS, macOS): the official wrapper in torch (reference extra).
	@if [ "$$(uname -s)" = Darwin ]; then \
		$(CLI) rank --query "$(QUERY)" --docs-file $(DOCS) --top-k $(TOP_K) --normalize --engine reference --device mps; \
	else \
		echo "local-run-mps: MPS is Apple's GPU (macOS only); here run make local-run (ONNX on the CPU)"; \
	fi

batch-run:  ## Rank every case of CASES and print the results.
	$(CLI) batch --cases-file $(CASES) --top-k $(TOP_K)

vllm-up:  ## Start the vLLM sidecar on VLLM_PORT (flags from engines/vllm_launch.py).
	$(CLI) vllm launch --python $(VLLM_PYTHON) --port $(VLLM_PORT)

vllm-up-docker: image-gpu  ## The vLLM sidecar's image (Dockerfile.gpu) on an NVIDIA GPU, published on VLLM_PORT.
	$(DOCKER) run --rm --gpus all --ipc=host -p $(VLLM_PORT):8000 $(foreach v,$(VLLM_DOCKER_ENV),-e $(v)) \
		-v rerank-hf-cache:/root/.cache/huggingface rerank-gateway-vllm:local

gpu-check:  ## Is there an NVIDIA GPU for vLLM? Lists it (nvidia-smi), else says where to go instead.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; \
	else \
		echo "gpu-check: no NVIDIA GPU here (nvidia-smi finds none): serve on the CPU with make run, or vLLM-CPU with make vllm-up"; \
	fi

vllm-health:  ## Probe the sidecar at VLLM_URL.
	$(CLI) vllm health --url $(VLLM_URL)

vllm-client:  ## Rerank DOCS through the gateway at URL (start it with RERANK_VLLM_URL=$(VLLM_URL) make run).
	$(CLI) client --url $(URL) --query "$(QUERY)" --docs-file $(DOCS) --top-n $(TOP_K)

modal-serve:  ## vLLM on a Modal GPU, hot-reloading dev deployment.
	$(MODAL) serve -m modal_deploy.vllm_app

modal-deploy:  ## Deploy vLLM on a Modal GPU, then smoke-test the URL.
	$(MODAL) deploy -m modal_deploy.vllm_app
	$(MODAL) run -m modal_deploy.vllm_app

modal-smoke:  ## Smoke-test the deployed vLLM app.
	$(MODAL) run -m modal_deploy.vllm_app

modal-serve-cpu:  ## The CPU gateway on Modal, hot-reloading dev deployment.
	$(MODAL) serve -m modal_deploy.cpu_app

modal-deploy-cpu:  ## Deploy the CPU gateway on Modal, then smoke-test the URL.
	$(MODAL) deploy -m modal_deploy.cpu_app
	$(MODAL) run -m modal_deploy.cpu_app

modal-smoke-cpu:  ## Smoke-test the deployed CPU gateway.
	$(MODAL) run -m modal_deploy.cpu_app

modal-serve-onnx: modal-serve-cpu  ## The seed's name for modal-serve-cpu (the CPU gateway runs ONNX).

modal-deploy-onnx: modal-deploy-cpu  ## The seed's name for modal-deploy-cpu.

bench-build:  ## BEIR workload: BENCH_LIMIT queries of BENCH_DATASET into WORKLOAD (BENCH_SOURCE_DIR: offline).
	$(CLI) bench build-beir --dataset $(BENCH_DATASET) --queries $(BENCH_LIMIT) --top-k $(BENCH_TOP_K) \
		--out $(WORKLOAD)$(if $(BENCH_SOURCE_DIR), --source-dir $(BENCH_SOURCE_DIR))

bench-run:  ## Benchmark the gateway at BENCH_URL with WORKLOAD at CONCURRENCY; BENCH_METRICS=1 polls /metrics.
	$(CLI) bench run --url $(BENCH_URL) --workload $(WORKLOAD) --concurrency $(CONCURRENCY) \
		--requests $(REQUESTS)$(if $(filter 1 true yes on,$(BENCH_METRICS)), --metrics) --out $(BENCH_OUT)

test:  ## Everything CI runs (.ci/run): set-up, default suite, vllm, container and load tiers.
	bash scripts/test.sh

test-fast:  ## The default suite only.
	$(PYTHON) -m pytest -q

compose-up:  ## CPU gateway + Prometheus with docker compose.
	$(COMPOSE) up -d --build

compose-up-gpu:  ## + the vLLM sidecar on the GPU; the gateway routes to it.
	COMPOSE_PROFILES=gpu $(COMPOSE) up -d --build

compose-down:
	COMPOSE_PROFILES=gpu $(COMPOSE) down

image-cpu:  ## Build the CPU gateway image.
	$(DOCKER) build -f Dockerfile.cpu -t rerank-gateway:cpu .

image-gpu:  ## Build the vLLM sidecar image.
	$(DOCKER) build -f Dockerfile.gpu -t rerank-gateway-vllm:local .

podman-setup:  ## podman, runc, a local base image and the compose plugin (no Docker engine needed).
	bash scripts/podman_setup.sh
