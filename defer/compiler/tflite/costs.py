"""Per-op cost of a `.tflite` model, in seconds on this machine.

LiteRT has no per-op profiler reachable from Python, so `time_ops` times each op as a one-op
model (`TFLiteGraph.slice(k, k + 1)`, its attached constant ops included) under the engine the
nodes run (`defer.engines.litert`, XNNPACK, one thread), on real inputs: the one-op models run in
order, each fed what the previous ones produced from seeded (or given) model inputs. Warm-up
runs, then the median of several runs. `estimate_costs` is the fallback without timing: FLOPs
and bytes touched at the nominal rates the ONNX estimate uses.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from defer.compiler.profile import NOMINAL_BYTES_PER_S, NOMINAL_FLOPS
from defer.engines.litert import LiteRTEngine
from defer.tensors import random_inputs

if TYPE_CHECKING:
    from defer.compiler.tflite.graph import TFLiteGraph

log = logging.getLogger(__name__)


def time_ops(graph: TFLiteGraph, feeds: dict[str, np.ndarray] | None = None, runs: int = 10,
             warmup: int = 3, threads: int = 1) -> np.ndarray:
    """Median seconds of each op run alone as a one-op model, on real activations."""
    if feeds is None:
        specs = [graph.tensors[t] for t in graph.input_indices]
        feeds = random_inputs(specs, 1, seed=0, batch=graph.batch)[0]
    values = dict(feeds)
    costs = np.zeros(graph.n_ops)
    start = time.perf_counter()
    for k in range(graph.n_ops):
        engine = LiteRTEngine(graph.slice(k, k + 1, outputs=graph.op_outputs(k)), threads)
        feed = {spec.name: values[spec.name] for spec in engine.inputs}
        names = [spec.name for spec in engine.outputs]
        for _ in range(warmup):
            produced = engine.run(names, feed)
        times = []
        for _ in range(runs):
            tick = time.perf_counter()
            produced = engine.run(names, feed)
            times.append(time.perf_counter() - tick)
        costs[k] = statistics.median(times)
        values.update(zip(names, produced))
    log.info("timed %d ops as one-op models (%d runs each) in %.1f s: %.2f ms in all",
             graph.n_ops, runs, time.perf_counter() - start, 1e3 * costs.sum())
    return costs


def estimate_costs(graph: TFLiteGraph) -> np.ndarray:
    """Seconds per op from FLOPs and bytes touched (activations and weights)."""
    costs = np.zeros(graph.n_ops)
    operators = graph.subgraph.operators
    for k, op in enumerate(graph.ops):
        operator = operators[op.index]
        flops = _flops(graph, op.op_type, operator)
        touched = sum(graph.tensor_bytes(t) for t in [*operator.inputs, *operator.outputs]
                      if t >= 0)
        touched += sum(graph.buffer_bytes[w] for w in graph.op_weights[k])
        costs[k] = flops / NOMINAL_FLOPS + touched / NOMINAL_BYTES_PER_S
    return costs


def _flops(graph: TFLiteGraph, op_type: str, operator) -> float:
    tensors = graph.subgraph.tensors
    out = [t for t in operator.outputs if t >= 0]
    out_elems = float(np.prod(_shape(graph, out[0]))) if out else 0.0
    weight = list(tensors[operator.inputs[1]].shape) if len(operator.inputs) > 1 and \
        operator.inputs[1] >= 0 else []
    if op_type == "CONV_2D" and len(weight) == 4:  # filter [out, kh, kw, in]
        return 2.0 * out_elems * weight[1] * weight[2] * weight[3]
    if op_type == "DEPTHWISE_CONV_2D" and len(weight) == 4:  # filter [1, kh, kw, out]
        return 2.0 * out_elems * weight[1] * weight[2]
    if op_type == "FULLY_CONNECTED" and len(weight) == 2:  # weights [out, in]
        return 2.0 * out_elems * weight[1]
    if op_type == "BATCH_MATMUL" and weight:
        lhs = _shape(graph, operator.inputs[0])
        return 2.0 * out_elems * (lhs[-1] if lhs else 1)
    if op_type == "TRANSPOSE_CONV" and len(operator.inputs) > 2:
        kernel = list(tensors[operator.inputs[1]].shape)  # [out, kh, kw, in]
        source = _shape(graph, operator.inputs[2])
        return 2.0 * float(np.prod(source)) * float(np.prod(kernel[:3])) if kernel else 0.0
    return out_elems


def _shape(graph: TFLiteGraph, index: int) -> list[int]:
    spec = graph.tensors.get(index)
    if spec is not None:
        return list(spec.concrete_shape(graph.batch))
    return [int(d) for d in graph.subgraph.tensors[index].shape]
