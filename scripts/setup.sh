#!/usr/bin/env bash
# Set up a fresh machine for rerank-gateway: the Python environment (.venv) with every extra the tests use.
#   scripts/setup.sh            -> .venv with the gateway, export, reference, bench and dev extras
#   scripts/setup.sh --serve    -> .venv with the gateway and the export extra only (what `make run` needs)
# torch: the CPU build. On machines whose pip has no local torch wheel, set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# so pip does not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/progress.sh
source scripts/progress.sh

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
extras="dev"
[[ "${1:-}" == "--serve" ]] && extras="export"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch first and pinned, so nothing later resolves an unpinned (CUDA) torch.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Hundreds of MB: pip's own download bar, and a line every 30 s while it unpacks.
  echo "setup: installing torch==$TORCH_VERSION (CPU build)"
  with_progress "installing torch" "${pip[@]}" install --progress-bar on "torch==$TORCH_VERSION" \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing rerank-gateway[$extras]"
with_progress "installing rerank-gateway[$extras]" "${pip[@]}" install -q -e ".[$extras]"
echo "setup: done in $(( $(date +%s) - start ))s ($VENV)"
echo "setup: rerank-gateway is $VENV/bin/rerank-gateway; \`source $VENV/bin/activate\` puts it on PATH"
