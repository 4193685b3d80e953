"""Quantized models in both formats, against the float model as the oracle: the trained digits
CNN quantized to int8 (calibrated on real digits) and to fp16 keeps >= 98% top-1 agreement
with float under TFLite and ONNX, whole and compiled into int8 stages, and is smaller.
Calibration files are read strictly.
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
    """(digits .h5, x_test, calibration samples read from a .npy of 100 real test digits,
    that .npy)."""
    need_tensorflow()
    path, x_test, _ = digits
    calibration = tmp_path_factory.mktemp("calibration") / "digits.npy"
    np.save(calibration, x_test[:100])
    return path, x_test, calibration_samples([IMAGE], calibration), calibration


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_digits_tflite_quantized_agrees_with_float(trained, mode):
    from defer.compiler.tflite import analyse, read_tflite, to_tflite
    from defer.engines.litert import LiteRTEngine

    path, x_test, samples, _ = trained
    floating, quantized = to_tflite(path), to_tflite(path, mode, samples)
    agreement = np.mean(_top1(LiteRTEngine(quantized), x_test) ==
                        _top1(LiteRTEngine(floating), x_test))
    assert agreement >= 0.98
    assert len(quantized) < (0.35 if mode == "int8" else 0.6) * len(floating)
    if mode == "int8":
        info = analyse(read_tflite(quantized))
        inner = {info.specs[t].dtype for k in range(2, info.n_ops - 1) for t in info.crossing(k)}
        assert "int8" in inner and "float32" not in inner


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_digits_onnx_quantized_agrees_with_float(trained, mode):
    from defer.compiler.load import load_model
    from defer.compiler.quantize import quantize_onnx
    from defer.engines.onnx import OnnxEngine

    path, x_test, samples, _ = trained
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


@pytest.mark.keras
@pytest.mark.parametrize("format", ["tflite", "onnx"])
def test_compiled_int8_digits_keep_top1_agreement_with_float(trained, tmp_path, format):
    """`compile --quantize int8 --calibration digits.npy`, both formats: the chain of int8
    stages agrees with the float stages on >= 98% of the real test digits, and the manifest
    records size, speed and agreement against float."""
    from defer.compiler import compile_model
    from defer.fidelity import run_chain

    path, x_test, _, calibration = trained
    manifests = [compile_model(path, 2, tmp_path / mode, format=format, profile=False,
                               quantize=None if mode == "float" else mode,
                               calibration=None if mode == "float" else calibration)
                 for mode in ("float", "int8")]
    floating, quantized = (np.argmax(run_chain(m, {"input": x_test})["logits"], axis=-1)
                           for m in manifests)
    assert np.mean(quantized == floating) >= 0.98
    record = manifests[1].model["quantization"]
    assert record["mode"] == "int8" and record["calibration"] == "digits.npy"
    assert record["compared_on"] == 100 and record["top1_agreement"] >= 0.98
    assert record["bytes"] < 0.4 * record["float_bytes"]
    sizes = [sum(m.bundle_path(s.index).stat().st_size for s in m.stages) for m in manifests]
    assert sizes[1] < 0.5 * sizes[0]
    if format == "tflite":  # int8 activations cross the cut, with their scale and zero point
        (sent,) = manifests[1].stages[0].outputs
        assert sent.dtype == "int8" and sent.quant is not None


@pytest.mark.keras
def test_every_tensor_of_the_loaded_models_has_at_most_the_batch_dynamic(trained):
    """Keras' Flatten becomes a Reshape to a computed shape, which onnx shape inference leaves
    as [?, ?] (priced as one element per sample); the loader reads it from a run: [?, 512]."""
    from defer.compiler.graph import analyse
    from defer.compiler.load import load_model

    path, _, _, calibration = trained
    for quantize in (None, "int8"):
        info = analyse(load_model(path, quantize=quantize,
                                  calibration=calibration if quantize else None).model)
        assert all(sum(not isinstance(d, int) for d in s.shape) <= 1
                   for s in info.specs.values())
        assert info.specs["digits_cnn_1/flatten_1/Reshape:0"].shape[1:] == (512,)


@pytest.mark.keras
@pytest.mark.parametrize("format", ["tflite", "onnx"])
def test_fp16_stages_verify_within_the_quantized_tolerance(trained, tmp_path, format):
    """TFLite fp16 slices give exactly the whole model; onnxruntime may round an fp16 kernel
    it can no longer fuse differently, within QUANTIZED_TOLERANCE (--verify's default)."""
    from defer.compiler import compile_model, load_model, verify
    from defer.compiler.verify import QUANTIZED_TOLERANCE, tolerance_for

    loaded = load_model(trained[0], format=format, quantize="fp16")
    manifest = compile_model(loaded, 3, tmp_path / "bundles", profile=False)
    assert tolerance_for(manifest) == QUANTIZED_TOLERANCE
    fidelity = verify(manifest, loaded)
    assert fidelity.max_rel == 0.0 if format == "tflite" else fidelity.max_rel < 1e-2
