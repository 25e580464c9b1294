"""torch -> ONNX export of an mxbai-rerank-v2 model: the raw score at the last position, nothing else.

The graph takes `input_ids` and `attention_mask` (int64, [batch, sequence], left padded) and returns
`score` [batch] = h_last · (W["1"] - W["0"]) (+ the bias difference when the head has one). The LM head is
reduced to that one direction at export, so the full-vocabulary projection is never computed; position ids
are derived from the mask inside the graph, so left padding gives the same fp32 numbers as no padding (to
~1e-6). `--quantize int8` also writes `model.int8.onnx` (engines.quantize), calibrated on the sample prompts
and written only if it follows fp32 within a bound. Both graphs are checked against torch on sample prompts
built by core.contract.PromptBuilder before the manifest is written; a failed export leaves nothing.

`model.chunk.onnx` is the same model as one step of chunked prefill (`_chunk_module`): a chunk of tokens
after the cached keys and values of the tokens before it. The engine serves long prompts through it a chunk
at a time, so that attention never holds heads x tokens^2 floats. Its weights are the fp32 graph's: where
those sit in model.onnx.data, the chunk graph points at the same bytes (a 0.6 MB file for base-v2). With
int8, `model.int8.chunk.onnx` is the same rewrite of it (its own copy of the int8 weights).

torch, transformers and onnx are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import CONTRACT_VERSION, PromptBuilder, resolve_estimated_max
from engines.base import ModelPreparationError
from engines.fidelity import DEFAULT_INT8_BOUND, Fidelity, FidelityBound, compare
from engines.model_store import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    WEIGHT_FILE_PATTERNS,
    file_entry,
    is_hf_dir,
)
from engines.quantize import W8A8Options

FP32_GRAPH = "model.onnx"
FP32_DATA = "model.onnx.data"
INT8_GRAPH = "model.int8.onnx"
INT8_DATA = "model.int8.onnx.data"
# The chunked-prefill graph (see `_chunk_module`): long prompts run through it a chunk at a time.
CHUNK_GRAPH = "model.chunk.onnx"
CHUNK_DATA = "model.chunk.onnx.data"
INT8_CHUNK_GRAPH = "model.int8.chunk.onnx"
INT8_CHUNK_DATA = "model.int8.chunk.onnx.data"
CHUNK_INPUTS = ["input_ids", "attention_mask", "past_kv"]
CHUNK_OUTPUTS = ["score", "chunk_kv"]
KV_LAYOUT = "[batch, tokens, layers, 2 (key, value), kv_heads, head_dim], keys after rotary"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
HUB_PATTERNS = [*COPIED_FILES, *WEIGHT_FILE_PATTERNS, "*.safetensors.index.json", "*.bin.index.json"]
# Protobuf cannot hold more than 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000
DEFAULT_OPSET = 17
SCORE_DIRECTION = "score_direction"
# An fp32 graph further than this from torch is broken, not merely rounded differently.
FP32_VERIFY_TOLERANCE = 1e-2
# What int8 writes (engines.quantize): per-token activations, per-channel 7-bit weights, SmoothQuant 0.5.
INT8_OPTIONS = W8A8Options(smooth_alpha=0.5, weight_bits=7)
INT8_SCHEME = "w8a8: per-token int8 activations, per-channel 7-bit weights, SmoothQuant alpha 0.5"

_SAMPLE_QUERIES = (
    "What is the capital of France?",
    "how to reverse a list in python",
    "東京タワーの高さは?",
    "effects of caffeine on sleep",
)
_SAMPLE_DOCUMENTS = (
    "Paris is the capital and most populous city of France.",
    "def reverse(xs):\n    return xs[::-1]\n",
    "東京タワーは高さ333メートルの電波塔です。",
    "",
    "Caffeine blocks adenosine receptors, which delays sleep onset and reduces deep sleep. " * 6,
    "The Rhine flows through Switzerland, Germany and the Netherlands.\n\n",
    "Emoji 🍕🔥 and a question?",
    "A long passage about the history of search engines and ranking. " * 20,
)


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote and how closely its graphs follow torch."""

    out_dir: Path
    manifest: dict
    fp32_max_abs_diff: float
    int8_fidelity: Fidelity | None


