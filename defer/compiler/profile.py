"""Per-node compute cost, in seconds on this machine.

`profile_costs` uses onnxruntime's own profiler with one intra-op thread like an edge device,
warm-up runs, then several timed runs. At ORT_ENABLE_BASIC profile names map one-to-one
to ONNX node names, but bundles are deployed at ORT_ENABLE_ALL, where fused NCHWc kernels run
up to ~20% faster, and not uniformly. So a second profile at ORT_ENABLE_ALL is mapped back: a
fused kernel is named after its output tensor, its cost is shared over the chain of nodes it
absorbed in proportion to their BASIC costs (a QDQ model's fused QLinear kernel, named
`NODE_token_<k>`, goes to NODE), and layout reorders are spread over every node.

Cutting a model costs more than its nodes: each bundle converts its inputs to the NCHWc layout
and its outputs back (reorders, proportional to the bytes crossing), and a cut inside a fused
chain makes that chain run unfused (not a cut right after a QuantizeLinear of a QDQ model: both
sides keep their quantized groups). `Costs.enter[k]` / `Costs.leave[k]` hold those extra
seconds for a stage that starts / ends at cut k, measured from the same profiles.
`estimate_costs` is the fallback, for either format: a FLOP + memory-traffic estimate at
nominal rates (the TFLite front end passes its own FLOP count).
The profiling itself (onnxruntime's profiler, reduced to seconds per kernel as it is read:
each kernel's fastest run, scaled to the median whole run) is `defer.engines.profiling`, which
nodes run too (`defer profile`); this module maps its kernels onto the graph's ops. A
`Profile` is keyed by kernel name, so profiles measured elsewhere (cluster.json's `profile`
extra) price any op order. A constant-only op
(graph.py) that onnxruntime did not fold is charged to its first consumer.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from defer import progress
from defer.compiler.export import EXTERNAL_ABOVE
from defer.compiler.graph import GraphInfo, Op
from defer.compiler.load import sample_inputs
from defer.engines.profiling import KernelProfile, profile_onnx

log = logging.getLogger(__name__)

# Nominal rates for the estimate (one core of a small device); only ratios matter between
# nodes, the absolute value only sets the balance between compute and a --bandwidth limit.
NOMINAL_FLOPS = 2.0e10
NOMINAL_BYTES_PER_S = 1.0e10


@dataclass
class Costs:
    """Seconds at speed 1: per node, and extra for a stage that starts / ends at each cut."""

    node: np.ndarray  # (N,)
    enter: np.ndarray  # (N+1,) extra seconds of a stage that starts at cut k (k > 0)
    leave: np.ndarray  # (N+1,) extra seconds of a stage that ends at cut k (k < N)
    source: str = "profile"

    @classmethod
    def nodes_only(cls, node: np.ndarray, source: str) -> Costs:
        zeros = np.zeros(len(node) + 1)
        return cls(np.asarray(node, dtype=float), zeros, zeros.copy(), source)


def profile_costs(info: GraphInfo, runs: int = 10, warmup: int = 3, threads: int = 1,
                  deployed: bool = True) -> Costs:
    """Seconds of each op: the median over `runs` profiled runs after `warmup` runs.

    With `deployed`, the BASIC costs are rescaled to what ORT_ENABLE_ALL kernels really take,
    and the cost of cutting (reorders, broken fusions) is measured too.
    """
    return costs_from_profile(info, profile(info, runs, warmup, threads, deployed))


@dataclass
class Profile:
    """The reduced profiles of one model: BASIC, and ORT_ENABLE_ALL if `deployed`."""

    basic: KernelProfile
    deployed: KernelProfile | None


def profile(info: GraphInfo, runs: int = 10, warmup: int = 3, threads: int = 1,
            deployed: bool = True) -> Profile:
    """Profile the model of `info` (see profile_costs); kernels are keyed by op name, so one
    Profile prices the same model in any op order (`costs_from_profile`)."""
    levels = ["basic", "all"] if deployed else ["basic"]
    with progress.phase("profile", total=len(levels) * (warmup + runs)) as step:
        summaries = [_profile(info, level, runs, warmup, threads, step) for level in levels]
    return Profile(summaries[0], summaries[1] if deployed else None)


def costs_from_profile(info: GraphInfo, measured: Profile) -> Costs:
    """Costs of the ops of `info`, in its order, from a Profile of the same model."""
    basic = _costs_from_kernels(info, measured.basic)
    if measured.deployed is None:
        return Costs.nodes_only(basic, "profile (ORT_ENABLE_BASIC)")
    return _deployed_costs(info, basic, measured.deployed)


def _profile(info: GraphInfo, level: str, runs: int, warmup: int, threads: int,
             step) -> KernelProfile:
    """The engine-level profile (`defer.engines.profiling`), on this model's sample inputs;
    a model past protobuf's 2 GB goes to onnxruntime as a file with external data."""
    feeds = sample_inputs(info.model, batch=info.batch)
    log.info("profiling %d ops", info.n_ops)
    if info.model.ByteSize() < EXTERNAL_ABOVE:
        return profile_onnx(info.model.SerializeToString(), level, threads, runs, warmup,
                            feeds, on_run=step)
    with tempfile.TemporaryDirectory(prefix="defer-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(info.model)
        onnx.save_model(copy, str(path), save_as_external_data=True,
                        location="model.onnx.data")
        return profile_onnx(path, level, threads, runs, warmup, feeds, on_run=step)


def _op_index(info: GraphInfo) -> dict[str, int]:
    """Op name -> position; a constant-only op's name -> the position of its first consumer."""
    index = {}
    for i, op in enumerate(info.ops):
        for c in op.attached:
            index.setdefault(info.const_ops[c].name, i)
    index.update({op.name: i for i, op in enumerate(info.ops)})
    return index


def _costs_from_kernels(info: GraphInfo, summary: KernelProfile) -> np.ndarray:
    costs = np.zeros(info.n_ops)
    index = _op_index(info)
    unmatched = 0
    for name, seconds in summary.kernels.items():
        if name not in index:
            unmatched += 1
            continue
        costs[index[name]] += seconds
    if unmatched:
        log.info("%d profiled kernels did not map to an op", unmatched)
    return costs


def _deployed_costs(info: GraphInfo, basic: np.ndarray, summary: KernelProfile) -> Costs:
    """Share each ORT_ENABLE_ALL kernel's time over the ops it stands for (see module doc)."""
    index = _op_index(info)
    owner: dict[int, float] = defaultdict(float)
    spread_over_all = 0.0
    for name, seconds in summary.kernels.items():
        name = re.sub(r"_token_\d+$", "", name)  # QDQ fusions: QLinearConv of node NAME
        tensor = name[: -len("_nchwc")] if name.endswith("_nchwc") else name
        position = index.get(name, info.producer.get(tensor, -1))
        if position < 0:
            spread_over_all += seconds  # layout reorders and other inserted kernels
        else:
            owner[position] += seconds
    costs = np.zeros(info.n_ops)
    enter = np.zeros(info.n_ops + 1)
    consumers = _consumers(info)
    for position, seconds in owner.items():
        group = _fused_group(info, position, owner, consumers)
        weights = basic[group] if basic[group].sum() > 0 else np.ones(len(group))
        costs[group] += seconds * weights / weights.sum()
        # A cut inside the group leaves its ops unfused: back to their BASIC cost.
        unfused = max(0.0, float(basic[group].sum()) - seconds)
        enter[group[0] + 1: group[-1] + 1] += unfused
    enter[_requantized_cuts(info)] = 0.0
    if basic.sum() > 0:
        costs += spread_over_all * basic / basic.sum()
    rate = summary.reorder_seconds / summary.reorder_bytes if summary.reorder_bytes else 0.0
    reorder = rate * info.cut_bytes()
    enter += reorder
    leave = reorder.copy()
    enter[0] = 0.0
    leave[-1] = 0.0
    return Costs(costs, enter, leave, "profile (ORT_ENABLE_ALL, mapped to ops)")


def _requantized_cuts(info: GraphInfo) -> np.ndarray:
    """Cuts right after a QuantizeLinear (a QDQ model's int8/uint8 activation): they break no
    fusion, since each side keeps its DequantizeLinear -> op -> QuantizeLinear groups whole."""
    return np.array([k for k in range(1, info.n_ops)
                     if info.ops[k - 1].op_type == "QuantizeLinear"], dtype=np.int64)


def _consumers(info: GraphInfo) -> dict[int, set[int]]:
    """Node position -> positions of the nodes that read its outputs."""
    consumers: dict[int, set[int]] = defaultdict(set)
    for i, op in enumerate(info.ops):
        for t in op.inputs:
            if info.producer.get(t, -1) >= 0:
                consumers[info.producer[t]].add(i)
    return consumers


def _fused_group(info: GraphInfo, position: int, owners: dict[int, float],
                 consumers: dict[int, set[int]]) -> list[int]:
    """`position` and the producers upstream that only it consumes and no kernel claims."""
    group, frontier = {position}, [position]
    while frontier:
        op = info.ops[frontier.pop()]
        for t in op.inputs:
            q = info.producer.get(t, -1)
            if q >= 0 and q not in group and q not in owners and consumers[q] <= group:
                group.add(q)
                frontier.append(q)
    return sorted(group)


def estimate_costs(info: GraphInfo, flops: Callable[[Op], float] | None = None) -> Costs:
    """Seconds per op from FLOPs and bytes touched, at the nominal rates above, in any format:
    `flops` counts one op's floating-point operations (default: an ONNX node's)."""
    if flops is None:
        init_dims = {t.name: list(t.dims) for t in info.model.graph.initializer}
        flops = partial(_onnx_flops, info, init_dims)
    costs = np.zeros(info.n_ops)
    for i, op in enumerate(info.ops):
        touched = sum(info.tensor_bytes(t) for t in [*op.inputs, *op.outputs])
        touched += sum(info.constant_bytes[w] for w in op.weights)
        costs[i] = flops(op) / NOMINAL_FLOPS + touched / NOMINAL_BYTES_PER_S
    return Costs.nodes_only(costs, "estimate (FLOPs + bytes)")


def _onnx_flops(info: GraphInfo, init_dims: dict[str, list[int]], op: Op) -> float:
    return _node_flops(op.source, info, init_dims)


def _shape(name: str, info: GraphInfo, init_dims: dict[str, list[int]]) -> list[int]:
    if name in init_dims:
        return init_dims[name]
    spec = info.specs.get(name)
    return list(spec.concrete_shape(info.batch)) if spec else []


def _node_flops(node: onnx.NodeProto, info: GraphInfo, init_dims: dict[str, list[int]]) -> float:
    out = _shape(node.output[0], info, init_dims) if node.output else []
    out_elems = float(np.prod(out)) if out else 0.0
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        w = _shape(node.input[1], info, init_dims)
        per_output = float(np.prod(w[1:])) if len(w) > 1 else 1.0  # Cin/groups * kernel
        return 2.0 * out_elems * per_output
    if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
        a = _shape(node.input[0], info, init_dims)
        k = a[-1] if a else 1
        if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
            k = a[0] if a else 1
        return 2.0 * out_elems * k
    return out_elems
