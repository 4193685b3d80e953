"""The example models: each small one builds, saves, converts with tf2onnx to the advertised ONNX
names and matches Keras in onnxruntime; digits_cnn is accurate. Big models are not built here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from defer import examples
from defer.errors import MissingDependencyError, UsageError

# ONNX (input names, output names) after tf2onnx with the Keras input names as the signature.
EXPECTED_NAMES = {
    "tiny_cnn": (["input"], ["logits"]),
    "densenet_tiny": (["input"], ["logits"]),
    "multi_io": (["image", "vector"], ["logits", "regression"]),
    "wide_skip": (["input"], ["logits"]),
}


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    return tf


def _load(path: Path):
    import keras

    return keras.models.load_model(path, compile=False)


def _to_onnx_session(tf, model):
    import onnxruntime as ort
    import tf2onnx

    signature = [
        tf.TensorSpec((None, *inp.shape[1:]), tf.float32, name=inp.name) for inp in model.inputs
    ]
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=17)
    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def _keras_outputs(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    arrays = [feeds[inp.name] for inp in model.inputs]
    outputs = model.predict(arrays if len(arrays) > 1 else arrays[0], verbose=0)
    return outputs if isinstance(outputs, list) else [outputs]


@pytest.mark.keras
@pytest.mark.parametrize("name", examples.SMALL_EXAMPLES)
def test_small_example_converts_and_matches_keras(tf, tmp_path, name):
    path = examples.build(name, tmp_path / f"{name}.h5")
    model = _load(path)
    session = _to_onnx_session(tf, model)

    input_names, output_names = EXPECTED_NAMES[name]
    assert [i.name for i in session.get_inputs()] == input_names
    assert [o.name for o in session.get_outputs()] == output_names

    rng = np.random.default_rng(1)
    feeds = {inp.name: rng.random((3, *inp.shape[1:]), dtype=np.float32) for inp in model.inputs}
    for onnx_out, keras_out in zip(session.run(None, feeds), _keras_outputs(model, feeds)):
        assert onnx_out.shape == keras_out.shape
        assert np.abs(keras_out).max() > 1e-2, "logits collapsed to ~0: fidelity checks are moot"
        np.testing.assert_allclose(onnx_out, keras_out, rtol=1e-4, atol=1e-5)


@pytest.mark.keras
def test_same_seed_same_weights(tf, tmp_path):
    def weights(seed: int) -> list[np.ndarray]:
        return _load(examples.build("tiny_cnn", tmp_path / f"s{seed}.h5", seed=seed)).get_weights()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.keras
def test_batchnorm_is_calibrated_on_the_seeded_batch(tf):
    # The seed-0 calibration batch: inference mode must now equal training (batch-stat) mode.
    model = examples.densenet_tiny(seed=0)
    batch = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    inference = np.asarray(model(batch, training=False))
    training = np.asarray(model(batch, training=True))
    np.testing.assert_allclose(inference, training, rtol=1e-4, atol=1e-5)


@pytest.mark.keras
def test_example_model_builds_once_and_atomically(tf, tmp_path):
    path = examples.example_model("tiny_cnn", cache_dir=tmp_path)
    assert path == tmp_path / f"tiny_cnn-v{examples.BUILDERS_VERSION}.h5"
    mtime = path.stat().st_mtime_ns
    assert examples.example_model("tiny_cnn", cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.mark.keras
def test_digits_cnn_is_accurate_in_onnxruntime(tf, digits):
    path, x_test, y_test = digits
    assert x_test.shape[1:] == (8, 8, 1) and x_test.dtype == np.float32
    assert x_test.min() >= 0.0 and x_test.max() <= 1.0
    model = _load(path)
    session = _to_onnx_session(tf, model)
    assert [i.name for i in session.get_inputs()] == ["input"]

    (logits,) = session.run(None, {"input": x_test})
    np.testing.assert_allclose(logits, model.predict(x_test, verbose=0), rtol=1e-4, atol=1e-4)
    assert (logits.argmax(axis=1) == y_test).mean() > 0.95


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(UsageError, match="tiny_cnn"):
        examples.build("resnet5", tmp_path / "x.h5")
    with pytest.raises(UsageError, match="resnet50"):
        examples.example_model("nope", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_bad_suffix_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"\.h5 or \.keras"):
        examples.build("tiny_cnn", tmp_path / "model.onnx")


def test_missing_tensorflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # makes `import keras` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"defer-edge\[keras\]"):
        examples.build("tiny_cnn", tmp_path / "t.h5")