def _say(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def fetch_source(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    say: Callable[[str], None] = _say,
) -> tuple[Path, str | None]:
    """A local HF folder for `source` (a folder, or a hub id downloaded with progress) and its revision."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir() or not is_hf_dir(local):
            raise ModelPreparationError(
                f"{local} is not a Hugging Face model folder (it needs config.json and *.safetensors weights)"
            )
        if not (local / "tokenizer.json").is_file():
            raise ModelPreparationError(f"{local} has no tokenizer.json; the scoring contract needs it")
        return local, revision
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelPreparationError(
            f"{source!r} is neither an existing folder nor a hub id of the form owner/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    say(
        f"downloading {source}"
        + (f"@{revision}" if revision else "")
        + (f" into {cache_dir}" if cache_dir else "")
    )
    try:
        path = snapshot_download(
            repo_id=source,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
            allow_patterns=HUB_PATTERNS,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        # One short line (the hub's own message runs to ~500 characters), saying what to do.
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            why, todo = f"HTTP {status}", "check the id and revision, or set HF_TOKEN for a gated model"
        else:
            why = "unreachable" if isinstance(exc, LocalEntryNotFoundError) else type(exc).__name__
            todo = "copy a model folder here and set RERANK_MODEL_PATH to it"
        at = f" at revision {revision!r}" if revision else ""
        raise ModelPreparationError(
            f"could not download {source!r}{at} from the hub ({why}): {todo}"
        ) from exc
    path = Path(path)
    # The snapshot folder is named after the commit it resolved to.
    return path, path.name if path.parent.name == "snapshots" else revision


def _attach_score_head(module, model, yes_id: int, no_id: int) -> None:
    """Give `module` the decoder body and the LM head reduced to the score's one direction (+ bias diff)."""
    module.body = model.model
    weight = model.lm_head.weight.detach()
    module.register_buffer(SCORE_DIRECTION, (weight[yes_id] - weight[no_id]).clone().contiguous())
    bias = getattr(model.lm_head, "bias", None)
    module.bias_diff = None if bias is None else float(bias[yes_id] - bias[no_id])


def _score_module(model, yes_id: int, no_id: int):
    """Wrap a Qwen2ForCausalLM so that its only output is the raw score at the last position."""
    import torch

    class ScoreHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            _attach_score_head(self, model, yes_id, no_id)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Positions count real tokens only: a left-padded row gets the positions it has unpadded.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            # Padding rows start at zero (the q/k/v biases make them non-zero inside the layers; attention
            # masks them out). fp32 scores are padding-invariant; int8 rounding is not (a last-bit change
            # flips roundings), so the engine runs int8 one prompt per run instead.
            keep = attention_mask[:, :, None].to(self.body.embed_tokens.weight.dtype)
            hidden = self.body.embed_tokens(input_ids) * keep
            cos, sin = self.body.rotary_emb(hidden, position_ids)
            seq = torch.arange(input_ids.shape[1], device=input_ids.device)
            causal = (seq[None, :] <= seq[:, None])[None, None, :, :]
            allowed = causal & attention_mask[:, None, None, :].bool()
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min
            )
            *layers, final = self.body.layers
            for layer in layers:
                out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
                hidden = (out[0] if isinstance(out, tuple) else out) * keep
            last = self.body.norm(self._last_position(final, hidden, mask, cos, sin))
            score = last @ getattr(self, SCORE_DIRECTION)
            if self.bias_diff is not None:
                score = score + self.bias_diff
            return score

        @staticmethod
        def _last_position(layer, hidden, mask, cos, sin) -> torch.Tensor:
            """The final decoder layer for the last position only (keys and values still see every position).

            The same operations as Qwen2DecoderLayer with eager attention, restricted to one query row: the
            other rows of the last layer never reach the score.
            """
            from transformers.models.qwen2.modeling_qwen2 import repeat_kv, rotate_half

            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            batch, seq, _ = x.shape
            q = attn.q_proj(x[:, -1:, :]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos[:, :, -1:] + rotate_half(q) * sin[:, :, -1:]
            k = k * cos + rotate_half(k) * sin
            k = repeat_kv(k, attn.num_key_value_groups)
            v = repeat_kv(v, attn.num_key_value_groups)
            weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask[:, :, -1:, :]
            weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, 1, -1)
            h = hidden[:, -1:, :] + attn.o_proj(context)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            return h[:, 0, :]

    return ScoreHead().eval()


