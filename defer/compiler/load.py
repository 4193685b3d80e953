"""Load a model as ONNX: `.onnx` directly, Keras (`.h5`, `.keras`, SavedModel) through tf2onnx.

The result is normalised for the later steps: every node has a unique name (profiler events map
to it), Constant nodes become initializers (so they never cross a cut), and every tensor has a
type and shape (onnx shape inference, then one real run for whatever inference left unknown).
TensorFlow is imported only for Keras input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from defer.errors import MissingDependencyError, UsageError
from defer.manifest import sha256_bytes
from defer.tensors import random_inputs

log = logging.getLogger(__name__)

OPSET = 17
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    name: str
    source: str
    sha256: str


def load_model(source: str | Path | onnx.ModelProto, opset: int = OPSET) -> LoadedModel:
    """Read `source` and return a normalised ONNX model with its provenance."""
    if isinstance(source, onnx.ModelProto):
        data = source.SerializeToString()
        loaded = LoadedModel(source, source.graph.name or "model", "<memory>", sha256_bytes(data))
    else:
        loaded = _load_path(Path(source), opset)
    loaded.model = _normalise(loaded.model)
    return loaded


def _load_path(path: Path, opset: int) -> LoadedModel:
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory; check the model path")
    name = path.stem if path.is_file() else path.name
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise UsageError(f"{path}: a directory but not a SavedModel (no saved_model.pb); "
                             "pass a .onnx, .h5 or .keras file or a SavedModel directory")
        model = _convert_saved_model(path, opset)
        return LoadedModel(model, name, path.name, sha256_bytes(model.SerializeToString()))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            model = onnx.load(str(path))
        except Exception as err:  # onnx raises DecodeError, ValueError... for a bad file
            raise UsageError(f"{path}: not a readable ONNX model ({err}); "
                             "re-export it or check the file") from err
    elif suffix in KERAS_SUFFIXES:
        model = _convert_keras(path, opset)
    else:
        raise UsageError(f"{path}: unknown model format {suffix!r}; "
                         "defer reads .onnx, .h5, .keras or a SavedModel directory")
    return LoadedModel(model, name, path.name, sha256_bytes(path.read_bytes()))


def _import_converter():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as err:
        raise MissingDependencyError(
            f"Keras input needs TensorFlow and tf2onnx ({err.name} is missing); "
            "install them with: pip install 'defer-edge[keras]'") from err
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    return tf, tf2onnx


def _convert_keras(path: Path, opset: int) -> onnx.ModelProto:
    tf, tf2onnx = _import_converter()
    import keras

    log.info("loading Keras model %s", path.name)
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        raise UsageError(f"{path}: Keras could not load it ({err}); check the file") from err
    signature = [
        tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype, name=_input_name(t, i))
        for i, t in enumerate(model.inputs)
    ]
    log.info("converting with tf2onnx (opset %d), this takes a while for big models", opset)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    return onnx_model


def _input_name(tensor, index: int) -> str:
    name = getattr(tensor, "name", "") or f"input_{index}"
    return name.split(":")[0]


def _convert_saved_model(path: Path, opset: int) -> onnx.ModelProto:
    tf, tf2onnx = _import_converter()
    log.info("loading SavedModel %s", path)
    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise UsageError(f"{path}: the SavedModel has no 'serving_default' signature; "
                         "export it with model.export(dir)")
    fn = loaded.signatures["serving_default"]
    _, kwargs = fn.structured_input_signature
    signature = [tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in sorted(kwargs.items())]
    log.info("converting with tf2onnx (opset %d)", opset)
    onnx_model, _ = tf2onnx.convert.from_function(
        tf.function(lambda *args: fn(**{s.name: a for s, a in zip(signature, args)})),
        input_signature=signature, opset=opset)
    return onnx_model


def _normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    model = _constants_to_initializers(model)
    _name_nodes(model.graph)
    model = onnx.shape_inference.infer_shapes(model)
    _fill_unknown_shapes(model)
    return model


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    keep = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _fill_unknown_shapes(model: onnx.ModelProto) -> None:
    """Give every tensor a type and shape: run once and read what shape inference missed."""
    graph = model.graph
    known = {vi.name for vi in list(graph.value_info) + list(graph.output) + list(graph.input)
             if vi.type.tensor_type.elem_type and vi.type.tensor_type.HasField("shape")}
    inits = {i.name for i in graph.initializer}
    missing = [t for n in graph.node for t in n.output if t and t not in known and t not in inits]
    if not missing:
        return
    log.info("shape inference left %d tensors without a shape; reading them from one run",
             len(missing))
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in missing)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = sample_inputs(model, batch=1)
    values = session.run(missing, feeds)
    for name, value in zip(missing, values):
        graph.value_info.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))


def sample_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the model's input shapes, dynamic dims set to `batch`."""
    from defer.compiler.graph import value_info_spec

    inits = {i.name for i in model.graph.initializer}
    specs = [value_info_spec(vi) for vi in model.graph.input if vi.name not in inits]
    return random_inputs([s for s in specs if s is not None], 1, seed, batch)[0]


__all__ = ["LoadedModel", "load_model", "sample_inputs"]
