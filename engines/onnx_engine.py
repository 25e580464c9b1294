"""The in-process ONNX Runtime engine (CPU, fp32 or int8), the gateway's no-torch scorer.

fp32 prompts are sorted by length and cut into sub-batches under a padded-token budget, left padded (the
graph derives positions from the mask, so padding does not change a score); int8 prompts run one per call
(see `rows_per_run`). Everything runs on one executor thread and scores come back in input order.

A folder exported with the chunk graph (model.chunk.onnx, model.int8.chunk.onnx) is served from it alone:
short prompts as above with no past, and prompts over `long_prompt_tokens` alone by chunked prefill (see
`score_chunked`), so attention memory grows with chunk x prompt instead of prompt^2. Both graphs read the
same weights, and only one session is loaded. Older folders are served from model.onnx, one-shot.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.batching import BatchBudget, plan_batches
from core.contract import Prompt
from engines.base import (
    EngineFailure,
    EngineInfo,
    EngineRejected,
    EngineThread,
    EngineUnavailable,
    ModelPreparationError,
    Scored,
)
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
# Prompts longer than this run alone through the chunk graph (model.chunk.onnx), CHUNK_TOKENS at a time,
# keeping only the keys and values of the tokens before the chunk: attention then takes heads x chunk x
# (past + chunk) floats per layer instead of heads x tokens^2. Folders exported without the chunk graph run
# them in one piece (quadratic memory).
LONG_PROMPT_TOKENS = 1024
CHUNK_TOKENS = 512
CHUNK_OUTPUTS = ["score", "chunk_kv"]
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


def empty_past(session: ort.InferenceSession, batch: int) -> np.ndarray:
    """A `past_kv` of no tokens for the chunk graph: [batch, 0, layers, 2, kv_heads, head_dim]."""
    dims = session.get_inputs()[2].shape[2:]
    return np.zeros((batch, 0, *dims), dtype=np.float32)


def score_chunked(
    session: ort.InferenceSession,
    input_ids: Sequence[int],
    chunk_tokens: int,
    run_options: ort.RunOptions | None = None,
) -> float:
    """One prompt's raw score by chunked prefill: the chunk graph over `chunk_tokens` at a time.

    The keys and values go into one buffer sized for the whole prompt; each run reads its prefix (a view,
    not a copy: the batch axis is 1 and tokens come next) and returns only its chunk's keys and values.
    `run_options` apply to the last run (where the attention is largest).
    """
    ids = np.asarray(input_ids, dtype=np.int64)[None, :]
    total = ids.shape[1]
    cache = np.empty((1, total, *session.get_inputs()[2].shape[2:]), dtype=np.float32)
    score = None
    for start in range(0, total, chunk_tokens):
        end = min(total, start + chunk_tokens)
        chunk = ids[:, start:end]
        feeds = {"input_ids": chunk, "attention_mask": np.ones_like(chunk), "past_kv": cache[:, :start]}
        last = end == total
        if last:
            (score,) = session.run(["score"], feeds, run_options)
        else:
            (cache[:, start:end],) = session.run(["chunk_kv"], feeds)
    assert score is not None
    return float(score[0])


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
        long_prompt_tokens: int | None = LONG_PROMPT_TOKENS,
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_pairs < 1:
            raise ValueError("max_batch_tokens and max_batch_pairs must be at least 1")
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        # None: never chunk, serve model.onnx as exported before the chunk graph existed.
        self.long_prompt_tokens = long_prompt_tokens
        self.chunk_tokens = chunk_tokens
        self._chunked = False
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
            # int8 runs one prompt at a time: the scheduler sends it one-prompt batches, so a request whose
            # client left is dropped between prompts, not after a whole batch.
            max_batch_pairs=self.rows_per_run,
            precision=quantization,
        )
        self._session: ort.InferenceSession | None = None
        self._manifest: Manifest | None = None
        self._thread = EngineThread("onnx")
        self._start_lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    @property
    def chunked(self) -> bool:
        """True when the engine serves the chunk graph (long prompts by chunked prefill)."""
        return self._chunked

    def _load(self) -> None:
        with self._start_lock:
            if self._session is not None:
                return
            manifest = verify_model_dir(self.model_dir, self.quantization, self.verify_hashes)
            graph = self.model_dir / manifest.graph_file(self.quantization)
            # The chunk graph scores short batches too (no past), so one session holds the weights once.
            chunk_files = manifest.chunk_graphs.get(self.quantization)
            chunked = bool(chunk_files) and self.long_prompt_tokens is not None
            if chunked:
                graph = self.model_dir / chunk_files[0]
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
            expected = CHUNK_OUTPUTS if chunked else ["score"]
            if names != expected:
                raise ModelPreparationError(
                    f"{graph} outputs {names}, expected {expected}; re-export the model"
                )
            self._chunked = chunked
            self._manifest = manifest
            self._session = session
            if self.warmup:
                self._run([[manifest.pad_id] * 8])
            log.info("onnx engine ready: %s (%s)", graph, self.quantization)

    async def start(self) -> None:
        """Verify the model folder, load the graph and warm it up (idempotent)."""
        if self._session is not None:
            return
        await self._thread.run(self._load)

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
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._chunked:
            feeds["past_kv"] = empty_past(session, len(rows))
        try:
            (scores,) = session.run(["score"], feeds, run_options)
        except ORT_ERRORS as exc:
            raise EngineFailure(
                f"onnxruntime failed on a batch of {len(rows)}x{width} tokens: {exc}"
            ) from exc
        if scores.shape != (len(rows),):
            raise EngineFailure(f"the graph returned shape {scores.shape} for {len(rows)} prompts")
        return scores

    def _run_chunked(self, input_ids: Sequence[int]) -> float:
        """One long prompt by chunked prefill; the arena is handed back after its last chunk."""
        session = self._session
        if session is None:
            raise EngineUnavailable("the onnx engine is not started (or was closed)")
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            return score_chunked(session, input_ids, self.chunk_tokens, run_options)
        except ORT_ERRORS as exc:
            raise EngineFailure(
                f"onnxruntime failed on a {len(input_ids)}-token prompt "
                f"in chunks of {self.chunk_tokens}: {exc}"
            ) from exc

    def score_sync(self, prompts: Sequence[Prompt]) -> list[float]:
        """Raw scores in input order (blocking; `score` runs this on the engine's thread)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise EngineFailure("a prompt has no tokens")
        out = [math.nan] * len(prompts)
        lengths = [len(p) for p in prompts]
        manifest = self._manifest
        if manifest is not None and max(lengths) > manifest.max_position_embeddings:
            raise EngineRejected(
                f"a prompt of {max(lengths)} tokens is longer than the model's "
                f"{manifest.max_position_embeddings} positions"
            )
        budget = BatchBudget(self._info.max_batch_tokens, self.rows_per_run, padded=True)
        alone_over = self.long_prompt_tokens if self._chunked else None
        for batch in plan_batches(lengths, budget, alone_over=alone_over):
            if alone_over is not None and lengths[batch[0]] > alone_over:
                out[batch[0]] = self._run_chunked(prompts[batch[0]].input_ids)
                continue
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
        scores = await self._thread.run(self.score_sync, list(prompts))
        return Scored(scores, ENGINE_NAME)

    async def close(self) -> None:
        self._session = None
        await self._thread.close()
