"""Quantized models in both formats, against the float model as the oracle: the trained digits
CNN quantized to int8 (calibrated on real digits) and to fp16 keeps >= 98% top-1 agreement
with float under TFLite and ONNX, and is smaller. Calibration files are read strictly.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from defer.compiler.quantize import calibration_samples, check_mode
from defer.errors import InputError, UsageError
from defer.tensors import TensorSpec
from tests.tflite_helpers import need_tensorflow

IMAGE = TensorSpec("input", "float32", (None, 8, 8, 1))


def test_check_mode():
    assert check_mode(None) is None and check_mode("int8") == "int8"
    with pytest.raises(UsageError, match="choose one of fp16, int8"):
        check_mode("int4")


def test_npy_samples_with_or_without_a_batch_axis(tmp_path):
    stacked = np.random.default_rng(0).random((5, 8, 8, 1))  # float64: cast to the spec
    np.save(tmp_path / "a.npy", stacked)
    np.save(tmp_path / "b.npy", stacked[:, None])
    for name in ("a.npy", "b.npy"):
        samples = calibration_samples([IMAGE], tmp_path / name)
        assert len(samples) == 5
        assert samples[0]["input"].shape == (1, 8, 8, 1)
        assert samples[0]["input"].dtype == np.float32
        np.testing.assert_array_equal(samples[4]["input"][0], stacked[4].astype(np.float32))


def test_npz_samples_one_array_per_input(tmp_path):
    specs = [TensorSpec("image", "float32", (None, 4)), TensorSpec("ids", "int64", (None, 2))]
    np.savez(tmp_path / "c.npz", image=np.ones((3, 4), np.float32),
             ids=np.zeros((3, 2), np.int64))
    samples = calibration_samples(specs, tmp_path / "c.npz")
    assert len(samples) == 3 and set(samples[0]) == {"image", "ids"}
    np.savez(tmp_path / "d.npz", image=np.ones((3, 4), np.float32))
    with pytest.raises(UsageError, match=r"no array for inputs \['ids'\]"):
        calibration_samples(specs, tmp_path / "d.npz")
    np.save(tmp_path / "e.npy", np.ones((3, 4), np.float32))
    with pytest.raises(UsageError, match="save an .npz"):
        calibration_samples(specs, tmp_path / "e.npy")
    np.savez(tmp_path / "f.npz", image=np.ones((3, 4), np.float32),
             ids=np.zeros((2, 2), np.int64))
    with pytest.raises(InputError, match="different numbers of samples"):
        calibration_samples(specs, tmp_path / "f.npz")


def test_bad_calibration_files(tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((3, 7, 7, 1), np.float32))
    with pytest.raises(InputError, match="has shape"):
        calibration_samples([IMAGE], tmp_path / "wrong.npy")
    np.save(tmp_path / "flat.npy", np.ones((3,), np.float32))
    with pytest.raises(InputError, match="stacked on a first axis"):
        calibration_samples([IMAGE], tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="not a .npy or .npz"):
        calibration_samples([IMAGE], tmp_path / "junk.npy")
    with pytest.raises(UsageError, match="no such file"):
        calibration_samples([IMAGE], tmp_path / "missing.npy")


def test_without_a_file_random_samples_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="defer.compiler.quantize"):
        samples = calibration_samples([IMAGE], count=4)
    assert len(samples) == 4 and samples[0]["input"].shape == (1, 8, 8, 1)
    assert "real samples" in caplog.text


def _top1(engine, x: np.ndarray) -> np.ndarray:
    name = engine.outputs[0].name
    return np.array([np.argmax(engine.run([name], {"input": x[i:i + 1]})[0])
                     for i in range(len(x))])


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """(digits .h5, x_test, calibration samples read from a .npy of 100 real test digits)."""
    need_tensorflow()
    path, x_test, _ = digits
    calibration = tmp_path_factory.mktemp("calibration") / "digits.npy"
    np.save(calibration, x_test[:100])
    return path, x_test, calibration_samples([IMAGE], calibration)


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_digits_tflite_quantized_agrees_with_float(trained, mode):
    from defer.compiler.tflite import read_tflite, to_tflite
    from defer.engines.litert import LiteRTEngine

    path, x_test, samples = trained
    floating, quantized = to_tflite(path), to_tflite(path, mode, samples)
    agreement = np.mean(_top1(LiteRTEngine(quantized), x_test) ==
                        _top1(LiteRTEngine(floating), x_test))
    assert agreement >= 0.98
    assert len(quantized) < (0.35 if mode == "int8" else 0.6) * len(floating)
    if mode == "int8":
        graph = read_tflite(quantized)
        inner = {graph.tensors[t].dtype for k in range(2, graph.n_ops - 1)
                 for t in graph.crossing_tensors(k)}
        assert "int8" in inner and "float32" not in inner


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_digits_onnx_quantized_agrees_with_float(trained, mode):
    from defer.compiler.load import load_model
    from defer.compiler.quantize import quantize_onnx
    from defer.engines.onnx import OnnxEngine

    path, x_test, samples = trained
    floating = load_model(path).model
    quantized = quantize_onnx(floating, mode, samples)
    assert [i.name for i in quantized.graph.input] == [i.name for i in floating.graph.input]
    assert [o.name for o in quantized.graph.output] == [o.name for o in floating.graph.output]
    engines = [OnnxEngine(m.SerializeToString()) for m in (floating, quantized)]
    assert engines[1].inputs[0].dtype == "float32"  # the model's interface stays float
    agreement = np.mean(_top1(engines[1], x_test) == _top1(engines[0], x_test))
    assert agreement >= 0.98
    ops = {n.op_type for n in quantized.graph.node}
    assert ("QuantizeLinear" in ops) == (mode == "int8")
    size = len(quantized.SerializeToString()) / len(floating.SerializeToString())
    assert size < (0.4 if mode == "int8" else 0.6)
