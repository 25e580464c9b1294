#!/usr/bin/env bash
# Set up .venv (gateway + export extra) on a fresh machine, then serve the gateway.
#   bash scripts/serve.sh [--host H] [--port P]
# Model: RERANK_MODEL_PATH (a prepared folder), else RERANK_MODEL (hub id, exported into
# RERANK_CACHE_DIR on first start). RERANK_VLLM_URL routes to a vLLM sidecar with ONNX as fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! "$VENV/bin/python" -c "import gateway, torch" 2>/dev/null; then
  bash scripts/setup.sh --serve
fi
exec "$VENV/bin/rerank-gateway" serve "$@"
