"""The LiteRT engine behind defer.engines' interface: signature names and specs (with the
quantization of int8 tensors), outputs in the order asked, dynamic batch, clear errors, and an
import that brings in neither TensorFlow nor onnxruntime.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from defer.errors import InputError, ManifestError
from tests.tflite_helpers import need_tensorflow, sample_feeds, tflite_bytes

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def multi_io() -> bytes:
    need_tensorflow()
    return tflite_bytes("multi_io")


def test_importing_the_engine_imports_neither_tensorflow_nor_onnxruntime():
    code = ("import sys; from defer.engines import load_engine; "
            "import defer.engines.litert, defer.runtime.node; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'onnxruntime', 'keras', 'tf2onnx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.keras
def test_specs_use_signature_names_and_outputs_come_in_the_order_asked(multi_io, tmp_path):
    from defer.engines import detect_format, load_engine

    path = tmp_path / "model.tflite"
    path.write_bytes(multi_io)
    assert detect_format(path) == detect_format(multi_io) == "tflite"
    engine = load_engine(path, threads=2)
    assert engine.format == "tflite"
    assert [s.name for s in engine.inputs] == ["image", "vector"]
    assert [s.name for s in engine.outputs] == ["logits", "regression"]
    assert engine.inputs[0].shape == (None, 32, 32, 3) and engine.inputs[0].quant is None
    feeds = {"image": np.ones((1, 32, 32, 3), np.float32), "vector": np.ones((1, 16), np.float32)}
    logits, regression = engine.run(["logits", "regression"], feeds)
    regression2, logits2 = engine.run(["regression", "logits"], feeds)
    assert logits.shape == (1, 10) and regression.shape == (1, 1)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(regression, regression2)


@pytest.mark.keras
def test_dynamic_batch_resizes_and_matches_single_runs(multi_io):
    from defer.engines.litert import LiteRTEngine

    engine = LiteRTEngine(multi_io)
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((3, 32, 32, 3), dtype=np.float32),
             "vector": rng.random((3, 16), dtype=np.float32)}
    (together,) = engine.run(["logits"], batch)
    singles = [engine.run(["logits"], {k: v[i:i + 1] for k, v in batch.items()})[0]
               for i in range(3)]
    assert together.shape == (3, 10)
    np.testing.assert_allclose(together, np.concatenate(singles), rtol=1e-5, atol=1e-5)


@pytest.mark.keras
def test_int8_slice_specs_carry_scale_and_zero_point():
    from defer.compiler.tflite import read_tflite
    from defer.engines.litert import LiteRTEngine

    graph = read_tflite(tflite_bytes("tiny_cnn", "int8"))
    k = graph.position_of(next(op.name for op in graph.ops if op.op_type == "CONV_2D"))
    engine = LiteRTEngine(graph.slice(k, graph.n_ops))
    (received,) = engine.inputs
    assert received == graph.tensors[graph.crossing_tensors(k)[0]]
    assert received.dtype == "int8" and received.quant is not None
    first = LiteRTEngine(graph.slice(0, k))
    feeds = sample_feeds(graph)[0]
    (sent,) = first.run([received.name], feeds)
    assert sent.dtype == np.int8


@pytest.mark.keras
def test_unknown_names_are_input_errors(multi_io):
    from defer.engines.litert import LiteRTEngine

    engine = LiteRTEngine(multi_io)
    feeds = {"image": np.ones((1, 32, 32, 3), np.float32), "vector": np.ones((1, 16), np.float32)}
    with pytest.raises(InputError, match="no output 'nope'"):
        engine.run(["nope"], feeds)
    with pytest.raises(InputError, match="no input 'extra'"):
        engine.run(["logits"], {**feeds, "extra": np.ones(1, np.float32)})


def test_a_model_that_will_not_load_is_a_manifest_error():
    from defer.engines import load_engine

    with pytest.raises(ManifestError, match="LiteRT cannot load the bundle"):
        load_engine(b"\x00\x00\x00\x00TFL3" + bytes(100))
    with pytest.raises(ManifestError, match="LiteRT cannot load the bundle"):
        load_engine(b"garbage", format="tflite")