def _attend(layer, hidden, past_k, past_v, cos, sin, mask, last_only: bool):
    """One Qwen2 decoder layer over a chunk whose keys and values extend `past_k`, `past_v`.

    The same operations as Qwen2DecoderLayer with eager attention. Returns the layer's output (only the
    chunk's last row when `last_only`: the other rows of the last layer never reach the score) and the
    chunk's own keys (after rotary) and values, [batch, kv_heads, chunk, head_dim].
    """
    import torch
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv, rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, chunk, _ = x.shape
    k = attn.k_proj(x).view(batch, chunk, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, chunk, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    k = k * cos + rotate_half(k) * sin
    if last_only:
        x, hidden, cos, sin, mask = x[:, -1:], hidden[:, -1:], cos[:, :, -1:], sin[:, :, -1:], mask[:, :, -1:]
    rows = x.shape[1]
    q = attn.q_proj(x).view(batch, rows, -1, attn.head_dim).transpose(1, 2)
    # Scaling q (rows x head_dim) instead of the scores (rows x keys) keeps one fewer score-sized tensor.
    q = (q * cos + rotate_half(q) * sin) * attn.scaling
    keys = repeat_kv(torch.cat([past_k, k], dim=2), attn.num_key_value_groups)
    values = repeat_kv(torch.cat([past_v, v], dim=2), attn.num_key_value_groups)
    weights = torch.matmul(q, keys.transpose(2, 3)) + mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    context = torch.matmul(weights, values).transpose(1, 2).reshape(batch, rows, -1)
    h = hidden + attn.o_proj(context)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


def _chunk_module(model, yes_id: int, no_id: int):
    """Wrap a Qwen2ForCausalLM as one step of chunked prefill: a chunk of tokens after cached keys/values.

    Inputs: `input_ids`, `attention_mask` [batch, chunk] (left padded; a padded batch has no past) and
    `past_kv` (KV_LAYOUT, `past` tokens, possibly 0). Outputs: `score` [batch], the raw score at the chunk's
    last position (the same formula as model.onnx), and `chunk_kv`, the chunk's own keys and values
    (KV_LAYOUT). Positions continue after the past; every past key is visible, the chunk is causal. Only
    the chunk's keys and values come out, not past + chunk: the caller appends them to one preallocated
    buffer whose prefix is the next `past_kv`, so no step copies the whole cache.
    """
    import torch

    class ChunkScoreHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            _attach_score_head(self, model, yes_id, no_id)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_kv: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # [batch, past] of ones, taken from past_kv itself so that a past of 0 tokens traces cleanly.
            past_keep = torch.ones_like(past_kv[:, :, 0, 0, 0, 0], dtype=attention_mask.dtype)
            past_len = past_keep.sum(-1, keepdim=True)
            position_ids = past_len + (attention_mask.cumsum(-1) - 1).clamp(min=0)
            keep = attention_mask[:, :, None].to(self.body.embed_tokens.weight.dtype)
            hidden = self.body.embed_tokens(input_ids) * keep
            cos, sin = self.body.rotary_emb(hidden, position_ids)
            key_keep = torch.cat([past_keep, attention_mask], dim=1)
            rows = torch.arange(input_ids.shape[1], device=input_ids.device)
            cols = torch.arange(key_keep.shape[1], device=input_ids.device)
            # Query row i sits at position past + i: it sees every key up to there.
            causal = cols[None, None, :] <= rows[None, :, None] + past_len[:, :, None]
            allowed = (causal & key_keep[:, None, :].bool())[:, None, :, :]
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min
            )
            new_kv = []
            last = len(self.body.layers) - 1
            for i, layer in enumerate(self.body.layers):
                past_k = past_kv[:, :, i, 0].transpose(1, 2)
                past_v = past_kv[:, :, i, 1].transpose(1, 2)
                out, k, v = _attend(layer, hidden, past_k, past_v, cos, sin, mask, last_only=i == last)
                hidden = out if i == last else out * keep
                new_kv.append(torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=2))
            score = self.body.norm(hidden[:, -1, :]) @ getattr(self, SCORE_DIRECTION)
            if self.bias_diff is not None:
                score = score + self.bias_diff
            return score, torch.stack(new_kv, dim=2)

    return ChunkScoreHead().eval()


