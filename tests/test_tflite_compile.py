"""`defer compile`, `defer inspect` and `defer run` with TFLite, through click's CliRunner and the
Python API: a .tflite cut on its own operators, Keras and SavedModel input with --format tflite, a
.tflite turned into ONNX stages, the cut rules shared with ONNX (--cut, --bandwidth, --speeds,
--memory, --codec, --no-profile), --verify against the whole .tflite (0.0), and what is refused
with one line and exit code 2.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from defer.cli import main
from defer.manifest import load_manifest
from tests.tflite_helpers import (
    control_flow_tflite,
    flex_tflite,
    need_tensorflow,
    run_whole,
    sample_feeds,
    tflite_bytes,
)

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module", autouse=True)
def _tensorflow():
    need_tensorflow()


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write(tmp_path, name: str, mode: str = "fp32"):
    path = tmp_path / f"{name}-{mode}.tflite"
    path.write_bytes(tflite_bytes(name, mode))
    return path


@pytest.mark.parametrize(("name", "mode", "n"), [("densenet_tiny", "int8", 3),
                                                 ("multi_io", "fp32", 2)])
def test_a_tflite_compiles_verifies_and_inspects(tmp_path, name, mode, n):
    path, out = _write(tmp_path, name, mode), tmp_path / "bundles"
    result = _run("compile", path, "-n", n, "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: max abs error 0, max relative error 0" in result.output
    manifest = load_manifest(out)
    assert manifest.model["format"] == "tflite" and "opset" not in manifest.model
    assert [s.file for s in manifest.stages] == [f"bundle_{i}.tflite" for i in range(n)]
    assert manifest.plan["cost_source"] == "LiteRT one-op timing"
    shown = _run("inspect", out)
    assert shown.exit_code == 0 and f"{n} tflite stages" in shown.output
    assert "only activations cross the cuts" in shown.output
    if mode == "int8":
        assert " int8 " in shown.output and "scale " in shown.output
        sent = [t for s in manifest.stages[:-1] for t in s.outputs]
        assert sent and all(t.quant is not None for t in sent if t.dtype == "int8")


def test_keras_input_with_format_tflite_follows_the_onnx_cut_rules(tmp_path, keras_h5):
    out = tmp_path / "bundles"
    result = _run("compile", keras_h5("densenet_tiny"), "-n", 3, "-o", out, "--format",
                  "tflite", "--bandwidth", "100Mbit", "--speeds", "2,1,1", "--memory", "8MB",
                  "--codec", "lz4", "--order", "auto", "--verify")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert {s.format for s in manifest.stages} == {"tflite"} and manifest.codec == "lz4"
    assert manifest.plan["bandwidth"] == 12.5e6 and manifest.plan["speeds"] == [2, 1, 1]
    assert manifest.plan["op_order"] in ("file", "depth", "greedy")
    # A slow link: the cuts avoid DenseNet's wide crossing sets.
    assert manifest.plan["wire_bytes"] < manifest.plan["baselines"]["layers"]["wire_bytes"]


def test_a_saved_model_becomes_tflite_stages(tmp_path):
    from tests.tflite_helpers import keras_model

    keras_model("tiny_cnn").export(str(tmp_path / "saved"))
    result = _run("compile", tmp_path / "saved", "-n", 2, "--format", "tflite", "-o",
                  tmp_path / "bundles", "--verify")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "bundles")
    assert manifest.model["format"] == "tflite" and manifest.model["source"] == "saved"


def test_cut_by_op_type_and_the_flop_estimate(tmp_path):
    path, out = _write(tmp_path, "tiny_cnn"), tmp_path / "bundles"
    result = _run("compile", path, "--cut", "CONV_2D#2", "-o", out, "--no-profile", "--verify")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.plan["cost_source"].startswith("estimate")
    first, second = manifest.stages
    assert first.last_op.startswith("tiny_cnn_1/conv2")
    assert second.first_op.startswith("tiny_cnn_1/pool2")


def test_a_tflite_becomes_onnx_stages_through_tf2onnx(tmp_path):
    from defer.fidelity import compare, run_chain

    path, out = _write(tmp_path, "multi_io"), tmp_path / "bundles"
    result = _run("compile", path, "--format", "onnx", "-n", 2, "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.model["format"] == "onnx" and manifest.model["opset"] == 17
    assert [s.file for s in manifest.stages] == ["bundle_0.onnx", "bundle_1.onnx"]
    from defer.compiler.tflite import read_tflite

    graph = read_tflite(path)
    feeds = sample_feeds(graph)[0]
    assert compare(run_chain(manifest, feeds), run_whole(graph, feeds)).max_rel < 1e-4


def test_tflite_to_onnx_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    path = _write(tmp_path, "tiny_cnn")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    result = _run("compile", path, "--format", "onnx", "-n", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "converting TFLite to ONNX needs TensorFlow and tf2onnx" in result.output
    assert "pip install 'defer-edge[keras]'" in result.output


def _bad(tmp_path, kind: str):
    """(model path, extra CLI args) of one thing defer refuses."""
    if kind == "subgraphs":
        return _file(tmp_path, "while.tflite", control_flow_tflite()), []
    if kind == "flex":
        return _file(tmp_path, "flex.tflite", flex_tflite()), []
    if kind == "corrupt":
        return _file(tmp_path, "cut.tflite", tflite_bytes("tiny_cnn")[:3000]), []
    if kind == "onnx to tflite":
        import onnx

        from tests.onnx_graphs import residual_mlp

        path = tmp_path / "mlp.onnx"
        onnx.save(residual_mlp(), path)
        return path, ["--format", "tflite"]
    if kind == "quantize a tflite":
        return _write(tmp_path, "tiny_cnn"), ["--quantize", "int8"]
    np.save(tmp_path / "cal.npy", np.zeros((2, 32, 32, 3), np.float32))
    return _write(tmp_path, "tiny_cnn"), ["--calibration", tmp_path / "cal.npy"]


def _file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


REFUSALS = {"subgraphs": "subgraphs", "flex": "Flex", "corrupt": "corrupt",
            "onnx to tflite": "cannot become TFLite stages",
            "quantize a tflite": "cannot be quantized again",
            "calibration alone": "only used with --quantize"}


@pytest.mark.parametrize("kind", REFUSALS)
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, kind):
    path, extra = _bad(tmp_path, kind)
    out = tmp_path / "out"
    result = _run("compile", path, "-n", 2, "-o", out, *extra)
    assert result.exit_code == 2, result.output
    assert REFUSALS[kind] in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error" in line]) == 1
    assert not out.exists()


def test_run_format_tflite_compiles_and_uses_the_whole_tflite_as_reference(tmp_path, keras_h5):
    from defer.local import run_local

    report = run_local(keras_h5("tiny_cnn"), n_stages=2, count=20, format="tflite",
                       out_dir=tmp_path / "bundles", profile=False)
    assert report["single"]["reference"] == "whole model"
    assert report["fidelity"]["max_abs"] == 0.0  # raw hops: bit-exact
    assert {s.format for s in load_manifest(tmp_path / "bundles").stages} == {"tflite"}
    path = _write(tmp_path, "tiny_cnn")  # a bundle folder beside its .tflite: found by name
    assert _run("compile", path, "-n", 2, "-o", tmp_path / "b2").exit_code == 0
    result = _run("run", tmp_path / "b2", "--count", 10, "--format", "tflite",
                  "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["single"]["reference"] == "whole model" and report["fidelity"]["max_abs"] == 0
    wrong = _run("run", tmp_path / "b2", "--count", 10, "--format", "onnx")
    assert wrong.exit_code == 2 and "holds tflite stages" in wrong.output


def test_example_tflite_is_converted_once(tmp_path):
    from defer import examples

    path = examples.example_tflite("tiny_cnn", cache_dir=tmp_path)
    assert path.name == f"tiny_cnn-v{examples.BUILDERS_VERSION}.tflite"
    mtime = path.stat().st_mtime_ns
    assert examples.example_tflite("tiny_cnn", cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert path.read_bytes()[4:8] == b"TFL3"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".h5", ".tflite"]
