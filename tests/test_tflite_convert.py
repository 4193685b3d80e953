"""Conversions that need TensorFlow: Keras file/object and SavedModel -> .tflite (the Keras
output names kept), and .tflite -> ONNX with the .tflite's signature names, matching LiteRT.
Without TensorFlow each says which extra to install.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from defer.errors import MissingDependencyError, UsageError
from tests.tflite_helpers import keras_model, need_tensorflow, run_whole, sample_feeds, tflite_bytes

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module", autouse=True)
def _tensorflow():
    need_tensorflow()


def test_tflite_to_onnx_keeps_signature_names_and_matches_litert():
    from defer.compiler.tflite import read_tflite, tflite_to_onnx
    from defer.engines.onnx import OnnxEngine

    graph = read_tflite(tflite_bytes("multi_io"))
    model = tflite_to_onnx(graph.data)
    assert [i.name for i in model.graph.input] == ["image", "vector"]
    assert [o.name for o in model.graph.output] == ["logits", "regression"]
    engine = OnnxEngine(model.SerializeToString())
    for feeds in sample_feeds(graph, count=2):
        want = run_whole(graph, feeds)
        got = dict(zip(graph.output_names, engine.run(graph.output_names, feeds)))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_keras_file_saved_model_and_object_convert_alike(tmp_path):
    from defer.compiler.tflite import read_tflite, to_tflite

    model = keras_model("tiny_cnn")
    model.save(tmp_path / "tiny.keras")
    model.export(str(tmp_path / "saved"))
    graphs = [read_tflite(to_tflite(source)) for source in
              (model, tmp_path / "tiny.keras", tmp_path / "saved")]
    assert graphs[0].output_names == graphs[1].output_names == ["logits"]
    feeds = sample_feeds(graphs[0])[0]
    want = run_whole(graphs[0], feeds)["logits"]
    for graph in graphs[1:]:
        (got,) = run_whole(graph, {graph.input_names[0]: feeds["input"]}).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_sources_are_usage_errors(tmp_path):
    from defer.compiler.tflite import to_tflite

    with pytest.raises(UsageError, match="cannot convert '.onnx'"):
        to_tflite(tmp_path / "model.onnx")
    with pytest.raises(UsageError, match="no such file"):
        to_tflite(tmp_path / "missing.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a SavedModel"):
        to_tflite(tmp_path / "empty")


def test_without_tensorflow_the_error_names_the_extra(monkeypatch):
    from defer.compiler.tflite import tflite_to_onnx, to_tflite

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    for convert in (to_tflite, tflite_to_onnx):
        with pytest.raises(MissingDependencyError, match=r"defer-edge\[keras\]"):
            convert("model.h5")
