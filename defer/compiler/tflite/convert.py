"""Conversions that need TensorFlow (the `[keras]` extra): Keras/SavedModel -> `.tflite`, and
`.tflite` -> ONNX.

`to_tflite` uses `tf.lite.TFLiteConverter.from_keras_model` (a `.h5`/`.keras` file or a model
object) or `from_saved_model` (a SavedModel directory), never `from_concrete_functions`, which
leaves variables unfrozen. A Keras model's signature outputs, which the converter calls
`output_0`, `output_1`..., are renamed to the Keras output names so the `.tflite` and the ONNX
conversion of one model share input and output names. `quantize` applies
`defer.compiler.quantize.tflite_quantization`.

`tflite_to_onnx` uses `tf2onnx.convert.from_tflite` and renames the ONNX inputs and outputs
from flatbuffer tensor names to the `.tflite`'s signature names.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from ai_edge_litert.tools import flatbuffer_utils

from defer.compiler.quantize import calibration_samples, check_mode, tflite_quantization
from defer.compiler.tflite.read import read_tflite
from defer.errors import MissingDependencyError, UsageError
from defer.tensors import Sample, TensorSpec

log = logging.getLogger(__name__)

OPSET = 17
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def tensorflow() -> Any:
    """The tensorflow module, or MissingDependencyError naming the extra that brings it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
    except ImportError as err:
        raise MissingDependencyError(
            f"converting to or from TFLite needs TensorFlow ({err.name} is missing); install "
            "it with: pip install 'defer-edge[keras]'") from err
    return tf


def to_tflite(source: str | Path | Any, quantize: str | None = None,
              samples: Sequence[Sample] | None = None) -> bytes:
    """The `.tflite` bytes of a Keras model (file or object) or a SavedModel directory.

    `quantize` ("fp16" or "int8") applies post-training quantization; int8 calibrates on
    `samples` (default: seeded random ones, with a warning)."""
    check_mode(quantize)
    tf = tensorflow()
    keras_model, converter = _converter(tf, source)
    specs = _input_specs(tf, keras_model, converter, source)
    if quantize:
        if quantize == "int8" and not samples:
            samples = calibration_samples(specs)
        tflite_quantization(converter, quantize, samples or [])
    log.info("converting to TFLite%s", f" ({quantize})" if quantize else "")
    try:
        data = converter.convert()
    except Exception as err:  # noqa: BLE001 - the converter raises many types
        reason = " ".join(str(err).split())[:300]
        raise UsageError(f"the TFLite converter failed: {reason}") from None
    if keras_model is not None:
        data = _rename_outputs(data, list(keras_model.output_names))
    return bytes(data)


def _converter(tf: Any, source: str | Path | Any) -> tuple[Any, Any]:
    """(the Keras model or None, a TFLiteConverter for `source`)."""
    if not isinstance(source, str | Path):
        return source, tf.lite.TFLiteConverter.from_keras_model(source)
    path = Path(source)
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise UsageError(f"{path}: a directory but not a SavedModel (no saved_model.pb)")
        return None, tf.lite.TFLiteConverter.from_saved_model(str(path))
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise UsageError(f"{path}: cannot convert {path.suffix!r} to TFLite; pass a .h5 or "
                         ".keras file or a SavedModel directory")
    if not path.is_file():
        raise UsageError(f"{path}: no such file; check the model path")
    import keras

    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file
        raise UsageError(f"{path}: Keras could not load it ({err})") from None
    return model, tf.lite.TFLiteConverter.from_keras_model(model)


def _input_specs(tf: Any, keras_model: Any, converter: Any,
                 source: str | Path | Any) -> list[TensorSpec]:
    if keras_model is not None:
        return [TensorSpec(t.name.split(":")[0], "float32", (None, *tuple(t.shape)[1:]))
                for t in keras_model.inputs]
    function = tf.saved_model.load(str(source)).signatures["serving_default"]
    _, kwargs = function.structured_input_signature
    return [TensorSpec(name, spec.dtype.name, tuple(spec.shape))
            for name, spec in sorted(kwargs.items())]


def _rename_outputs(data: bytes, names: list[str]) -> bytes:
    """Rename signature outputs `output_<i>` to the i-th Keras output name."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    for signature in model.signatureDefs or []:
        for entry in signature.outputs or []:
            name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
            if name.startswith("output_") and name[7:].isdigit() and int(name[7:]) < len(names):
                entry.name = names[int(name[7:])]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tflite_to_onnx(source: str | Path | bytes, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX conversion of a `.tflite` (tf2onnx), inputs and outputs named as its signature."""
    tensorflow()
    try:
        import tf2onnx
    except ImportError as err:
        raise MissingDependencyError(
            f"converting TFLite to ONNX needs tf2onnx ({err}); install it with: "
            "pip install 'defer-edge[keras]'") from err
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    graph = read_tflite(source)
    raw = {_raw_name(graph, t): graph.names[t]
           for t in [*graph.input_indices, *graph.output_indices]}
    with tempfile.TemporaryDirectory(prefix="defer-tflite-") as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(graph.data)
        log.info("converting TFLite to ONNX with tf2onnx (opset %d)", opset)
        model, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
    _rename_tensors(model, raw)
    _reorder(model.graph.input, graph.input_names)
    _reorder(model.graph.output, graph.output_names)
    return model


def _reorder(values: Any, names: list[str]) -> None:
    """Sort a repeated ValueInfoProto field into the order of `names` (signature order)."""
    order = {name: i for i, name in enumerate(names)}
    ordered = sorted(values, key=lambda v: order.get(v.name, len(order)))
    copies = [onnx.ValueInfoProto() for _ in ordered]
    for copy, value in zip(copies, ordered):
        copy.CopyFrom(value)
    del values[:]
    values.extend(copies)


def _raw_name(graph: Any, index: int) -> str:
    name = graph.subgraph.tensors[index].name
    return name.decode() if isinstance(name, bytes) else name


def _rename_tensors(model: onnx.ModelProto, names: dict[str, str]) -> None:
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(t, t) for t in node.input]
        node.output[:] = [names.get(t, t) for t in node.output]
