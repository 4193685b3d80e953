"""Synthetic cluster.json files for planner tests: each node's op costs are this machine's FLOP
estimate, scaled so the whole model takes `model_seconds` at speed 1, divided by the node's
speed; every ordered link measured at one rate unless told."""

from __future__ import annotations

from pathlib import Path

import onnx

from defer.cluster import DISPATCHER, Cluster, Link, NodeProfile
from defer.compiler.frontend import front_end
from defer.compiler.load import load_model


def address(i: int, addresses: list[str] | None = None) -> str:
    return addresses[i] if addresses else f"127.0.0.1:{7100 + i}"


def synthetic_cluster(model: onnx.ModelProto | Path, speeds: list[float], *,
                      bandwidth: float = 125e6, rtt: float = 0.0, memory: int = 2 << 30,
                      model_seconds: float = 0.1, addresses: list[str] | None = None,
                      links: dict[tuple[int, int], float] | None = None) -> Cluster:
    """A cluster of len(speeds) nodes (at `addresses`, else made up); `links` overrides the
    rate of (i, j) (-1 = dispatcher), 0 meaning not measured."""
    loaded = load_model(model)
    front = front_end(loaded.format)
    info = front.analyse(loaded.model, 1, "auto")
    costs = front.estimate(info).node
    costs = costs * model_seconds / costs.sum()
    nodes = [NodeProfile(address(i, addresses), "onnx", 1, 1, memory,
                         {op.name: float(c / speed) for op, c in zip(info.ops, costs)})
             for i, speed in enumerate(speeds)]
    ends = list(range(len(speeds))) + [-1]
    measured = []
    for i in ends:
        for j in ends:
            rate = (links or {}).get((i, j), bandwidth)
            if i != j and rate > 0:
                measured.append(Link(address(i, addresses) if i >= 0 else DISPATCHER,
                                     address(j, addresses) if j >= 0 else DISPATCHER, rate,
                                     rtt))
    return Cluster({"name": loaded.name, "sha256": loaded.sha256}, nodes, measured, "test")
