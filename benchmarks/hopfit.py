"""The CPU cost of a hop on this machine: a fixed cost per request plus a cost per byte, on the
receiving and on the sending side, fitted from a real `defer serve` node running trivial
bundles (what a planner would add to each stage's predicted time; see issue 9, item 3).

For each size S: a "receive" bundle (float32[S/4] in, ReduceSum, a scalar out) and a "send"
bundle (a scalar in, Expand, float32[S/4] out), each served by one node pinned to one core and
fed by a dispatcher in this process. The node's CPU per request, less the same op timed alone,
is the hop's cost: receiving S (plus sending almost nothing), or sending S. A least-squares
line over the sizes gives `per_request_s` (the intercept: framing, queues, the engine thread
hand-off, both small messages) and `recv_per_byte_s` / `send_per_byte_s` (the slopes).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table

SIZES = (4096, 256 * 1024, 1 << 20, 4 << 20)


def _bundle(kind: str, size: int, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = size // 4
    if kind == "recv":
        nodes = [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)]
        shapes, inits = ([n], []), []
    else:
        nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
        shapes = ([1], [n])
        inits = [numpy_helper.from_array(np.array([n], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, f"hop_{kind}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1] if shapes[1] else [])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _node_cpu_ms(model: Path, work: Path, count: int, core: int) -> tuple[float, float]:
    """(node CPU ms per request, the op alone ms) for `count` requests through one node."""
    from benchmarks.hopcost import process_cpu
    from defer.compiler import compile_model
    from defer.engines import load_engine
    from defer.local import start_node, stop_processes
    from defer.runtime.dispatcher import Dispatcher
    from defer.tensors import random_inputs

    manifest = compile_model(model, 1, work, profile=False)
    samples = random_inputs(manifest.inputs, count, 0)
    engine = load_engine(manifest.bundle_path(0))
    names = [o.name for o in engine.outputs]
    alone = []
    for sample in samples[:50]:
        start = time.thread_time()
        engine.run(names, sample)
        alone.append(time.thread_time() - start)
    node = start_node(manifest.bundle_path(0), cpu=core)
    try:
        with Dispatcher(manifest, [node.address], timeout=60) as dispatcher:
            list(dispatcher.map(samples[:10]))
            before = process_cpu(node.process.pid)
            list(dispatcher.map(samples))
            cpu = process_cpu(node.process.pid) - before
    finally:
        stop_processes([node])
    return cpu / count * 1e3, statistics.median(alone) * 1e3


def fit(work_dir: Path, count: int = 200, runs: int = 1, core: int = 1) -> dict:
    """Per-request and per-byte hop costs of this machine (medians over `runs`)."""
    points: dict[str, list[tuple[int, float]]] = {"recv": [], "send": []}
    for _ in range(runs):
        for kind in points:
            for size in SIZES:
                where = work_dir / f"hop-{kind}-{size}"
                where.mkdir(parents=True, exist_ok=True)
                model = _bundle(kind, size, where / "model.onnx")
                node_ms, op_ms = _node_cpu_ms(model, where / "bundles", count, core)
                points[kind].append((size, (node_ms - op_ms) / 1e3))
    lines = {kind: np.polyfit([s for s, _ in p], [c for _, c in p], 1)
             for kind, p in points.items()}
    return {"per_request_s": float(statistics.mean(lines[k][1] for k in lines)),
            "recv_per_byte_s": float(lines["recv"][0]),
            "send_per_byte_s": float(lines["send"][0]),
            "points": {k: [[s, c] for s, c in p] for k, p in points.items()}}


def render(result: dict) -> str:
    rows = [[kind, f"{size / 1e6:.3f}", f"{cost * 1e3:.3f}"]
            for kind, points in result["points"].items() for size, cost in points]
    lines = table(["side", "MB per request", "node CPU ms beyond the op"], rows)
    return (f"{lines}\nhop cost: {result['per_request_s'] * 1e3:.3f} ms per request + "
            f"{result['recv_per_byte_s'] * 1e9:.3f} ms/MB received + "
            f"{result['send_per_byte_s'] * 1e9:.3f} ms/MB sent (CPU, this machine)")
