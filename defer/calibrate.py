"""Measure this machine's hop cost once (defer/hop.py's `HopCost`) with a real node.

For each size S: a "recv" bundle (float32[S/4] in, ReduceSum, a scalar out) and a "send"
bundle (a scalar in, Expand, float32[S/4] out), each served by one `defer serve` pinned to one
core with one engine thread, fed by a dispatcher in this process. The node's CPU per request
(its kernel CPU clock, read from outside, so nothing in the node changes to be measured), less
the same op timed alone here, is the hop's cost: receiving S (and sending almost nothing), or
sending S. A least-squares line over the sizes gives `per_message_s` (the intercept: framing,
queues, the hand-off to the engine thread, the small messages) and `recv_per_byte_s` /
`send_per_byte_s` (the slopes; never below 0).

    hop = machine_hop_cost()      # cached at defer.hop.CACHE_PATH, measured (~15 s) if absent

This module runs processes and sockets: it sits beside defer.local, above the compiler and the
runtime. The compiler reads the cached figure through defer.hop only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from defer import hop as hops
from defer import progress

log = logging.getLogger(__name__)

SIZES = (4096, 1 << 20, 4 << 20)
KINDS = ("recv", "send")


def process_cpu(pid: int) -> float:
    """CPU seconds of process `pid`, all threads (its kernel CPU clock, nanosecond grain)."""
    return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def machine_hop_cost(measure: bool = True, count: int = 100) -> hops.HopCost | None:
    """This machine's hop cost: the cached figure, else (with `measure`) measured and cached."""
    cached = hops.cached()
    if cached is not None or not measure:
        return cached
    log.debug("measuring this machine's hop cost once (cached at %s)", hops.CACHE_PATH)
    with tempfile.TemporaryDirectory(prefix="defer-hop-") as tmp:
        fitted = fit(Path(tmp), count=count)
    hop = dataclasses.replace(fitted["hop"], source="calibrated on this machine")
    hops.save(hop, points=fitted["points"], count=count)
    return hop


def fit(work_dir: Path, count: int = 100, sizes: tuple[int, ...] = SIZES,
        core: int | None = None) -> dict:
    """{"hop": the fitted HopCost, "points": {kind: [[bytes, seconds beyond the op], ...]}}."""
    core = max(os.sched_getaffinity(0)) if core is None else core
    points: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}
    with progress.phase("hop cost", total=len(KINDS) * len(sizes)) as step:
        for kind in KINDS:
            for size in sizes:
                where = work_dir / f"hop-{kind}-{size}"
                where.mkdir(parents=True, exist_ok=True)
                with _quietly():  # only the calibration's own progress shows
                    node_s, op_s = node_seconds(trivial_bundle(kind, size, where / "model.onnx"),
                                                where / "bundles", count, core)
                points[kind].append([size, node_s - op_s])
                step()
    slope, intercept = {}, {}
    for kind, p in points.items():
        slope[kind], intercept[kind] = np.polyfit([s for s, _ in p], [c for _, c in p], 1)
    hop = hops.HopCost(max(float(statistics.mean(intercept.values())), 0.0),
                       max(float(slope["recv"]), 0.0), max(float(slope["send"]), 0.0),
                       "measured")
    return {"hop": hop, "points": points}


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """No progress or INFO lines from compiling and opening a trivial bundle's chain."""
    logger = logging.getLogger("defer.compiler")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with progress.reporting(progress.Reporter()):
            yield
    finally:
        logger.setLevel(level)


def trivial_bundle(kind: str, size: int, path: Path) -> Path:
    """An ONNX model that receives `size` bytes ("recv") or sends them ("send")."""
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
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def node_seconds(model: Path, work: Path, count: int, core: int) -> tuple[float, float]:
    """(node CPU seconds per request, the op alone here) over `count` requests to one node."""
    from defer.compiler import compile_model
    from defer.engines import load_engine
    from defer.local import start_node, stop_processes
    from defer.runtime.dispatcher import Dispatcher
    from defer.tensors import random_inputs

    manifest = compile_model(model, 1, work, profile=False, hop_cost=None)
    samples = random_inputs(manifest.inputs, count, 0)
    engine = load_engine(manifest.bundle_path(0), 1)
    names = [o.name for o in engine.outputs]
    alone = []
    for sample in samples[: min(count, 50)]:
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
    return cpu / count, statistics.median(alone)
