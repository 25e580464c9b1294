"""The official `mxbai-rerank` wrapper (MxbaiRerankV2, torch fp32) as an engine: parity ground truth.

It re-tokenizes each prompt's texts itself (that is the point of a reference) and computes full-vocabulary
logits at every position, about 0.6 MB per token in fp32, so batches are kept small and prompts longer
than `long_prompt_tokens` run one at a time. Needs the `reference` extra (torch, transformers 4.x).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.batching import plan_batches
from core.contract import DEFAULT_MAX_LENGTH, Prompt
from engines.base import (
    EngineFailure,
    EngineInfo,
    EngineThread,
    EngineUnavailable,
    ModelPreparationError,
    Scored,
)
from engines.model_store import is_hf_dir, load_manifest

log = logging.getLogger(__name__)

ENGINE_NAME = "reference"
DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_MAX_BATCH_PAIRS = 16
LONG_PROMPT_TOKENS = 2048


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu (the wrapper's own rule); other names pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def reference_source(
    model_dir: Path | None, *, reference_model: str | None, model_path: Path | None, hub_model: str
) -> str:
    """The HF weights the reference engine loads, in order of preference: `reference_model` when given,
    `model_path` when it is an HF folder, the HF folder a prepared `model_dir` (or `model_path`) was
    exported from, else the hub id `hub_model`."""
    if reference_model:
        return reference_model
    if model_path is not None and is_hf_dir(Path(model_path)):
        return str(model_path)
    for candidate in (model_dir, model_path):
        if candidate is None:
            continue
        candidate = Path(candidate)
        if is_hf_dir(candidate):
            return str(candidate)
        try:
            source = Path(load_manifest(candidate).source)
        except ModelPreparationError:
            continue
        # A model exported from a local folder remembers where its weights are.
        if is_hf_dir(source):
            return str(source)
    return hub_model


class ReferenceEngine:
    """Scores prompts with the official MxbaiRerankV2 wrapper's own `predict`."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str = "auto",
        max_length: int = DEFAULT_MAX_LENGTH,
        revision: str | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        long_prompt_tokens: int = LONG_PROMPT_TOKENS,
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.max_length = max_length
        self.revision = revision
        self.long_prompt_tokens = long_prompt_tokens
        self._info = EngineInfo(
            name=ENGINE_NAME, padded=True, max_batch_tokens=max_batch_tokens, max_batch_pairs=max_batch_pairs
        )
        self._wrapper: Any = None
        self._thread = EngineThread("reference")
        self._start_lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def wrapper(self) -> Any:
        """The loaded MxbaiRerankV2 (None before `start`)."""
        return self._wrapper

    def _load(self) -> None:
        with self._start_lock:
            if self._wrapper is not None:
                return
            import torch
            from mxbai_rerank import MxbaiRerankV2

            kwargs: dict[str, Any] = {}
            if self.revision:
                kwargs["revision"] = self.revision
            try:
                self._wrapper = MxbaiRerankV2(
                    self.model_name_or_path,
                    device=resolve_device(self.device),
                    torch_dtype=torch.float32,
                    max_length=self.max_length,
                    tokenizer_kwargs=dict(kwargs),
                    disable_transformers_warnings=True,
                    **kwargs,
                )
            except OSError as exc:
                raise ModelPreparationError(
                    f"the reference engine cannot load {self.model_name_or_path!r}: {exc}; set "
                    "RERANK_REFERENCE_MODEL (or RERANK_MODEL_PATH) to a Hugging Face model folder"
                ) from exc
            log.info("reference engine ready: %s on %s", self.model_name_or_path, self._wrapper.device)

    async def start(self) -> None:
        """Load the wrapper (torch fp32) on the engine's thread (idempotent)."""
        if self._wrapper is not None:
            return
        await self._thread.run(self._load)

    async def health(self) -> bool:
        return self._wrapper is not None

    def plan(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Indices grouped by instruction (the wrapper takes one per call), then under the budgets."""
        groups: dict[str | None, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.instruction or None, []).append(i)
        batches: list[list[int]] = []
        for indices in groups.values():
            lengths = [len(prompts[i]) for i in indices]
            plan = plan_batches(lengths, self._info.budget, alone_over=self.long_prompt_tokens)
            batches.extend([indices[j] for j in batch] for batch in plan)
        return batches

    def score_sync(self, prompts: Sequence[Prompt]) -> list[float]:
        """Raw scores in input order (blocking; `score` runs this on the engine's thread)."""
        wrapper = self._wrapper
        if wrapper is None:
            raise EngineUnavailable("the reference engine is not started (or was closed)")
        out = [math.nan] * len(prompts)
        for batch in self.plan(prompts):
            instruction = prompts[batch[0]].instruction or None
            try:
                scores = wrapper.predict(
                    [prompts[i].query for i in batch],
                    [prompts[i].document for i in batch],
                    instruction=instruction,
                )
            except (RuntimeError, ValueError, MemoryError) as exc:
                raise EngineFailure(f"the reference wrapper failed on {len(batch)} prompts: {exc}") from exc
            for i, s in zip(batch, scores.tolist(), strict=True):
                out[i] = float(s)
        if not all(math.isfinite(s) for s in out):
            raise EngineFailure("the reference wrapper returned a non-finite score")
        return out

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        if not prompts:
            return Scored([], ENGINE_NAME)
        if self._wrapper is None:
            raise EngineUnavailable("the reference engine is not started (or was closed)")
        scores = await self._thread.run(self.score_sync, list(prompts))
        return Scored(scores, ENGINE_NAME)

    async def close(self) -> None:
        self._wrapper = None
        await self._thread.close()
