"""Per-op cost of a `.tflite` model, in seconds on this machine.

LiteRT has no per-op profiler reachable from Python, so `time_ops` times each op as a one-op
model (the op with its attached constant ops) under the engine the nodes run
(`defer.engines.litert`, XNNPACK, one thread), on real inputs: the one-op models run in order,
each fed what the previous ones produced from seeded (or given) model inputs. `time_groups`
does the same for any execution order of operator groups (another op order's ops). Warm-up
runs, then the median of several runs.

An op's cost is its `invoke()` alone. Handing tensors to and from an engine (`set_tensor` /
`get_tensor` copies) is paid once per stage, for the tensors crossing its cuts, so it is
measured apart as seconds per byte (`OpTimes.io_seconds_per_byte`, the median over the one-op
models) and priced at the cuts (`OpTimes.boundary`). Summing whole one-op runs instead counts
those copies at every op: MobileNetV2's first stages came out 15-30% too slow that way.
`estimate_costs` is the fallback without timing: FLOPs and bytes touched at the nominal rates
the ONNX estimate uses.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from defer.compiler.profile import NOMINAL_BYTES_PER_S, NOMINAL_FLOPS
from defer.compiler.tflite.graph import reads
from defer.compiler.tflite.slicer import slice_operators
from defer.engines.litert import LiteRTEngine
from defer.tensors import random_inputs

if TYPE_CHECKING:
    from defer.compiler.tflite.graph import TFLiteGraph

log = logging.getLogger(__name__)


@dataclass
class OpTimes:
    """Seconds of each op's invoke alone, and of handing one byte into or out of an engine."""

    seconds: np.ndarray  # (N,)
    io_seconds_per_byte: float

    def boundary(self, cut_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(enter, leave): extra seconds of a stage that starts / ends at each cut k, for the
        bytes crossing it; 0 at the model's own inputs and outputs, as in the ONNX profile."""
        enter = self.io_seconds_per_byte * np.asarray(cut_bytes, dtype=float)
        leave = enter.copy()
        enter[0] = leave[-1] = 0.0
        return enter, leave


def time_ops(graph: TFLiteGraph, feeds: dict[str, np.ndarray] | None = None, runs: int = 10,
             warmup: int = 3, threads: int = 1) -> OpTimes:
    """Each op run alone as a one-op model, on real activations, in the graph's op order."""
    groups = [graph.operator_indices(k, k + 1) for k in range(graph.n_ops)]
    return time_groups(graph, groups, feeds, runs, warmup, threads)


def time_groups(graph: TFLiteGraph, groups: Sequence[Sequence[int]],
                feeds: dict[str, np.ndarray] | None = None, runs: int = 10, warmup: int = 3,
                threads: int = 1) -> OpTimes:
    """Each group of operators (flatbuffer indices: an op and its constant ops) run alone as
    one model; the groups run in the order given, which must be an execution order, each fed
    what the groups before it produced."""
    if feeds is None:
        specs = [graph.tensors[t] for t in graph.input_indices]
        feeds = random_inputs(specs, 1, seed=0, batch=graph.batch)[0]
    values = {graph.index_of[name]: array for name, array in feeds.items()}
    costs, io_rates = np.zeros(len(groups)), []
    start = time.perf_counter()
    for k, group in enumerate(groups):
        operators = [graph.subgraph.operators[i] for i in group]
        produced = [t for op in operators for t in op.outputs if t in graph.tensors]
        inputs = sorted({t for op in operators for t in reads(op)
                         if t in graph.tensors and t not in produced})
        engine = LiteRTEngine(slice_operators(graph, group, inputs, produced), threads)
        feed = {graph.names[t]: values[t] for t in inputs}
        names = [graph.names[t] for t in produced]
        whole_run = median_seconds(engine, names, feed, runs, warmup)
        costs[k] = median_seconds(engine, names, feed, runs, 1, invoke_only=True)
        handed = sum(values[t].nbytes for t in inputs) + sum(graph.tensor_bytes(t)
                                                              for t in produced)
        if handed:
            io_rates.append(max(0.0, whole_run - costs[k]) / handed)
        values.update(zip(produced, engine.run(names, feed)))
    times = OpTimes(costs, float(np.median(io_rates)) if io_rates else 0.0)
    log.info("timed %d ops as one-op models (%d runs each) in %.1f s: %.2f ms of invoke in "
             "all, %.3f ns per byte handed in or out", len(groups), runs,
             time.perf_counter() - start, 1e3 * costs.sum(), 1e9 * times.io_seconds_per_byte)
    return times


def median_seconds(engine, names: list[str], feed: dict[str, np.ndarray], runs: int = 20,
                   warmup: int = 3, invoke_only: bool = False) -> float:
    """Median seconds of `engine.run(names, feed)` over `runs` runs after `warmup` runs;
    `invoke_only` (a LiteRTEngine): of the interpreter's invoke, inputs set beforehand."""
    call = partial(engine.run, names, feed)
    if invoke_only:
        call()  # sets the inputs
        call = engine.interpreter.invoke
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        call()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


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
