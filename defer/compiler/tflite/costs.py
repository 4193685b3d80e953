"""Per-op cost of a `.tflite` model, in seconds on this machine, and its crossing tensors' values.

LiteRT has no per-op profiler reachable from Python, so `time_ops` times each op of an analysed
model (a GraphInfo, in its op order) as a one-op model (the op with its attached constant ops)
under the engine the nodes run (`defer.engines.litert`, XNNPACK, one thread), on real inputs:
the one-op models run in that order, each fed what the previous ones produced from seeded (or
given) model inputs. `time_groups` does it for any execution order of operator groups.
Warm-up runs, then several timed runs: the timing itself is `defer.engines.profiling.time_models`
(each op's fastest run, scaled to what the runs took in all), which nodes run too for
`defer profile`; this module builds the one-op models.

An op's cost is its `invoke()` alone. Handing tensors to and from an engine (`set_tensor` /
`get_tensor` copies) is paid once per stage, for the tensors crossing its cuts, so it is
measured apart as seconds per byte (`OpTimes.io_seconds_per_byte`, the median over the one-op
models) and priced at the cuts (`OpTimes.boundary`). Summing whole one-op runs instead counts
those copies at every op: MobileNetV2's first stages came out 15-30% too slow that way.
Times are kept by op name, so one timing prices the model in any op order (`costs`).
`estimate_costs` is the fallback without timing: `defer.compiler.profile.estimate_costs` (FLOPs
and bytes at nominal rates) with TFLite's FLOP count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from defer import progress
from defer.compiler.profile import Costs
from defer.compiler.profile import estimate_costs as estimate
from defer.compiler.tflite.graph import reads
from defer.compiler.tflite.slicer import slice_operators, stage_operators
from defer.engines.litert import LiteRTEngine
from defer.engines.profiling import time_models
from defer.tensors import random_inputs

if TYPE_CHECKING:
    from defer.compiler.graph import GraphInfo, Op
    from defer.compiler.tflite.graph import TFLiteGraph

log = logging.getLogger(__name__)
SOURCE = "LiteRT one-op timing"


@dataclass
class OpTimes:
    """Seconds of each op's invoke alone (by op name), and of handing one byte into or out of
    an engine."""

    names: list[str]
    seconds: np.ndarray  # (N,) in the order of `names`
    io_seconds_per_byte: float

    def boundary(self, cut_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(enter, leave): extra seconds of a stage that starts / ends at each cut k, for the
        bytes crossing it; 0 at the model's own inputs and outputs, as in the ONNX profile."""
        enter = self.io_seconds_per_byte * np.asarray(cut_bytes, dtype=float)
        leave = enter.copy()
        enter[0] = leave[-1] = 0.0
        return enter, leave

    def costs(self, info: GraphInfo) -> Costs:
        """The Costs of `info`'s ops in its order (the same model, any op order)."""
        by_name = dict(zip(self.names, self.seconds))
        node = np.array([by_name[op.name] for op in info.ops], dtype=float)
        return Costs(node, *self.boundary(info.cut_bytes()), SOURCE)


def time_ops(info: GraphInfo, feeds: dict[str, np.ndarray] | None = None, runs: int = 10,
             warmup: int = 3, threads: int = 1) -> OpTimes:
    """Each op of `info` run alone as a one-op model, on real activations, in its order."""
    groups = [stage_operators(info, k, k + 1) for k in range(info.n_ops)]
    with progress.phase("profile", total=len(groups)) as step:
        seconds, io_rate = time_groups(info.model, groups, feeds, runs, warmup, threads,
                                       info.batch, step)
    return OpTimes([op.name for op in info.ops], seconds, io_rate)