def kv_shape(config: dict) -> tuple[int, int, int, int]:
    """(layers, 2, kv_heads, head_dim) of one token's cached keys and values."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return int(config["num_hidden_layers"]), 2, int(config.get("num_key_value_heads") or heads), head_dim


def _load_torch_model(hf_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    if config.model_type != "qwen2":
        raise ModelPreparationError(
            f"{hf_dir} holds a {config.model_type!r} model; mxbai-rerank-v2 models are Qwen2 "
            "(model_type qwen2)"
        )
    # Eager attention exports to plain ONNX ops; fp32 whatever the checkpoint's dtype.
    return AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _torch_export(module, path: Path, opset: int, say: Callable[[str], None]) -> None:
    import torch

    ids = torch.full((2, 16), 100, dtype=torch.long)
    ids[:, 4:] = torch.arange(200, 212)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row, so the traced graph is the padded path
    kwargs = {
        "input_names": ["input_ids", "attention_mask"],
        "output_names": ["score"],
        "opset_version": opset,
    }
    with torch.no_grad():
        try:
            torch.onnx.export(
                module,
                (ids, mask),
                str(path),
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "score": {0: "batch"},
                },
                dynamo=False,
                **kwargs,
            )
            return
        except (RuntimeError, TypeError, ValueError) as exc:
            say(f"TorchScript exporter failed ({type(exc).__name__}: {exc}); trying the dynamo exporter")
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
        torch.onnx.export(module, (ids, mask), str(path), dynamic_shapes=shapes, dynamo=True, **kwargs)


def _torch_export_chunk(module, kv: tuple[int, ...], path: Path, opset: int) -> None:
    """Export the chunk graph (TorchScript exporter; traced with a past, a padded row and a batch of 2)."""
    import torch

    ids = torch.full((2, 6), 100, dtype=torch.long)
    ids[:, 2:] = torch.arange(200, 204)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    past = torch.randn(2, 3, *kv) * 0.1
    with torch.no_grad():
        torch.onnx.export(
            module,
            (ids, mask, past),
            str(path),
            input_names=CHUNK_INPUTS,
            output_names=CHUNK_OUTPUTS,
            opset_version=opset,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "chunk"},
                "attention_mask": {0: "batch", 1: "chunk"},
                "past_kv": {0: "batch", 1: "past"},
                "score": {0: "batch"},
                "chunk_kv": {0: "batch", 1: "chunk"},
            },
            dynamo=False,
        )


def _save_chunk_graph(tmp_graph: Path, out_dir: Path, fp32_files: list[str]) -> tuple[list[str], int]:
    """Save the chunk graph; where the fp32 graph keeps its weights in an external file, point every
    identical weight at the same bytes of that file instead of writing them again.

    Returns the chunk graph's files and the number of weight bytes it shares with the fp32 graph.
    """
    import hashlib

    import onnx

    model = onnx.load(str(tmp_graph), load_external_data=True)
    if len(fp32_files) < 2:
        return _write(model, out_dir / CHUNK_GRAPH, CHUNK_DATA), 0
    data_path = out_dir / fp32_files[1]
    fp32 = onnx.load(str(out_dir / fp32_files[0]), load_external_data=False)
    where: dict[tuple[str, bytes], tuple[int, int]] = {}
    with open(data_path, "rb") as fh:
        for t in fp32.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            fh.seek(offset)
            where[(str(t.data_type), hashlib.sha256(fh.read(length)).digest())] = (offset, length)
    shared = 0
    for t in model.graph.initializer:
        if not t.raw_data:
            continue
        hit = where.get((str(t.data_type), hashlib.sha256(t.raw_data).digest()))
        if hit is None:
            continue
        shared += len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", data_path.name), ("offset", str(hit[0])), ("length", str(hit[1]))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    files = _write(model, out_dir / CHUNK_GRAPH, CHUNK_DATA)
    return [*files, data_path.name], shared


def _write(model, out_graph: Path, data_name: str) -> list[str]:
    """Save a graph as one file, or with one external data file when it is too large for protobuf."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(
            model,
            str(out_graph),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        return [out_graph.name, data_name]
    onnx.save_model(model, str(out_graph))
    return [out_graph.name]


def _save_graph(tmp_graph: Path, out_graph: Path, data_name: str) -> list[str]:
    """Re-save an exported graph (torch writes many external files) in the prepared folder's layout."""
    import onnx

    return _write(onnx.load(str(tmp_graph), load_external_data=True), out_graph, data_name)


