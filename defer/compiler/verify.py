"""Check and time compiled bundles in this process: `verify` (the chain against the whole
model, ONNX or TFLite, raising above a tolerance), `measure_stages` (each bundle alone, on real
activations; `median_seconds` is the compiler's one timing loop) and `constant_sends` (which
sent tensors are not activations: an audit of the bundles themselves, independent of how the
compiler chose them). The first two run bundles with the nodes' own engines (`defer.engines`)
and route tensors with `defer.fidelity.run_chain`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from defer.engines import Engine, load_engine
from defer.engines.profiling import time_calls
from defer.errors import VerifyError
from defer.fidelity import Fidelity, compare, run_chain, stage_engines
from defer.manifest import Manifest
from defer.tensors import random_inputs

TOLERANCE = 1e-4  # what --verify accepts: largest error / largest reference magnitude
QUANTIZED_TOLERANCE = 1e-2


def verify(manifest: Manifest, model, batch: int = 1, tolerance: float | None = None,
           seed: int = 0) -> Fidelity:
    """Run the bundles stage by stage and compare with the whole model; raise above tolerance.

    `model` is a path, an onnx.ModelProto or a LoadedModel (ONNX, or TFLite: its whole
    `.tflite` under LiteRT is the reference). `tolerance`: see `tolerance_for`."""
    tolerance = tolerance_for(manifest, tolerance)
    engine = whole_engine(model)
    feeds = random_inputs(manifest.inputs, 1, seed, batch)[0]
    names = [t.name for t in manifest.outputs]
    reference = dict(zip(names, engine.run(names, feeds)))
    fidelity = compare(run_chain(manifest, feeds), reference)
    if fidelity.max_rel > tolerance:
        raise VerifyError(f"the stages differ from the whole model: {fidelity} "
                          f"(tolerance {tolerance:g}); report this with the model attached")
    return fidelity


def tolerance_for(manifest: Manifest, tolerance: float | None = None) -> float:
    """`tolerance`, or by default TOLERANCE, or QUANTIZED_TOLERANCE for a quantized model: a
    cut through a fused kernel makes onnxruntime run its parts apart, which rounds fp16/int8
    values differently (tiny_cnn fp16: 2e-4), while float32 and TFLite stages give exactly the
    whole model's outputs."""
    if tolerance is not None:
        return tolerance
    return QUANTIZED_TOLERANCE if manifest.model.get("quantization") else TOLERANCE


def whole_engine(model, threads: int = 1) -> Engine:
    """The engine of a whole model: a LoadedModel, an onnx.ModelProto, the bytes of a model
    or a path (a `.tflite`, or any model `load_model` reads)."""
    from defer.compiler.load import LoadedModel, load_model

    if isinstance(model, str | Path) and Path(model).suffix.lower() != ".tflite":
        model = load_model(Path(model))
    if isinstance(model, LoadedModel):
        model = model.model.data if model.format == "tflite" else model.model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return load_engine(model, threads)


def median_seconds(call: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median seconds of `call()` over `runs` calls after `warmup` calls (the engines' timing
    loop, `defer.engines.profiling.time_calls`)."""
    return statistics.median(time_calls(call, runs, warmup))


def measure_stages(manifest: Manifest, feeds: dict[str, np.ndarray], runs: int = 20,
                   warmup: int = 3) -> list[float]:
    """Median seconds of each bundle run alone (one engine, one thread) on real activations."""
    engines = stage_engines(manifest)
    stage_feeds: list[dict[str, np.ndarray]] = []
    run_chain(manifest, feeds, engines, stage_feeds)
    return [median_seconds(partial(engine.run, [t.name for t in stage.outputs], feed), runs,
                           warmup)
            for engine, feed, stage in zip(engines, stage_feeds, manifest.stages)]


def constant_sends(manifest: Manifest) -> list[set[str] | None]:
    """Per stage, the tensors it sends to the next stage that depend on no model input:
    weights, or values computed only from weights. A correct plan sends none (the last stage's
    model outputs are not checked: they are what the model returns). Read from the bundles
    (ONNX: weights not loaded; TFLite: needs LiteRT); None for a stage it cannot read."""
    constant: set[str] = set()  # tensors received so far that are constants
    result: list[set[str] | None] = []
    for stage in manifest.stages:
        read = _bundle_ops(manifest.bundle_path(stage.index), stage.format)
        if read is None:
            result.append(None)
            constant = set()
            continue
        inputs, ops = read
        live = {t for t in inputs if t not in constant}
        produced: set[str] = set()
        for op_inputs, op_outputs in ops:
            produced.update(op_outputs)
            if any(t in live for t in op_inputs):
                live.update(op_outputs)
        constant = {t for t in stage.sends
                    if (t in produced and t not in live) or (t not in produced and t in constant)}
        result.append(constant if stage.index < len(manifest.stages) - 1 else set())
    return result


def _bundle_ops(path: Path, format: str
                ) -> tuple[list[str], list[tuple[list[str], list[str]]]] | None:
    """(input names, [(op input names, op output names)] in execution order) of a bundle."""
    if format == "onnx":
        from defer.compiler.graph import node_inputs

        graph = onnx.load(str(path), load_external_data=False).graph
        return [i.name for i in graph.input], [(node_inputs(n), list(n.output)) for n in graph.node]
    if format == "tflite":
        try:
            from defer.compiler.tflite import read_tflite
        except ImportError:
            return None
        graph = read_tflite(path)
        return graph.input_names, [(ins, outs) for _, _, ins, outs, _ in graph.operator_table()]
    return None
