"""`rerank-gateway export` and the model store: what a prepared folder holds and how a bad one is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from core.contract import CONTRACT_VERSION
from engines import model_store, resolve
from engines.base import ModelPreparationError
from engines.model_store import MANIFEST_NAME, load_manifest, sha256_file, verify_model_dir
from gateway.cli import main
from gateway.compose import model_source, resolve_model
from tests.conftest import TINY_INT8_GATE

TINY_VOCAB = 151936
TINY_HIDDEN = 128


def _initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def _copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def test_export_writes_graphs_tokenizer_config_and_manifest(tiny_model_dir: Path, tiny_hf_dir: Path):
    for name in ("model.onnx", "model.int8.onnx", "tokenizer.json", "config.json", MANIFEST_NAME):
        assert (tiny_model_dir / name).is_file(), name
    manifest = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    assert manifest["contract_version"] == CONTRACT_VERSION
    assert manifest["source"] == str(tiny_hf_dir.resolve())
    assert manifest["graphs"] == {"fp32": ["model.onnx"], "int8": ["model.int8.onnx"]}
    assert (manifest["yes_id"], manifest["no_id"]) == (16, 15)
    assert manifest["max_position_embeddings"] == 32768
    assert manifest["quantization"] == "int8"
    for name, entry in manifest["files"].items():
        path = tiny_model_dir / name
        assert path.stat().st_size == entry["size_bytes"], name
        assert sha256_file(path) == entry["sha256"], name
    assert manifest["verification"]["fp32_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("graph", ["model.onnx", "model.int8.onnx"])
def test_graph_outputs_only_the_score_and_never_projects_onto_the_vocabulary(tiny_model_dir: Path, graph):
    model = onnx.load(str(tiny_model_dir / graph))
    assert [o.name for o in model.graph.output] == ["score"]
    (score,) = model.graph.output
    assert [d.dim_param for d in score.type.tensor_type.shape.dim] == ["batch"]
    for inp in model.graph.input:
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]

    shapes = _initializer_shapes(model)
    vocab_tables = {name for name, dims in shapes.items() if TINY_VOCAB in dims}
    assert vocab_tables, "the embedding table should be in the graph"
    # A vocabulary-sized weight may only be read by the embedding lookup, never by a matrix product.
    for node in model.graph.node:
        touched = vocab_tables.intersection(node.input)
        if touched:
            assert node.op_type in ("Gather", "DequantizeLinear"), (node.op_type, touched)
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul"):
            for name in node.input:
                assert TINY_VOCAB not in shapes.get(name, ()), f"{node.name} multiplies by {name}"
    # The head is one [hidden] direction, kept in fp32 even in the int8 graph.
    directions = [n for n, d in shapes.items() if "score_direction" in n]
    assert directions
    assert all(shapes[n] == (TINY_HIDDEN,) for n in directions)


def test_export_prints_verification_and_honours_its_options(tmp_path: Path, tiny_hf_dir: Path, capsys):
    out = tmp_path / "prepared"
    rc = main(
        [
            "export",
            str(tiny_hf_dir),
            "--estimated-max",
            "12",
            "--out",
            str(out),
            "--quantize",
            "int8",
            *TINY_INT8_GATE,
            "--verify-samples",
            "4",
            "--opset",
            "18",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    fp32 = re.search(r"verify fp32: max \|onnx - torch\| = (\S+) over 4 prompts", printed)
    int8 = re.search(r"verify int8: max \|int8 - fp32\| = (\S+),.*Spearman mean (\S+) / min (\S+)", printed)
    assert fp32, printed
    assert int8, printed
    print(printed)  # visible with -s: the verification figures
    assert float(fp32.group(1)) < 1e-4
    assert 0 < float(int8.group(1)) < 2.0
    manifest = load_manifest(out)
    assert manifest.raw["opset"] == 18
    assert manifest.raw["verification"]["samples"] == 4
    # What was written, and how faithful it measured, is recorded next to the graphs.
    int8_record = manifest.precision["int8"]
    assert int8_record["scheme"].startswith("w8a8")
    assert int8_record["fidelity_vs_fp32"]["max_abs_diff"] == pytest.approx(float(int8.group(1)), rel=1e-2)
    assert int8_record["bound"] == {"max_abs_diff": 10.0, "spearman_min": -1.0}
    assert manifest.precision["fp32"]["max_abs_diff_vs_torch"] < 1e-4
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 18


def test_export_refuses_an_int8_graph_outside_its_fidelity_bound(tmp_path: Path, tiny_hf_dir: Path, capsys):
    out = tmp_path / "prepared"
    rc = main(
        [
            "export",
            str(tiny_hf_dir),
            "--estimated-max",
            "12",
            "--out",
            str(out),
            "--quantize",
            "int8",
            "--verify-samples",
            "4",
            "--int8-max-abs-diff",
            "1e-6",
        ]
    )
    assert rc == 2
    line = _one_line_error(capsys)
    assert "max |Δraw|" in line
    assert "> 1e-06" in line
    assert "--int8-max-abs-diff" in line
    assert "--quantize none" in line
    assert not out.exists()  # nothing half-written is left behind


def test_int8_graph_quantizes_every_weight_matrix_per_channel(tiny_model_dir: Path):
    model = onnx.load(str(tiny_model_dir / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # 2 layers x (q, k, v, o, gate, up, down); the last layer's query path runs for one row.
    assert ops.count("MatMulInteger") == 14
    assert "DynamicQuantizeLinear" not in ops  # no per-tensor activation scale anywhere
    weights = [i for i in model.graph.initializer if i.name.endswith("/wq")]
    assert len(weights) == 14
    assert all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    for w in weights:
        q = onnx.numpy_helper.to_array(w)
        assert np.abs(q).max() <= 63  # 7-bit: no int16 saturation on AVX2's VPMADDUBSW


def test_export_without_quantization_writes_no_int8_graph_and_the_engine_says_so(tmp_path: Path, tiny_hf_dir):
    out = tmp_path / "fp32-only"
    assert (
        main(
            [
                "export",
                str(tiny_hf_dir),
                "--estimated-max",
                "12",
                "--out",
                str(out),
                "--quantize",
                "none",
                "--verify-samples",
                "2",
            ]
        )
        == 0
    )
    assert not (out / "model.int8.onnx").exists()
    verify_model_dir(out, "fp32")
    with pytest.raises(ModelPreparationError, match="no int8 graph"):
        verify_model_dir(out, "int8")


# --- the manifest check at load --------------------------------------------------------------------


def test_verify_accepts_an_intact_prepared_folder(tiny_model_dir: Path):
    manifest = verify_model_dir(tiny_model_dir, "int8", verify_hashes=True)
    assert manifest.graph_file("int8") == "model.int8.onnx"
    assert manifest.graph_file("fp32") == "model.onnx"


def test_verify_refuses_a_missing_graph(tmp_path: Path, tiny_model_dir: Path):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    (d / "model.int8.onnx").unlink()
    with pytest.raises(ModelPreparationError, match=r"model\.int8\.onnx is missing"):
        verify_model_dir(d, "int8")
    verify_model_dir(d, "fp32")  # the other graph is still servable


def test_verify_refuses_a_missing_tokenizer(tmp_path: Path, tiny_model_dir: Path):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelPreparationError, match=r"tokenizer\.json is missing"):
        verify_model_dir(d, "fp32", verify_hashes=False)


def test_verify_refuses_a_truncated_graph(tmp_path: Path, tiny_model_dir: Path):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    path = d / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelPreparationError, match="truncated"):
        verify_model_dir(d, "fp32", verify_hashes=False)


def test_verify_refuses_a_changed_graph_by_hash_unless_hashes_are_off(tmp_path: Path, tiny_model_dir: Path):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    path = d / "model.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ModelPreparationError, match="sha256"):
        verify_model_dir(d, "int8", verify_hashes=True)
    verify_model_dir(d, "int8", verify_hashes=False)


def test_verify_refuses_another_contract_version(tmp_path: Path, tiny_model_dir: Path):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    raw = json.loads((d / MANIFEST_NAME).read_text())
    raw["contract_version"] = "mxbai-rerank-v2/0"
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ModelPreparationError, match="contract") as info:
        verify_model_dir(d, "int8", verify_hashes=False)
    assert "mxbai-rerank-v2/0" in str(info.value)
    assert CONTRACT_VERSION in str(info.value)


@pytest.mark.parametrize("content", [None, "{not json", '{"source": "x"}'])
def test_verify_refuses_a_folder_without_a_valid_manifest(tmp_path: Path, tiny_model_dir: Path, content):
    d = _copy_prepared(tiny_model_dir, tmp_path / "m")
    if content is None:
        (d / MANIFEST_NAME).unlink()
    else:
        (d / MANIFEST_NAME).write_text(content)
    with pytest.raises(ModelPreparationError, match="rerank-gateway export"):
        verify_model_dir(d, "int8")


# --- resolving the served model ----------------------------------------------------------------------


def _settings(tmp_path: Path, **kw):
    from gateway.config import Settings

    return Settings(_env_file=None, cache_dir=tmp_path / "cache", **kw)


def test_resolve_returns_a_prepared_model_path_as_is(tmp_path: Path, tiny_model_dir: Path):
    assert resolve_model(_settings(tmp_path, model_path=tiny_model_dir)) == tiny_model_dir


def test_resolve_exports_a_plain_hf_folder_into_the_cache_once(tmp_path: Path, tiny_hf_dir: Path):
    settings = _settings(tmp_path, model_path=tiny_hf_dir, estimated_max=11.0)
    first = resolve_model(settings)
    assert load_manifest(first).estimated_max == 11.0
    assert first.is_relative_to(tmp_path / "cache")
    manifest = verify_model_dir(first, "fp32")
    assert manifest.source == str(tiny_hf_dir.resolve())
    stamp = (first / MANIFEST_NAME).stat().st_mtime_ns
    assert resolve_model(settings) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == stamp  # reused, not exported again


def test_resolve_reuses_a_cached_hub_export_without_the_hub(tmp_path: Path, tiny_model_dir: Path):
    settings = _settings(tmp_path, model="mixedbread-ai/mxbai-rerank-base-v2", model_revision="v1")
    target = resolve.hub_cache_target(model_source(settings))
    _copy_prepared(tiny_model_dir, target)
    assert resolve_model(settings) == target
    other_revision = _settings(tmp_path, model="mixedbread-ai/mxbai-rerank-base-v2", model_revision="v2")
    assert resolve.hub_cache_target(model_source(other_revision)) != target


def test_resolve_without_auto_export_says_how_to_prepare_the_model(tmp_path: Path):
    settings = _settings(tmp_path, model="mixedbread-ai/mxbai-rerank-base-v2", auto_export=False)
    with pytest.raises(ModelPreparationError) as info:
        resolve_model(settings)
    assert "rerank-gateway export" in str(info.value)
    assert "RERANK_MODEL_PATH" in str(info.value)


def test_resolve_with_the_hub_unreachable_names_model_path(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    settings = _settings(tmp_path, model="mixedbread-ai/mxbai-rerank-base-v2")
    with pytest.raises(ModelPreparationError, match="RERANK_MODEL_PATH") as info:
        resolve_model(settings)
    assert "mixedbread-ai/mxbai-rerank-base-v2" in str(info.value)
    assert not model_store.is_prepared_dir(resolve.hub_cache_target(model_source(settings)))


def test_resolve_without_the_export_extra_says_how_to_prepare_the_model(
    tmp_path: Path, tiny_hf_dir: Path, monkeypatch
):
    # Serving images install no torch: simulate that installation.
    monkeypatch.setattr(resolve, "export_available", lambda: False)
    with pytest.raises(ModelPreparationError, match="rerank-gateway export") as info:
        resolve_model(_settings(tmp_path, model_path=tiny_hf_dir))
    assert "RERANK_MODEL_PATH" in str(info.value)


def test_resolve_refuses_a_model_path_that_is_not_a_model(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPreparationError, match="neither a prepared model folder"):
        resolve_model(_settings(tmp_path, model_path=tmp_path / "empty"))
    with pytest.raises(ModelPreparationError, match="is not a folder"):
        resolve_model(_settings(tmp_path, model_path=tmp_path / "absent"))


# --- the CLI on bad input --------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith("[export]")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert errors[0].startswith("rerank-gateway export: error:")
    return errors[0]


def test_cli_export_of_a_missing_folder_fails_with_one_line(tmp_path: Path, capsys):
    rc = main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "neither an existing folder nor a hub id" in _one_line_error(capsys)


def test_cli_export_of_a_folder_without_weights_fails_with_one_line(tmp_path: Path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    rc = main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "not a Hugging Face model folder" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_export_into_a_non_empty_folder_fails_with_one_line(tmp_path: Path, tiny_hf_dir: Path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc = main(["export", str(tiny_hf_dir), "--estimated-max", "12", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "not empty" in _one_line_error(capsys)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_export_with_zero_verify_samples_fails_with_one_line(tmp_path: Path, tiny_hf_dir: Path, capsys):
    rc = main(
        [
            "export",
            str(tiny_hf_dir),
            "--estimated-max",
            "12",
            "--out",
            str(tmp_path / "o"),
            "--verify-samples",
            "0",
        ]
    )
    assert rc == 2
    assert "--verify-samples" in _one_line_error(capsys)


def test_cli_export_with_the_hub_unreachable_fails_with_one_line(tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc = main(
        [
            "export",
            "mixedbread-ai/mxbai-rerank-base-v2",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "hub"),
            "--revision",
            "main",
        ]
    )
    assert rc == 2
    line = _one_line_error(capsys)
    assert "could not download 'mixedbread-ai/mxbai-rerank-base-v2' at revision 'main'" in line
    assert "RERANK_MODEL_PATH" in line


def test_cli_export_rejects_an_unknown_quantization(tmp_path: Path, tiny_hf_dir: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "export",
                str(tiny_hf_dir),
                "--estimated-max",
                "12",
                "--out",
                str(tmp_path / "o"),
                "--quantize",
                "int4",
            ]
        )
    assert info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_left_padding_does_not_change_an_fp32_score(tiny_model_dir: Path, prompt_builder):
    import onnxruntime as ort

    from engines.export import left_pad

    session = ort.InferenceSession(str(tiny_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    short, long_ = prompt_builder.build("a query?", ["short doc.", "a much longer document " * 30])

    def run(rows):
        ids, mask = left_pad(rows, 0)
        return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    alone = run([short.input_ids])
    padded = run([short.input_ids, long_.input_ids])
    assert len(long_) - len(short) > 100
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-4)


# --- the normalization constant ---------------------------------------------------------------------------


def test_export_refuses_to_guess_estimated_max_for_an_unknown_shape(
    tmp_path: Path, tiny_hf_dir: Path, capsys
):
    # The folder's name says base-v2, but the model is not of that shape: nothing is written.
    named = tmp_path / "mxbai-rerank-base-v2"
    shutil.copytree(tiny_hf_dir, named)
    rc = main(["export", str(named), "--out", str(tmp_path / "out"), "--quantize", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "estimated_max" in err
    assert "--estimated-max" in err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_export_records_an_explicit_estimated_max_and_where_it_came_from(tmp_path: Path, tiny_hf_dir: Path):
    out = tmp_path / "out"
    rc = main(
        [
            "export",
            str(tiny_hf_dir),
            "--out",
            str(out),
            "--quantize",
            "none",
            "--verify-samples",
            "2",
            "--estimated-max",
            "9",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["estimated_max"], manifest["estimated_max_source"]) == (9.0, "explicit")
