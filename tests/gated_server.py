"""`rerank-gateway serve` whose engine waits on a gate the test opens: shutdown tests without timing.

Run as `python -m tests.gated_server --port P` with RERANK_* settings in the environment. It serves what
`rerank-gateway serve` serves, through the same `gateway.http_server.serve_app` (uvicorn, drain, watchdog),
on the prepared model of RERANK_MODEL_PATH, except that every scoring call after the warm-up first waits on
a gate in a worker thread, as an engine busy inside onnxruntime does: the wait cannot be cancelled. SIGUSR1
opens the gate. `rerank_test_gate_waiting` in /metrics counts the calls waiting at it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Gauge

from core.contract import Prompt
from engines.base import Engine, Scored
from gateway.app import create_app
from gateway.compose import build_serving_engine, resolve_model
from gateway.config import Settings
from gateway.http_server import serve_app
from gateway.metrics import REGISTRY
from tests.fakes import DelegatingEngine

GATE_WAITING = Gauge("rerank_test_gate_waiting", "Engine calls waiting at the test gate.", registry=REGISTRY)


class GatedEngine(DelegatingEngine):
    """Passes the first call (the gateway's warm-up) through; every later call waits for the gate first."""

    def __init__(self, inner: Engine, gate: threading.Event) -> None:
        super().__init__(inner)
        self.gate = gate
        self.calls = 0
        # Its own threads: a call stuck at the gate must not hold a thread the engine or asyncio needs.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="test-gate")

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        self.calls += 1
        if self.calls > 1:
            GATE_WAITING.inc()
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self.gate.wait)
            finally:
                GATE_WAITING.dec()
        return await self.inner.score(prompts)

    async def close(self) -> None:
        await self.inner.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings(host="127.0.0.1", port=args.port)
    model_dir = resolve_model(settings)
    gate = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: gate.set())
    engine = GatedEngine(build_serving_engine(settings, model_dir), gate)
    return serve_app(create_app(settings, model_dir=model_dir, engine=engine), settings)


if __name__ == "__main__":
    raise SystemExit(main())
