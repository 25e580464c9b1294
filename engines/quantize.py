"""Rewrites of the exported fp32 score graph into the CPU engine's quantized graphs (export time only).

Trained Qwen2.5 weights carry activation outliers (a residual of ~2,000 at the first position, a few
channels 30-100x the median after every RMSNorm, `down_proj` inputs of several hundred): one activation scale
per tensor, what onnxruntime's dynamic quantization uses, ranks documents almost at random on such a model.
The rewrite here quantizes activations per token (one scale per row, computed in the graph at run time) and
weights per output channel, after SmoothQuant-style smoothing that moves per-channel activation outliers
into the weights (`x / s` and `diag(s) W`, with `s` from calibration prompts). Every row is quantized on its
own, so a score never depends on its batch neighbours or on padding, and int8 products are summed in int32,
which no blocking or batch size changes.

Weights use 7 bits by default: on AVX2 without VNNI onnxruntime multiplies uint8 by int8 with VPMADDUBSW,
whose int16 pair sums saturate with full-range weights; 7-bit weights cannot saturate, so the same graph
gives the same scores on AVX2, AVX-512 and VNNI hosts.

Needs numpy and onnx; onnx is imported inside the functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class W8A8Options:
    """How `quantize_w8a8` rewrites a graph."""

    # SmoothQuant migration strength: s_j = max|x_j|^alpha / max|w_j|^(1 - alpha); None disables smoothing.
    smooth_alpha: float | None = 0.5
    weight_bits: int = 7


def weight_key(array: np.ndarray) -> str:
    """A name-independent key for one weight matrix as the graph stores it ([in, out], fp32)."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(a.tobytes()).hexdigest()[:20] + f"-{a.shape[0]}x{a.shape[1]}"


def _initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer}


def _matmul_groups(graph) -> dict[str, list]:
    """MatMul nodes with a constant 2-D right-hand side, grouped by the activation they read.

    The score head (a 1-D direction) is not among them: it stays fp32.
    """
    from onnx import numpy_helper

    inits = _initializers(graph)
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        if len(inits[node.input[1]].dims) != 2:
            continue
        groups.setdefault(node.input[0], []).append((node, numpy_helper.to_array(inits[node.input[1]])))
    return groups


