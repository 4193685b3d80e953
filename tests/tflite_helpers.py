"""Shared helpers for the TFLite and quantization tests: the small example models converted to
.tflite once per test session (fp32, fp16, int8; functools.cache, so each conversion runs once
per process) and analysed (a GraphInfo, as the compiler sees them), a chain of stage bundles
run in this process for the oracle comparison, and stage bundles with their manifest for
chains of real nodes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from defer.tensors import Sample, random_inputs

SMALL_MODELS = ("tiny_cnn", "densenet_tiny", "multi_io")
MODES = ("fp32", "fp16", "int8")


def need_tensorflow() -> None:
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tensorflow")


@functools.cache
def keras_model(name: str):
    """The seeded Keras example (built in memory, not cached on disk)."""
    from defer import examples

    return examples.EXAMPLES[name](0)


@functools.cache
def tflite_bytes(name: str, mode: str = "fp32") -> bytes:
    """Example `name` converted to .tflite (int8 calibrated on 16 seeded uniform samples)."""
    from defer.compiler.tflite import to_tflite

    model = keras_model(name)
    if mode == "fp32":
        return to_tflite(model)
    rng = np.random.default_rng(0)
    samples = [{t.name: rng.random((1, *t.shape[1:]), dtype=np.float32) for t in model.inputs}
               for _ in range(16)]
    return to_tflite(model, quantize=mode, samples=samples)


@functools.cache
def control_flow_tflite() -> bytes:
    """A .tflite with a WHILE loop: several subgraphs."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def loop(x):
        return tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2.0),
                             [tf.constant(0), x])[1]

    return _convert_function(loop)


@functools.cache
def flex_tflite() -> bytes:
    """A .tflite that needs a TensorFlow (Flex) op: a determinant."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([4, 4], tf.float32)])
    def determinant(x):
        return tf.linalg.det(x)

    return _convert_function(determinant, select_tf_ops=True)


def _convert_function(function, select_tf_ops: bool = False) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function)
    if select_tf_ops:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def info_of(name: str, mode: str = "fp32", order: str = "file"):
    """(TFLiteGraph, GraphInfo) of example `name` converted in `mode`, ops in `order`."""
    from defer.compiler.tflite import analyse, read_tflite

    graph = read_tflite(tflite_bytes(name, mode))
    return graph, analyse(graph, order=order)


def sample_feeds(graph, count: int = 1, seed: int = 0) -> list[Sample]:
    return random_inputs([graph.tensors[t] for t in graph.input_indices], count, seed)


def run_slices(info, bounds: Sequence[int], feeds: Sample) -> dict[str, np.ndarray]:
    """The model outputs of the chain of stage bundles [bounds[i], bounds[i+1]) of `info`,
    routed by name as the nodes route them."""
    from defer.compiler.tflite import stage_bundle
    from defer.engines.litert import LiteRTEngine

    values = dict(feeds)
    for a, b in zip(bounds[:-1], bounds[1:]):
        engine = LiteRTEngine(stage_bundle(info, a, b, 0)[0])
        names = [s.name for s in engine.outputs]
        values.update(zip(names, engine.run(names, {s.name: values[s.name]
                                                    for s in engine.inputs})))
    return {name: values[name] for name in info.output_names}


def run_whole(graph, feeds: Sample) -> dict[str, np.ndarray]:
    from defer.engines.litert import LiteRTEngine

    engine = LiteRTEngine(graph.data)
    return dict(zip(graph.output_names, engine.run(graph.output_names, feeds)))


def write_bundles(info, bounds: Sequence[int], out_dir: Path, codec: str = "raw"):
    """TFLite stage bundles of `info` cut at `bounds` and their manifest, saved in `out_dir`
    by the compiler's own writer."""
    from defer.compiler.export import write_bundles as write
    from defer.compiler.tflite import stage_bundle
    from defer.manifest import Manifest, load_manifest, sha256_bytes

    bundles, stages = zip(*(stage_bundle(info, a, b, i)
                            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))))
    model = {"name": "test", "source": "model.tflite", "sha256": sha256_bytes(info.model.data),
             "format": "tflite", "n_ops": info.n_ops,
             "inputs": [info.specs[t].to_dict() for t in info.input_names],
             "outputs": [info.specs[t].to_dict() for t in info.output_names]}
    manifest = Manifest(model=model, plan={"strategy": "cuts", "bounds": list(bounds)},
                        stages=list(stages), codec=codec, created_by="tests")
    write(out_dir, list(bundles), manifest)
    return load_manifest(out_dir)
