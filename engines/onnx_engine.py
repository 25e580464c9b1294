"""The in-process ONNX Runtime engine (CPU, fp32 or int8), the gateway's no-torch scorer.

fp32 prompts are sorted by length and cut into sub-batches under a padded-token budget, left padded (the
graph derives positions from the mask, so padding does not change a score); int8 prompts run one per call
(see `rows_per_run`). Everything runs on one executor thread and scores come back in input order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.batching import BatchBudget, plan_batches
from core.contract import Prompt
from engines.base import EngineFailure, EngineInfo, EngineUnavailable, ModelPreparationError, Scored
from engines.model_store import Manifest, verify_model_dir

log = logging.getLogger(__name__)

ENGINE_NAME = "onnx"
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_PAIRS = 64
# Runs of more padded tokens than this hand onnxruntime's arena back to the OS when they end. A long prompt
# grows the arena by its attention matrices (heads x tokens^2 floats) and the arena never shrinks by itself:
# on the trained base-v2-shaped model, one 2,000-token prompt took RSS from 1.44 GB to 2.0 GB and left it
# there; with shrinkage it was back at 1.47 GB. Short runs keep their memory (re-allocating costs time).
SHRINK_ARENA_AFTER_TOKENS = 1024
# onnxruntime raises its own exception classes (not RuntimeError subclasses) from inference.
try:
    from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

    _ORT_ERRORS = tuple(
        getattr(_ort_state, name)
        for name in (
            "Fail",
            "InvalidArgument",
            "InvalidGraph",
            "InvalidProtobuf",
            "NoSuchFile",
            "NoModel",
            "ModelLoaded",
            "NotImplemented",
            "RuntimeException",
            "EPFail",
        )
        if hasattr(_ort_state, name)
    )
    ORT_ERRORS: tuple[type[BaseException], ...] = (*_ORT_ERRORS, RuntimeError, ValueError, MemoryError)
except ImportError:  # pragma: no cover - layout of older onnxruntime wheels
    ORT_ERRORS = (RuntimeError, ValueError, MemoryError)


class OnnxEngine:
    """Scores prompts with an exported two-logit ONNX graph on onnxruntime's CPU provider."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        quantization: str = "fp32",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        verify_hashes: bool = True,
        warmup: bool = True,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_pairs < 1:
            raise ValueError("max_batch_tokens and max_batch_pairs must be at least 1")
        self.model_dir = Path(model_dir)
        self.quantization = quantization
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.verify_hashes = verify_hashes
        self.warmup = warmup
        # int8 rounds every activation to a step of its row's scale, so the last-bit differences that padding
        # and batch shape make in the fp32 parts (attention, norms) flip some roundings: on the trained
        # base-v2-shaped model a prompt scored alone and in a padded batch differed by up to 0.12 raw. One
        # prompt per run makes every int8 score a function of its prompt alone (and costs no throughput on
        # CPU, where a ~150-token prompt already fills the matrix kernels). fp32 is batch-invariant (1.5e-6
        # on the same prompts) and keeps padded batches.
        self.rows_per_run = 1 if quantization == "int8" else max_batch_pairs
        self._info = EngineInfo(
            name=ENGINE_NAME,
            padded=self.rows_per_run > 1,
            max_batch_tokens=max_batch_tokens,
            max_batch_pairs=max_batch_pairs,
            precision=quantization,
        )
        self._session: ort.InferenceSession | None = None
        self._manifest: Manifest | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._start_lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-engine")
        return self._executor

    def _load(self) -> None:
        with self._start_lock:
            if self._session is not None:
                return
            manifest = verify_model_dir(self.model_dir, self.quantization, self.verify_hashes)
            graph = self.model_dir / manifest.graph_file(self.quantization)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = self.inter_op_threads
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            try:
                session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            except ORT_ERRORS as exc:
                raise ModelPreparationError(f"onnxruntime cannot load {graph}: {exc}") from exc
            names = [o.name for o in session.get_outputs()]
            if names != ["score"]:
                raise ModelPreparationError(
                    f"{graph} outputs {names}, expected ['score']; re-export the model"
                )
            self._manifest = manifest
            self._session = session
            if self.warmup:
                self._run([[manifest.pad_id] * 8])
            log.info("onnx engine ready: %s (%s)", graph, self.quantization)

    async def start(self) -> None:
        """Verify the model folder, load the graph and warm it up (idempotent)."""
        if self._session is not None:
            return
        await asyncio.get_running_loop().run_in_executor(self._pool(), self._load)

    async def health(self) -> bool:
        return self._session is not None

    def _run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        session, manifest = self._session, self._manifest
        if session is None or manifest is None:
            raise EngineUnavailable("the onnx engine is not started (or was closed)")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), manifest.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        run_options = None
        if ids.size > SHRINK_ARENA_AFTER_TOKENS:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            (scores,) = session.run(["score"], {"input_ids": ids, "attention_mask": mask}, run_options)
        except ORT_ERRORS as exc:
            raise EngineFailure(
                f"onnxruntime failed on a batch of {len(rows)}x{width} tokens: {exc}"
            ) from exc
        if scores.shape != (len(rows),):
            raise EngineFailure(f"the graph returned shape {scores.shape} for {len(rows)} prompts")
        return scores

    def score_sync(self, prompts: Sequence[Prompt]) -> list[float]:
        """Raw scores in input order (blocking; `score` runs this on the engine's thread)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise EngineFailure("a prompt has no tokens")
        out = [math.nan] * len(prompts)
        lengths = [len(p) for p in prompts]
        budget = BatchBudget(self._info.max_batch_tokens, self.rows_per_run, padded=True)
        for batch in plan_batches(lengths, budget):
            scores = self._run([prompts[i].input_ids for i in batch])
            for i, s in zip(batch, scores.tolist(), strict=True):
                out[i] = s
        if not all(math.isfinite(s) for s in out):
            raise EngineFailure("the graph returned a non-finite score")
        return out

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        if not prompts:
            return Scored([], ENGINE_NAME)
        if self._session is None:
            raise EngineUnavailable("the onnx engine is not started (or was closed)")
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._pool(), self.score_sync, list(prompts))
        return Scored(scores, ENGINE_NAME)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        self._session = None
        if executor is not None:
            # Let an in-flight batch finish on its thread without blocking the event loop.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