def quantize_w8a8(
    fp32_graph: Path,
    *,
    input_absmax: Mapping[str, np.ndarray] | None = None,
    options: W8A8Options | None = None,
):
    """The int8 model (an onnx ModelProto): every constant-weight MatMul of `fp32_graph` as per-token int8
    activations x per-channel int8 weights (see the module doc).

    `input_absmax` maps `weight_key(W)` to the per-input-channel max |x| seen on calibration prompts (needed
    for smoothing).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    options = options or W8A8Options()
    qmax = float(2 ** (options.weight_bits - 1) - 1)
    model = onnx.load(str(fp32_graph), load_external_data=True)
    graph = model.graph
    groups = _matmul_groups(graph)
    new_inits = []
    replaced: dict[str, list] = {}  # original node name -> its replacement nodes
    u8_zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "w8a8/u8_zero_point")
    inv127 = numpy_helper.from_array(np.array(1.0 / 127.0, dtype=np.float32), "w8a8/inv127")
    eps = numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "w8a8/eps")
    offset = numpy_helper.from_array(np.array(128.0, dtype=np.float32), "w8a8/offset")
    new_inits += [u8_zero, inv127, eps, offset]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    last_axis = numpy_helper.from_array(np.array([-1], dtype=np.int64), "w8a8/last_axis")
    if opset >= 18:
        new_inits.append(last_axis)
    used_weights: set[str] = set()
    for g, (x_name, members) in enumerate(groups.items()):
        tag = f"w8a8/g{g}"
        nodes = []
        x_in = x_name
        if options.smooth_alpha is not None and input_absmax is not None:
            stats = [input_absmax.get(weight_key(w)) for _, w in members]
            if all(s is not None for s in stats):
                act = np.maximum(np.max(np.stack(stats), axis=0), 1e-5).astype(np.float64)
                wmax = np.maximum(
                    np.max(np.abs(np.concatenate([w for _, w in members], axis=1)), axis=1), 1e-5
                )
                alpha = options.smooth_alpha
                s = np.clip(act**alpha / wmax ** (1 - alpha), 1e-2, 1e2)
                members = [(n, w * s[:, None].astype(np.float32)) for n, w in members]
                inv_s = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{tag}/inv_smooth")
                new_inits.append(inv_s)
                nodes.append(
                    helper.make_node("Mul", [x_name, inv_s.name], [f"{tag}/xs"], name=f"{tag}/smooth")
                )
                x_in = f"{tag}/xs"
        # One scale per row (token): scale = max(|x|) / 127; q = round(x / scale) + 128 as uint8.
        # ReduceMax takes its axes as an attribute up to opset 17 and as an input from 18 on.
        if opset >= 18:
            reduce_max = helper.make_node(
                "ReduceMax", [f"{tag}/abs", last_axis.name], [f"{tag}/amax"], keepdims=1, name=f"{tag}/amax"
            )
        else:
            reduce_max = helper.make_node(
                "ReduceMax", [f"{tag}/abs"], [f"{tag}/amax"], axes=[-1], keepdims=1, name=f"{tag}/amax"
            )
        nodes += [
            helper.make_node("Abs", [x_in], [f"{tag}/abs"], name=f"{tag}/abs"),
            reduce_max,
            helper.make_node("Max", [f"{tag}/amax", eps.name], [f"{tag}/amax_eps"], name=f"{tag}/amax_eps"),
            helper.make_node("Mul", [f"{tag}/amax_eps", inv127.name], [f"{tag}/scale"], name=f"{tag}/scale"),
            helper.make_node("Div", [x_in, f"{tag}/scale"], [f"{tag}/xn"], name=f"{tag}/xn"),
            helper.make_node("Round", [f"{tag}/xn"], [f"{tag}/xr"], name=f"{tag}/xr"),
            helper.make_node("Add", [f"{tag}/xr", offset.name], [f"{tag}/xo"], name=f"{tag}/xo"),
            helper.make_node("Cast", [f"{tag}/xo"], [f"{tag}/xq"], to=TensorProto.UINT8, name=f"{tag}/xq"),
        ]
        for node, w in members:
            col_max = np.maximum(np.abs(w).max(axis=0), 1e-12)
            w_scale = (col_max / qmax).astype(np.float32)
            wq = np.clip(np.rint(w / w_scale), -qmax, qmax).astype(np.int8)
            base = node.name.strip("/").replace("/", "_")
            wq_init = numpy_helper.from_array(wq, f"w8a8/{base}/wq")
            ws_init = numpy_helper.from_array(w_scale, f"w8a8/{base}/w_scale")
            new_inits += [wq_init, ws_init]
            used_weights.add(node.input[1])
            out = node.output[0]
            nodes += [
                helper.make_node(
                    "MatMulInteger",
                    [f"{tag}/xq", wq_init.name, u8_zero.name],
                    [f"{out}/i32"],
                    name=f"{node.name}/int",
                ),
                helper.make_node(
                    "Cast", [f"{out}/i32"], [f"{out}/f32"], to=TensorProto.FLOAT, name=f"{node.name}/cast"
                ),
                helper.make_node(
                    "Mul", [f"{out}/f32", f"{tag}/scale"], [f"{out}/row"], name=f"{node.name}/row"
                ),
                helper.make_node("Mul", [f"{out}/row", ws_init.name], [out], name=f"{node.name}/col"),
            ]
            replaced[node.name] = []
        # The group's nodes go where its first member stood, so the graph stays topologically sorted.
        replaced[members[0][0].name] = nodes

    kept = []
    for node in graph.node:
        if node.name in replaced:
            kept.extend(replaced[node.name])
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    still_used = {i for n in graph.node for i in n.input}
    remaining = [
        init for init in graph.initializer if init.name in still_used or init.name not in used_weights
    ]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    graph.initializer.extend(new_inits)
    return model