def _check_graph(graph: Path) -> None:
    """The graph's one output must be `score`."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    if outputs != ["score"]:
        raise ModelPreparationError(f"exported graph has outputs {outputs}, expected ['score']")


def _quantize(fp32_graph: Path, out_graph: Path, input_absmax: dict) -> list[str]:
    """The int8 graph: per-token activations x per-channel 7-bit weights, smoothed (engines.quantize)."""
    from engines.quantize import quantize_w8a8

    model = quantize_w8a8(fp32_graph, input_absmax=input_absmax, options=INT8_OPTIONS)
    return _write(model, out_graph, INT8_DATA)


def sample_prompts(builder: PromptBuilder, n: int) -> list:
    """`n` varied prompts (lengths, scripts, padding) for verification."""
    pairs = [(q, d) for d in _SAMPLE_DOCUMENTS for q in _SAMPLE_QUERIES]
    # Spread the picks over documents first, so a small n still covers short and long prompts.
    picked = [pairs[(i * len(_SAMPLE_QUERIES) + i // len(_SAMPLE_DOCUMENTS)) % len(pairs)] for i in range(n)]
    return builder.build_pairs(picked)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """int64 input_ids and attention_mask arrays, left padded to the longest row."""
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids, mask


def _torch_scores(model, prompts, yes_id: int, no_id: int, input_absmax: dict | None = None) -> list[float]:
    """Ground truth: the full causal LM, one unpadded prompt at a time, logit[yes] - logit[no].

    With `input_absmax`, also records every linear layer's per-input-channel max |x| (keyed by
    `engines.quantize.weight_key` of the weight as the graph stores it): the calibration of int8 smoothing.
    """
    import torch

    hooks = []
    if input_absmax is not None:
        from engines.quantize import weight_key

        def record(key: str):
            def hook(_module, inputs, _output) -> None:
                x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).numpy()
                input_absmax[key] = np.maximum(input_absmax[key], x) if key in input_absmax else x

            return hook

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                key = weight_key(module.weight.detach().T.numpy())
                hooks.append(module.register_forward_hook(record(key)))
    out = []
    try:
        with torch.no_grad():
            for p in prompts:
                logits = model(input_ids=torch.tensor([p.input_ids])).logits[0, -1]
                out.append(float(logits[yes_id] - logits[no_id]))
    finally:
        for h in hooks:
            h.remove()
    return out


def _onnx_scores(graph: Path, prompts, pad_id: int, *, one_per_run: bool = False) -> list[float]:
    """Scores from one session of `graph`: all prompts in one left-padded batch, or one prompt per run."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    batches = [[p] for p in prompts] if one_per_run else [prompts]
    out: list[float] = []
    for batch in batches:
        ids, mask = left_pad([p.input_ids for p in batch], pad_id)
        (scores,) = session.run(["score"], {"input_ids": ids, "attention_mask": mask})
        out += [float(s) for s in scores]
    return out


# Each sample prompt is verified in this many chunked-prefill runs (each run after the first reads the keys
# and values of the ones before it). Three runs check what chunking can break at a bounded cost: a fixed
# small chunk made a 300-token prompt eleven runs of the full model, minutes on the base-v2 shape.
VERIFY_CHUNKS = 3