def time_groups(graph: TFLiteGraph, groups: Sequence[Sequence[int]],
                feeds: dict[str, np.ndarray] | None = None, runs: int = 10, warmup: int = 3,
                threads: int = 1, batch: int = 1,
                step: Callable[[], object] = lambda: None) -> tuple[np.ndarray, float]:
    """(seconds of each group's invoke, seconds per byte handed in or out): each group of
    operators (flatbuffer indices: an op and its constant ops) run alone as one model; the
    groups run in the order given, which must be an execution order, each fed what the groups
    before it produced. The timing is `defer.engines.profiling.time_models`, which nodes run
    too (`defer profile`)."""
    if feeds is None:
        specs = [graph.tensors[t] for t in graph.input_indices]
        feeds = random_inputs(specs, 1, seed=0, batch=batch)[0]
    times = time_models(one_op_models(graph, groups), feeds, runs, warmup, threads, batch,
                        on_model=step)
    return times.seconds, times.io_seconds_per_byte


def one_op_models(graph: TFLiteGraph, groups: Sequence[Sequence[int]]) -> list[bytes]:
    """One `.tflite` per group of operators, its signature naming the tensors by their unique
    names, taking what the group reads from outside and giving everything it produces."""
    models = []
    for group in groups:
        operators = [graph.subgraph.operators[i] for i in group]
        produced = [t for op in operators for t in op.outputs if t in graph.tensors]
        inputs = sorted({t for op in operators for t in reads(op)
                         if t in graph.tensors and t not in produced})
        models.append(slice_operators(graph, group, inputs, produced))
    return models


def crossing_values(info: GraphInfo, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor that crosses some cut of `info`, from one run of the whole model on a
    seeded sample input (one slice of every operator that outputs them all)."""
    graph: TFLiteGraph = info.model
    feeds = random_inputs([graph.specs[n] for n in graph.input_names], 1, seed, info.batch)[0]
    wanted = [t for t in sorted(info.crossing_tensors()) if t not in feeds]
    engine = LiteRTEngine(slice_operators(graph, range(len(graph.subgraph.operators)),
                                          graph.input_names, wanted))
    values = dict(zip(wanted, engine.run(wanted, feeds)))
    values.update({t: feeds[t] for t in info.crossing_tensors() if t in feeds})
    return values


def estimate_costs(info: GraphInfo) -> Costs:
    """Seconds per op from FLOPs and bytes touched (activations and weights)."""
    return estimate(info, partial(op_flops, info))


def op_flops(info: GraphInfo, op: Op) -> float:
    """Floating-point operations of one op of a TFLite model's analysis."""
    graph: TFLiteGraph = info.model
    return _flops(graph, op.op_type, graph.subgraph.operators[op.source], info.batch)


def _flops(graph: TFLiteGraph, op_type: str, operator, batch: int) -> float:
    tensors = graph.subgraph.tensors
    out = [t for t in operator.outputs if t >= 0]
    out_elems = float(np.prod(_shape(graph, out[0], batch))) if out else 0.0
    weight = list(tensors[operator.inputs[1]].shape) if len(operator.inputs) > 1 and \
        operator.inputs[1] >= 0 else []
    if op_type == "CONV_2D" and len(weight) == 4:  # filter [out, kh, kw, in]
        return 2.0 * out_elems * weight[1] * weight[2] * weight[3]
    if op_type == "DEPTHWISE_CONV_2D" and len(weight) == 4:  # filter [1, kh, kw, out]
        return 2.0 * out_elems * weight[1] * weight[2]
    if op_type == "FULLY_CONNECTED" and len(weight) == 2:  # weights [out, in]
        return 2.0 * out_elems * weight[1]
    if op_type == "BATCH_MATMUL" and weight:
        lhs = _shape(graph, operator.inputs[0], batch)
        return 2.0 * out_elems * (lhs[-1] if lhs else 1)
    if op_type == "TRANSPOSE_CONV" and len(operator.inputs) > 2:
        kernel = list(tensors[operator.inputs[1]].shape)  # [out, kh, kw, in]
        source = _shape(graph, operator.inputs[2], batch)
        return 2.0 * float(np.prod(source)) * float(np.prod(kernel[:3])) if kernel else 0.0
    return out_elems


def _shape(graph: TFLiteGraph, index: int, batch: int) -> list[int]:
    spec = graph.tensors.get(index)
    if spec is not None:
        return list(spec.concrete_shape(batch))
    return [int(d) for d in graph.subgraph.tensors[index].shape]
