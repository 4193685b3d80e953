"""Load a model as ONNX: `.onnx` directly, Keras (`.h5`, `.keras`, SavedModel) through tf2onnx.

The result is normalised for the later steps: local functions are inlined, every node has a
unique name (profiler events map to it), Constant nodes become initializers, and every tensor
has a type and shape (onnx shape inference on the graph without its weights' bytes, then a real
run for whatever inference left unknown, keeping dynamic dims dynamic). External data
(`model.onnx` + `model.onnx.data`, what torch's dynamo exporter writes) is read with the model;
past 2 GB, sessions are made from a file with external data.
TensorFlow is imported only for Keras input.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import helper

from defer import progress
from defer.errors import MissingDependencyError, UsageError
from defer.manifest import sha256_bytes, sha256_file
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
    with progress.phase("load"):
        if isinstance(source, onnx.ModelProto):
            loaded = LoadedModel(source, source.graph.name or "model", "<memory>",
                                 _proto_sha256(source))
        else:
            loaded = _load_path(Path(source), opset)
        loaded.model = _normalise(loaded.model)
    return loaded


def _proto_sha256(model: onnx.ModelProto) -> str:
    try:
        return sha256_bytes(model.SerializeToString())
    except ValueError:  # over 2 GB: hash the graph without its weights' bytes
        skeleton = _skeleton(model)
        return sha256_bytes(skeleton.SerializeToString())


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
            model = onnx.load(str(path))  # external data (model.onnx.data) is read too
        except Exception as err:  # onnx raises DecodeError, ValueError... for a bad file
            raise UsageError(f"{path}: not a readable ONNX model ({err}); re-export it, or "
                             "check that its external data file sits beside it") from err
    elif suffix in KERAS_SUFFIXES:
        model = _convert_keras(path, opset)
    else:
        raise UsageError(f"{path}: unknown model format {suffix!r}; "
                         "defer reads .onnx, .h5, .keras or a SavedModel directory")
    return LoadedModel(model, name, path.name, sha256_file(path))


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
    if model.functions:  # local functions: inline them so every op is a graph node
        model = onnx.inliner.inline_local_functions(model)
    model = _constants_to_initializers(model)
    _name_nodes(model.graph)
    _infer_shapes(model)
    _fill_unknown_shapes(model)
    return model


def _infer_shapes(model: onnx.ModelProto) -> None:
    """onnx shape inference on the graph without its big weights' bytes (only their shapes
    matter), so it costs little memory and works past protobuf's 2 GB."""
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for mine, theirs in zip(model.graph.output, inferred.graph.output):
        if not mine.type.tensor_type.HasField("shape"):
            mine.CopyFrom(theirs)


def _skeleton(model: onnx.ModelProto, above: int = 1 << 16) -> onnx.ModelProto:
    """A copy of `model` whose initializers over `above` bytes keep dims and type, no data."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip=("graph",))
    _copy_fields(model.graph, skeleton.graph, skip=("initializer",))
    skeleton.graph.initializer.extend(_light_tensor(t, above) for t in model.graph.initializer)
    return skeleton


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _light_tensor(tensor: onnx.TensorProto, above: int) -> onnx.TensorProto:
    if tensor.ByteSize() <= above:
        return tensor
    light = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    light.data_location = onnx.TensorProto.EXTERNAL
    light.external_data.add(key="location", value="defer-shape-inference-only")
    return light


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
    """Give every tensor a type and shape: run and read what shape inference missed.

    With dynamic input dims it runs at batch 1 and 2 and keeps the dims that differ dynamic,
    so bundles keep accepting any batch."""
    graph = model.graph
    known = {vi.name for vi in list(graph.value_info) + list(graph.output) + list(graph.input)
             if vi.type.tensor_type.elem_type and vi.type.tensor_type.HasField("shape")}
    inits = {i.name for i in graph.initializer}
    missing = [t for n in graph.node for t in n.output if t and t not in known and t not in inits]
    if not missing:
        return
    log.info("shape inference left %d tensors without a shape; reading them from a run",
             len(missing))
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in missing)
    with tempfile.TemporaryDirectory(prefix="defer-shapes-") as tmp:
        session = ort_session(probe, ort.SessionOptions(), tmp)
    del probe
    runs = [session.run(missing, sample_inputs(model, batch=b)) for b in _batches(model)]
    outputs = {o.name: o for o in graph.output}
    for i, name in enumerate(missing):
        shapes = [values[i].shape for values in runs]
        shape = [d if all(s[j] == d for s in shapes) else None for j, d in enumerate(shapes[0])]
        info = helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(runs[0][i].dtype), shape)
        graph.value_info.append(info)
        if name in outputs:
            outputs[name].CopyFrom(info)


def _batches(model: onnx.ModelProto) -> list[int]:
    from defer.compiler.graph import value_info_spec

    inits = {i.name for i in model.graph.initializer}
    specs = [value_info_spec(vi) for vi in model.graph.input if vi.name not in inits]
    dynamic = any(not isinstance(d, int) for s in specs if s for d in s.shape)
    return [1, 2] if dynamic else [1]


def ort_session(model: onnx.ModelProto, options, folder: str | Path):
    """An onnxruntime session of `model`, from bytes, or past 2 GB from a file with external
    data written into `folder` (which may be deleted once this returns)."""
    import onnxruntime as ort

    options.log_severity_level = 3
    if model.ByteSize() < 2**31 - 2**26:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    path = Path(folder) / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the model's input shapes, dynamic dims set to `batch`."""
    from defer.compiler.graph import value_info_spec

    inits = {i.name for i in model.graph.initializer}
    specs = [value_info_spec(vi) for vi in model.graph.input if vi.name not in inits]
    return random_inputs([s for s in specs if s is not None], 1, seed, batch)[0]


__all__ = ["LoadedModel", "load_model", "ort_session", "sample_inputs"]
