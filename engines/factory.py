"""Builds the configured engine (primary, with its fallback behind a router) from settings.

Engine modules are imported lazily: the reference engine pulls torch, which serving never needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engines.base import Engine

if TYPE_CHECKING:
    from gateway.config import EngineName, Settings


def build_engine(name: EngineName, settings: Settings, model_dir: Path | None) -> Engine:
    """One engine by name. `model_dir` is the prepared model folder (None only for vllm)."""
    if name == "onnx":
        from engines.onnx_engine import OnnxEngine

        if model_dir is None:
            raise ValueError("the onnx engine needs a prepared model folder")
        return OnnxEngine.from_settings(model_dir, settings)
    if name == "reference":
        from engines.reference import ReferenceEngine

        return ReferenceEngine.from_settings(model_dir, settings)
    if name == "vllm":
        from engines.vllm_engine import VllmEngine

        return VllmEngine.from_settings(settings)
    raise ValueError(f"unknown engine {name!r}: choose onnx, reference or vllm")


def build_serving_engine(settings: Settings, model_dir: Path | None) -> Engine:
    """The primary engine, wrapped with routing and fallback when a fallback is configured."""
    primary = build_engine(settings.primary_engine, settings, model_dir)
    fallback_name = settings.fallback
    if fallback_name is None:
        return primary
    from engines.router import RoutedEngine

    fallback = build_engine(fallback_name, settings, model_dir)
    return RoutedEngine.from_settings(primary, fallback, settings)
