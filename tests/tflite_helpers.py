"""Shared helpers for the TFLite and quantization tests: the small example models converted to
.tflite once per test session (fp32, fp16, int8; functools.cache, so each conversion runs once
per process), a chain of slices run in this process for the oracle comparison, and stage
bundles with their manifest for chains of real nodes.
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


def sample_feeds(graph, count: int = 1, seed: int = 0) -> list[Sample]:
    return random_inputs([graph.tensors[t] for t in graph.input_indices], count, seed)


def run_slices(graph, bounds: Sequence[int], feeds: Sample) -> dict[str, np.ndarray]:
    """The model outputs of the chain of slices [bounds[i], bounds[i+1]), routed by name."""
    from defer.engines.litert import LiteRTEngine

    values = dict(feeds)
    for a, b in zip(bounds[:-1], bounds[1:]):
        engine = LiteRTEngine(graph.slice(a, b))
        names = [s.name for s in engine.outputs]
        values.update(zip(names, engine.run(names, {s.name: values[s.name]
                                                    for s in engine.inputs})))
    return {name: values[name] for name in graph.output_names}


def run_whole(graph, feeds: Sample) -> dict[str, np.ndarray]:
    from defer.engines.litert import LiteRTEngine

    engine = LiteRTEngine(graph.data)
    return dict(zip(graph.output_names, engine.run(graph.output_names, feeds)))


def write_bundles(graph, bounds: Sequence[int], out_dir: Path, codec: str = "raw"):
    """TFLite stage bundles of `graph` cut at `bounds` and their manifest, saved in `out_dir`."""
    from defer.compiler.tflite.slicer import stage_bundle
    from defer.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    stages = []
    for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        bundle, spec = stage_bundle(graph, a, b, index)
        (out_dir / spec.file).write_bytes(bundle)
        stages.append(spec)
    model = {"name": "test", "source": "model.tflite", "sha256": sha256_bytes(graph.data),
             "n_ops": graph.n_ops,
             "inputs": [graph.tensors[t].to_dict() for t in graph.input_indices],
             "outputs": [graph.tensors[t].to_dict() for t in graph.output_indices]}
    Manifest(model=model, plan={"strategy": "cuts", "bounds": list(bounds)}, stages=stages,
             codec=codec, created_by="tests").save(out_dir / MANIFEST_NAME)
    return load_manifest(out_dir)
