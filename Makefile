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
BEIR_DATASET ?= scifact
WORKLOAD ?= out/workload-$(BEIR_DATASET).json
BENCH_OUT ?= out/bench
CONCURRENCY ?= 1,8,32
REQUESTS ?= 200

.PHONY: help setup run local-run local-run-cpu batch-run vllm-up vllm-health vllm-client \
	modal-serve modal-deploy modal-smoke modal-serve-cpu modal-deploy-cpu modal-smoke-cpu \
	bench-build bench-run test test-fast compose-up compose-up-gpu compose-down image-cpu image-gpu \
	podman-setup

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## Create .venv with every extra (torch CPU build).
	bash scripts/setup.sh

run:  ## Set up .venv if needed and serve on HOST:PORT (RERANK_MODEL_PATH or RERANK_MODEL; RERANK_VLLM_URL adds vLLM).
	bash scripts/serve.sh --host $(HOST) --port $(PORT)

local-run:  ## Rank DOCS against QUERY in this process (ONNX engine).
	$(CLI) rank --query "$(QUERY)" --docs-file $(DOCS) --top-k $(TOP_K) --normalize

local-run-cpu:  ## The same, forced onto the CPU.
	$(CLI) rank --query "$(QUERY)" --docs-file $(DOCS) --top-k $(TOP_K) --normalize --device cpu

batch-run:  ## Rank every case of CASES and print the results.
	$(CLI) batch --cases-file $(CASES) --top-k $(TOP_K)

vllm-up:  ## Start the vLLM sidecar on VLLM_PORT (flags from engines/vllm_launch.py).
	$(CLI) vllm launch --python $(VLLM_PYTHON) --port $(VLLM_PORT)

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

bench-build:  ## Build a BEIR rerank workload (BEIR_DATASET) into WORKLOAD.
	$(CLI) bench build-beir --dataset $(BEIR_DATASET) --out $(WORKLOAD)

bench-run:  ## Benchmark the gateway at URL with WORKLOAD; tables and plots in BENCH_OUT.
	$(CLI) bench run --url $(URL) --workload $(WORKLOAD) --concurrency $(CONCURRENCY) \
		--requests $(REQUESTS) --metrics --out $(BENCH_OUT)

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
