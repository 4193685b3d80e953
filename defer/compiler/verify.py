"""Check and time compiled bundles in this process: `verify` (the chain against the whole
model, raising above a tolerance), `measure_stages` (each bundle alone, on real activations)
and `constant_sends` (which sent tensors are not activations: an audit of the bundles
themselves, independent of how the compiler chose them). The first two run bundles with the
nodes' own engines (`defer.engines`) and route tensors with `defer.fidelity.run_chain`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from defer.engines import load_engine
from defer.errors import VerifyError
from defer.fidelity import Fidelity, compare, run_chain, stage_engines
from defer.manifest import Manifest


def verify(manifest: Manifest, model, batch: int = 1, tolerance: float = 1e-4,
           seed: int = 0) -> Fidelity:
    """Run the bundles stage by stage and compare with the whole model; raise above tolerance.

    `model` is a path, an onnx.ModelProto or a LoadedModel."""
    from defer.compiler.load import LoadedModel, load_model, sample_inputs

    whole = model.model if isinstance(model, LoadedModel) else (
        model if isinstance(model, onnx.ModelProto) else load_model(Path(model)).model)
    feeds = sample_inputs(whole, batch=batch, seed=seed)
    names = [o.name for o in whole.graph.output]
    engine = load_engine(whole.SerializeToString(), format="onnx")
    reference = dict(zip(names, engine.run(names, feeds)))
    fidelity = compare(run_chain(manifest, feeds), reference)
    if fidelity.max_rel > tolerance:
        raise VerifyError(f"the stages differ from the whole model: {fidelity} "
                          f"(tolerance {tolerance:g}); report this with the model attached")
    return fidelity


def measure_stages(manifest: Manifest, feeds: dict[str, np.ndarray], runs: int = 20,
                   warmup: int = 3) -> list[float]:
    """Median seconds of each bundle run alone (one engine, one thread) on real activations."""
    engines = stage_engines(manifest)
    stage_feeds: list[dict[str, np.ndarray]] = []
    run_chain(manifest, feeds, engines, stage_feeds)
    medians = []
    for engine, feed, stage in zip(engines, stage_feeds, manifest.stages):
        names = [t.name for t in stage.outputs]
        for _ in range(warmup):
            engine.run(names, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.run(names, feed)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return medians


def constant_sends(manifest: Manifest) -> list[set[str] | None]:
    """Per stage, the tensors it sends to the next stage that depend on no model input:
    weights, or values computed only from weights. A correct plan sends none (the last stage's
    model outputs are not checked: they are what the model returns). Read from the ONNX
    bundles (weights not loaded); None for a stage whose format this audit does not read."""
    from defer.compiler.graph import node_inputs

    constant: set[str] = set()  # tensors received so far that are constants
    result: list[set[str] | None] = []
    for stage in manifest.stages:
        if stage.format != "onnx":
            result.append(None)
            constant = set()
            continue
        graph = onnx.load(str(manifest.bundle_path(stage.index)), load_external_data=False).graph
        live = {i.name for i in graph.input if i.name not in constant}
        produced: set[str] = set()
        for node in graph.node:
            produced.update(node.output)
            if any(t in live for t in node_inputs(node)):
                live.update(node.output)
        constant = {t for t in stage.sends
                    if (t in produced and t not in live) or (t not in produced and t in constant)}
        result.append(constant if stage.index < len(manifest.stages) - 1 else set())
    return result
