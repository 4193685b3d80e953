"""Per-node compute cost, in seconds on this machine.

`profile_costs` uses onnxruntime's own profiler at ORT_ENABLE_BASIC (profile names map to ONNX
node names), one intra-op thread like an edge device, warm-up runs, then the median of several
runs. `estimate_costs` is the fallback: a FLOP + memory-traffic estimate at nominal rates.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections import defaultdict

import numpy as np
import onnx

from defer.compiler.graph import GraphInfo
from defer.compiler.load import sample_inputs

log = logging.getLogger(__name__)

# Nominal rates for the estimate (one core of a small device); only ratios matter between
# nodes, the absolute value only sets the balance between compute and a --bandwidth limit.
NOMINAL_FLOPS = 2.0e10
NOMINAL_BYTES_PER_S = 1.0e10


def profile_costs(info: GraphInfo, runs: int = 10, warmup: int = 3, threads: int = 1) -> np.ndarray:
    """Median kernel seconds of each node over `runs` profiled runs after `warmup` runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory(prefix="defer-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(info.model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        feeds = sample_inputs(info.model, batch=info.batch)
        log.info("profiling %d nodes: %d warm-up + %d runs, %d thread(s)",
                 info.n_nodes, warmup, runs, threads)
        for _ in range(warmup + runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    return _costs_from_events(info, events, warmup)


def _costs_from_events(info: GraphInfo, events: list[dict], warmup: int) -> np.ndarray:
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        durations[event["name"][: -len("_kernel_time")]].append(event["dur"] * 1e-6)
    costs = np.zeros(info.n_nodes)
    index = {node.name: i for i, node in enumerate(info.nodes)}
    unmatched = 0
    for name, durs in durations.items():
        if name not in index:
            unmatched += 1
            continue
        runs = durs[warmup:] or durs
        costs[index[name]] = statistics.median(runs)
    if unmatched:
        log.info("%d profiled kernels did not map to a node (fused by onnxruntime)", unmatched)
    return costs


def estimate_costs(info: GraphInfo) -> np.ndarray:
    """Seconds per node from FLOPs and bytes touched, at the nominal rates above."""
    costs = np.zeros(info.n_nodes)
    inits = info.model.graph.initializer
    init_dims = {t.name: list(t.dims) for t in inits}
    for i, node in enumerate(info.nodes):
        flops = _node_flops(node, info, init_dims)
        touched = sum(info.tensor_bytes(t) for t in list(node.input) + list(node.output) if t)
        touched += sum(info.initializer_bytes[w] for w in info.node_weights[i])
        costs[i] = flops / NOMINAL_FLOPS + touched / NOMINAL_BYTES_PER_S
    return costs


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
