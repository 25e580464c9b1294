#!/usr/bin/env bash
# End-to-end check of the compose first-start path with podman as the Docker engine (no registry needed):
# builds the exporter and runtime targets of Dockerfile.cpu, then `docker compose up gateway` runs model-prep
# (exports the tiny test model into the models folder), starts the gateway, and one
# /v1/rerank request is checked; a second `up` must find the prepared copy and skip the export.
#   bash scripts/container_smoke.sh          (after scripts/podman_setup.sh; uses .cache/test-models)
# Torch comes from a local wheelhouse when WHEELS (default /opt/wheels) holds a CPU wheel, else from the
# CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-18330}
WHEELS=${WHEELS:-/opt/wheels}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/.cache/podman/containers.conf}
COMPOSE_BIN=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
HF_DIR=$(ls -d .cache/test-models/tiny-hf-* 2>/dev/null | grep -v '\.lock$' | head -1)
[[ -n "$HF_DIR" ]] || { echo "no tiny model under .cache/test-models: run the test suite once first" >&2; exit 1; }

work=$(mktemp -d /tmp/rerank-smoke.XXXXXX)
project="rerank-smoke-$$"
service_pid=""
cleanup() {
  DOCKER_HOST="unix://$work/podman.sock" "$COMPOSE_BIN" -f docker-compose.yml --env-file /dev/null -p "$project" \
    down --timeout 10 >/dev/null 2>&1 || true
  [[ -n "$service_pid" ]] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

build=(podman build --format docker -f Dockerfile.cpu --build-arg BASE_IMAGE=localhost/debian:bookworm-min)
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  build+=(-v /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro --build-arg PIP_CERT=/run/build-ca.crt)
fi
if compgen -G "$WHEELS/torch-*+cpu-*.whl" >/dev/null; then
  build+=(-v "$WHEELS:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels
          --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
t0=$(date +%s)
"${build[@]}" --target exporter -t localhost/rerank-gateway-exporter:local . >"$work/build-exporter.log" 2>&1 \
  || { tail -30 "$work/build-exporter.log"; exit 1; }
"${build[@]}" --target runtime -t localhost/rerank-gateway:smoke . >"$work/build-runtime.log" 2>&1 \
  || { tail -30 "$work/build-runtime.log"; exit 1; }
echo "smoke: images built in $(( $(date +%s) - t0 ))s"

podman system service --time=0 "unix://$work/podman.sock" >"$work/service.log" 2>&1 &
service_pid=$!
for _ in $(seq 1 100); do [[ -S "$work/podman.sock" ]] && break; sleep 0.1; done

mkdir -p "$work/models"
cp -r "$HF_DIR" "$work/models/src"
chmod -R a+rwX "$work/models"
compose() {
  DOCKER_HOST="unix://$work/podman.sock" RERANK_IMAGE=localhost/rerank-gateway:smoke \
    RERANK_MODELS_VOLUME="$work/models" RERANK_MODEL_PATH=/models/src RERANK_ESTIMATED_MAX=12 RERANK_PORT="$PORT" \
    "$COMPOSE_BIN" -f docker-compose.yml --env-file /dev/null -p "$project" "$@"
}
t0=$(date +%s)
compose up -d --no-build gateway >"$work/up.log" 2>&1 || { cat "$work/up.log"; compose logs; exit 1; }
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 1; done
echo "smoke: first start (export + serve) ready in $(( $(date +%s) - t0 ))s"
body='{"query": "How do I keep bread fresh?", "documents": ["Keep bread in a paper bag.", "Espresso is coffee."]}'
curl -sf -X POST "http://127.0.0.1:$PORT/v1/rerank" -H 'content-type: application/json' -d "$body" \
  | .venv/bin/python -c 'import json, sys; r = json.load(sys.stdin)["results"]; assert sorted(x["index"] for x in r) == [0, 1], r; print("smoke: /v1/rerank ->", r)'
manifest=$(ls "$work"/models/prepared/*/rerank_manifest.json)
before=$(stat -c %Y "$manifest")
t0=$(date +%s)
compose up -d --no-build --force-recreate gateway >"$work/up2.log" 2>&1 || { cat "$work/up2.log"; exit 1; }
[[ $(stat -c %Y "$manifest") == "$before" ]] || { echo "model-prep exported again" >&2; exit 1; }
echo "smoke: second start in $(( $(date +%s) - t0 ))s (model-prep found the prepared copy)"
echo "smoke: passed"