def verify_chunk_tokens(n_tokens: int) -> int:
    """The chunk size that scores a prompt of `n_tokens` in VERIFY_CHUNKS runs."""
    return max(1, -(-n_tokens // VERIFY_CHUNKS))


def _verify_chunk_graph(
    out_dir: Path,
    files: list[str],
    prompts,
    reference: Sequence[float],
    one_shot: Sequence[float],
    pad_id: int,
) -> dict:
    """The chunk graph against torch (one padded batch, no past) and chunked against the one-shot graph."""
    import onnxruntime as ort

    from engines.onnx_engine import empty_past, score_chunked

    session = ort.InferenceSession(str(out_dir / files[0]), providers=["CPUExecutionProvider"])
    if [o.name for o in session.get_outputs()] != CHUNK_OUTPUTS:
        raise ModelPreparationError(f"the chunk graph's outputs are not {CHUNK_OUTPUTS}")
    ids, mask = left_pad([p.input_ids for p in prompts], pad_id)
    batched, _ = session.run(
        CHUNK_OUTPUTS, {"input_ids": ids, "attention_mask": mask, "past_kv": empty_past(session, len(ids))}
    )
    vs_torch = max(abs(float(a) - b) for a, b in zip(batched, reference, strict=True))
    chunked = [score_chunked(session, p.input_ids, verify_chunk_tokens(len(p))) for p in prompts]
    vs_one_shot = max(abs(a - b) for a, b in zip(chunked, one_shot, strict=True))
    vs_torch = max(vs_torch, *(abs(a - b) for a, b in zip(chunked, reference, strict=True)))
    if vs_torch > FP32_VERIFY_TOLERANCE:
        raise ModelPreparationError(
            f"the exported chunk graph differs from torch by {vs_torch:.3g} (> {FP32_VERIFY_TOLERANCE}); "
            "the export is broken, please report it"
        )
    return {
        "max_abs_diff_vs_torch": vs_torch,
        "verify_chunks_per_prompt": VERIFY_CHUNKS,
        "chunked_max_abs_diff_vs_one_shot": vs_one_shot,
    }


def _quantize_chunk(out_dir: Path, chunk_graph: str, input_absmax: dict) -> list[str]:
    """The int8 chunk graph: the chunk graph through the same rewrite as model.int8.onnx."""
    from engines.quantize import quantize_w8a8

    model = quantize_w8a8(out_dir / chunk_graph, input_absmax=input_absmax, options=INT8_OPTIONS)
    return _write(model, out_dir / INT8_CHUNK_GRAPH, INT8_CHUNK_DATA)


def _verify_int8_chunk(
    out_dir: Path, files: list[str], prompts, fp32: Sequence[float], int8_one_shot: Sequence[float]
) -> tuple[Fidelity, float]:
    """The int8 chunk graph as the engine runs it (one prompt per run, chunked): its fidelity to fp32, and
    its largest difference from the int8 one-shot graph."""
    import onnxruntime as ort

    from engines.onnx_engine import score_chunked

    session = ort.InferenceSession(str(out_dir / files[0]), providers=["CPUExecutionProvider"])
    chunked = [score_chunked(session, p.input_ids, verify_chunk_tokens(len(p))) for p in prompts]
    diff = max(abs(a - b) for a, b in zip(chunked, int8_one_shot, strict=True))
    return compare(_grouped(prompts, chunked), _grouped(prompts, fp32)), diff


def _pad_id(hf_dir: Path, builder: PromptBuilder) -> int:
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        pad = json.loads(cfg_path.read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and builder.tokenizer.token_to_id(pad) is not None:
            return int(builder.tokenizer.token_to_id(pad))
    return 0


def _grouped(prompts, scores: Sequence[float]) -> list[list[float]]:
    """Scores grouped by query (in first-seen order), for per-query ranking figures."""
    groups: dict[tuple[str, str | None], list[float]] = {}
    for p, x in zip(prompts, scores, strict=True):
        groups.setdefault((p.query, p.instruction), []).append(x)
    return list(groups.values())


def export_model(
    source: str,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    quantize: str = "none",
    verify_samples: int = 16,
    cache_dir: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    estimated_max: float | None = None,
    int8_bound: FidelityBound = DEFAULT_INT8_BOUND,
    say: Callable[[str], None] = _say,
) -> ExportReport:
    """Prepare a model folder from a hub id or an HF folder: ONNX graphs, tokenizer, config, manifest.

    Nothing is left in `out_dir` when the export fails, the int8 fidelity gate included.
    """
    if quantize not in ("none", "int8"):
        raise ValueError(f"--quantize must be none or int8, not {quantize!r}")
    if verify_samples < 2:
        raise ValueError("--verify-samples must be at least 2")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelPreparationError(f"{out_dir} exists and is not empty; choose a new --out folder")
    created = not out_dir.exists()
    try:
        return _export(
            source,
            out_dir,
            revision=revision,
            quantize=quantize,
            verify_samples=verify_samples,
            cache_dir=cache_dir,
            opset=opset,
            estimated_max=estimated_max,
            int8_bound=int8_bound,
            say=say,
        )
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _export(
    source: str,
    out_dir: Path,
    *,
    revision: str | None,
    quantize: str,
    verify_samples: int,
    cache_dir: str | Path | None,
    opset: int,
    estimated_max: float | None,
    int8_bound: FidelityBound,
    say: Callable[[str], None],
) -> ExportReport:
    started = time.monotonic()

    def step(msg: str) -> None:
        say(f"{time.monotonic() - started:7.1f}s  {msg}")

    hf_dir, resolved_revision = fetch_source(source, revision=revision, cache_dir=cache_dir, say=step)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    is_hub_id = not Path(source).expanduser().exists()
    try:
        norm_max, norm_source = resolve_estimated_max(
            config=config, hub_id=source if is_hub_id else None, override=estimated_max
        )
    except ValueError as exc:
        raise ModelPreparationError(str(exc)) from exc
    step(f"estimated_max = {norm_max:g} ({norm_source})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    builder = PromptBuilder.from_dir(out_dir)
    pad_id = _pad_id(hf_dir, builder)

    step(f"loading {hf_dir} with torch (fp32)")
    model = _load_torch_model(hf_dir)
    graphs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="export-", dir=out_dir) as tmp:
        step(f"exporting the two-logit score graph (opset {opset})")
        tmp_graph = Path(tmp) / FP32_GRAPH
        _torch_export(_score_module(model, builder.yes_id, builder.no_id), tmp_graph, opset, step)
        step("saving the fp32 graph")
        graphs["fp32"] = _save_graph(tmp_graph, out_dir / FP32_GRAPH, FP32_DATA)
        step("exporting the chunked-prefill graph (long prompts)")
        tmp_chunk = Path(tmp) / "chunk" / CHUNK_GRAPH
        tmp_chunk.parent.mkdir()
        _torch_export_chunk(
            _chunk_module(model, builder.yes_id, builder.no_id), kv_shape(config), tmp_chunk, opset
        )
        step("saving the chunk graph")
        chunk_files, chunk_shared_bytes = _save_chunk_graph(tmp_chunk, out_dir, graphs["fp32"])
        chunk_graphs = {"fp32": chunk_files}
    _check_graph(out_dir / FP32_GRAPH)

    prompts = sample_prompts(builder, verify_samples)
    step(
        f"scoring {len(prompts)} sample prompts with torch"
        + (" (and calibrating int8)" if quantize == "int8" else "")
    )
    input_absmax: dict | None = {} if quantize == "int8" else None
    reference = _torch_scores(model, prompts, builder.yes_id, builder.no_id, input_absmax)
    del model
    if quantize == "int8":
        step(f"quantizing to int8 ({INT8_SCHEME})")
        graphs["int8"] = _quantize(out_dir / FP32_GRAPH, out_dir / INT8_GRAPH, input_absmax or {})
        step("quantizing the chunk graph to int8 (the same rewrite)")
        chunk_graphs["int8"] = _quantize_chunk(out_dir, chunk_files[0], input_absmax or {})

    step("verifying the graphs against torch")
    fp32 = _onnx_scores(out_dir / FP32_GRAPH, prompts, pad_id)
    fp32_diff = max(abs(a - b) for a, b in zip(fp32, reference, strict=True))
    lengths = sorted(len(p) for p in prompts)
    print(
        f"verify fp32: max |onnx - torch| = {fp32_diff:.3g} over {len(prompts)} prompts "
        f"({lengths[0]}-{lengths[-1]} tokens, left padded in one batch)",
        flush=True,
    )
    if fp32_diff > FP32_VERIFY_TOLERANCE:
        raise ModelPreparationError(
            f"the exported fp32 graph differs from torch by {fp32_diff:.3g} (> {FP32_VERIFY_TOLERANCE}); "
            "the export is broken, please report it"
        )
    chunk = _verify_chunk_graph(out_dir, chunk_files, prompts, reference, fp32, pad_id)
    print(
        f"verify chunk: max |chunk - torch| = {chunk['max_abs_diff_vs_torch']:.3g} (one left-padded batch), "
        f"chunked in {chunk['verify_chunks_per_prompt']} runs: max |chunked - one-shot fp32| = "
        f"{chunk['chunked_max_abs_diff_vs_one_shot']:.3g}; weights shared with the fp32 graph: "
        f"{chunk_shared_bytes / 1e6:.0f} MB",
        flush=True,
    )
    int8_fidelity: Fidelity | None = None
    int8_chunk_fidelity: Fidelity | None = None
    int8_chunked_diff: float | None = None
    if "int8" in graphs:
        # One prompt per run, as the engine runs int8 (see engines.onnx_engine).
        int8 = _onnx_scores(out_dir / INT8_GRAPH, prompts, pad_id, one_per_run=True)
        int8_fidelity = compare(_grouped(prompts, int8), _grouped(prompts, fp32))
        int8_ref = max(abs(a - b) for a, b in zip(int8, reference, strict=True))
        print(
            f"verify int8: max |int8 - fp32| = {int8_fidelity.max_abs_diff:.3g}, median "
            f"{int8_fidelity.median_abs_diff:.3g}, max |int8 - torch| = {int8_ref:.3g}, per-query Spearman "
            f"mean {int8_fidelity.spearman_mean:.4f} / min {int8_fidelity.spearman_min:.3f}, top-1 same "
            f"{100 * int8_fidelity.top1_agreement:.0f} %",
            flush=True,
        )
        # What the engine serves in int8: the int8 chunk graph, one prompt per run, long ones chunked.
        int8_chunk_fidelity, int8_chunked_diff = _verify_int8_chunk(
            out_dir, chunk_graphs["int8"], prompts, fp32, int8
        )
        print(
            f"verify int8 chunk: max |int8 chunk - fp32| = {int8_chunk_fidelity.max_abs_diff:.3g}, "
            f"Spearman mean {int8_chunk_fidelity.spearman_mean:.4f} (chunked in {VERIFY_CHUNKS} runs); "
            f"max |chunked - int8 one-shot| = {int8_chunked_diff:.3g}",
            flush=True,
        )
        failed = int8_bound.violations(int8_fidelity) + [
            f"chunk graph: {v}" for v in int8_bound.violations(int8_chunk_fidelity)
        ]
        if failed:
            raise ModelPreparationError(
                f"the int8 graph is not faithful enough to fp32 on {len(prompts)} sample prompts: "
                f"{'; '.join(failed)}. Nothing was written. Serve fp32 (`--quantize none`), or accept the "
                f"error knowingly with --int8-max-abs-diff / --int8-min-spearman"
            )

    step("hashing files and writing the manifest")
    files = {
        p.name: file_entry(p)
        for p in sorted(out_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(source) if is_hub_id else str(hf_dir.resolve()),
        "revision": resolved_revision,
        "contract_version": CONTRACT_VERSION,
        "quantization": "int8" if "int8" in graphs else "none",
        "graphs": graphs,
        "precision": {
            "fp32": {"scheme": "fp32", "max_abs_diff_vs_torch": fp32_diff},
            **(
                {
                    "int8": {
                        "scheme": INT8_SCHEME,
                        "weight_bits": INT8_OPTIONS.weight_bits,
                        "smooth_alpha": INT8_OPTIONS.smooth_alpha,
                        "fidelity_vs_fp32": int8_fidelity.as_dict(),
                        "chunk_fidelity_vs_fp32": int8_chunk_fidelity.as_dict(),
                        "chunked_max_abs_diff_vs_int8_one_shot": int8_chunked_diff,
                        "bound": {
                            "max_abs_diff": int8_bound.max_abs_diff,
                            "spearman_min": int8_bound.spearman_min,
                        },
                    }
                }
                if int8_fidelity is not None
                else {}
            ),
        },
        "inputs": ["input_ids", "attention_mask"],
        # Listed apart from `graphs` so that readers of `graphs` (one graph per quantization) are unchanged.
        "chunk_graphs": chunk_graphs,
        "chunk": {
            "inputs": CHUNK_INPUTS,
            "outputs": CHUNK_OUTPUTS,
            "kv_layout": KV_LAYOUT,
            "kv_shape_per_token": list(kv_shape(config)),
            "shared_weight_bytes": chunk_shared_bytes,
            **chunk,
        },
        "output": "score",
        "opset": opset,
        "yes_id": builder.yes_id,
        "no_id": builder.no_id,
        "pad_id": pad_id,
        "estimated_max": norm_max,
        "estimated_max_source": norm_source,
        "max_position_embeddings": int(config["max_position_embeddings"]),
        "verification": {
            "samples": len(prompts),
            "fp32_max_abs_diff": fp32_diff,
            "int8_max_abs_diff_vs_fp32": int8_fidelity.max_abs_diff if int8_fidelity else None,
            "int8_spearman_vs_fp32": int8_fidelity.spearman_mean if int8_fidelity else None,
        },
        "files": {name: {"size_bytes": e.size_bytes, "sha256": e.sha256} for name, e in files.items()},
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    step(f"done: {out_dir}")
    return ExportReport(out_dir, manifest, fp32_diff, int8_fidelity)
