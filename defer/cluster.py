"""cluster.json: what a fleet measured about itself, the manifest's sibling.

`defer profile` writes it (each node times the model's ops with its own engine; the dispatcher
times every link); `defer compile --cluster`, `defer plan` and `defer dispatch --cluster` read
it. Schema version 1 (extend it, never silently change it; unknown keys are kept and ignored):

    schema_version, created_by, model: {name, sha256}
    nodes[]: address, engine, threads, cores, memory_free (bytes),
             op_costs {op name: seconds}, plus optional measured extras (e.g. hop costs)
    links[]: from, to, bandwidth (bytes/s), rtt (s)   # "dispatcher" or a node address

Links are directed: `from` sends to `to`. A plan that puts device B after device A needs the
link A -> B, so `defer profile` measures every ordered pair of nodes it may chain, plus
dispatcher -> node and node -> dispatcher. A link missing from the file was not measured (or
failed, and --skip-bad left it out): treat the pair as unusable.

What `defer profile` (defer/fleet) writes in each field:
- model: name, sha256 (as `defer compile` records them), format ("onnx" or "tflite"), n_ops.
- op_costs keys are the compiler's op names, exactly those of `GraphInfo.ops` for the model as
  `defer compile` loads and analyses it: for ONNX (and Keras via tf2onnx) the node names after
  the loader's normalisation (an unnamed node gets the name the loader gives it), for TFLite
  `TFLiteOp.name` (the unique name of the op's first output tensor). Constant-only ops are not
  listed: their time is charged to their first consumer, as the compiler does. Values are
  `costs_from_profile(...).node`: seconds per op at the deployed level (ORT_ENABLE_ALL mapped
  back to ops); for TFLite each op's invoke alone (`time_ops`).
- memory_free: the node's MemAvailable when it profiled (0 = it could not tell); cores: CPUs
  it may use (sched_getaffinity); threads: its engine threads; engine: the format it ran.
- node extras: "profile" (ONNX): {"basic": ..., "all": ...}, each a KernelProfile dict
  (defer.engines.profiling: median seconds per kernel name, reorder seconds and bytes), from
  which the compiler rebuilds its Costs for any op order, cut costs (enter/leave) included:
  `costs_from_profile(info, Profile(KernelProfile.from_dict(p["basic"]),
  KernelProfile.from_dict(p["all"])))`; "io_seconds_per_byte" (TFLite: the cut price,
  `OpTimes.boundary`); "profile_chunks" (requests it took: > 1 when the model was over the
  node's "max_model_size"); "defer" (its version); "profile_seconds"; "hop_cost"
  {per_message_s, recv_per_byte_s, send_per_byte_s} (or one per_byte_s for both sides): the
  node's CPU per hop beyond its engine, which the planner adds to its stages (defer/hop.py):
  what the node announced in its HELLO (`defer serve --hop-cost auto` measures it once on the
  device with `defer.calibrate`, real bundles included), else what `defer profile` timed over
  the probe connection (defer/fleet/hop_probe.py, a lower bound); absent = not priced there.
- links: bandwidth from the slope of round-trip time over transfer size (so RTT and a token
  bucket's burst cancel out), rtt the median of empty round trips (defer/runtime/links.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defer.address import parse_address
from defer.errors import ManifestError, UsageError

CLUSTER_SCHEMA_VERSION = 1
DISPATCHER = "dispatcher"


@dataclass
class NodeProfile:
    address: str
    engine: str
    threads: int
    cores: int
    memory_free: int
    op_costs: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)  # measured extras, kept as read

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "engine": self.engine, "threads": self.threads,
                "cores": self.cores, "memory_free": self.memory_free,
                "op_costs": self.op_costs, **self.extra}


@dataclass
class Link:
    source: str  # "dispatcher" or a node address
    target: str
    bandwidth: float  # bytes/s
    rtt: float  # seconds

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "bandwidth": self.bandwidth,
                "rtt": self.rtt}


@dataclass
class Cluster:
    model: dict[str, Any]
    nodes: list[NodeProfile]
    links: list[Link]
    created_by: str = ""
    path: Path | None = None

    def node(self, address: str) -> NodeProfile:
        for node in self.nodes:
            if node.address == address:
                return node
        raise UsageError(f"{self.path or 'cluster'}: no node {address}; it has "
                         f"{[n.address for n in self.nodes]}")

    def link(self, source: str, target: str) -> Link | None:
        """The measured link `source` -> `target`, or None if it was not measured."""
        for link in self.links:
            if link.source == source and link.target == target:
                return link
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": CLUSTER_SCHEMA_VERSION, "created_by": self.created_by,
                "model": self.model, "nodes": [n.to_dict() for n in self.nodes],
                "links": [link.to_dict() for link in self.links]}

    def save(self, path: str | Path) -> None:
        """Write atomically (a temp file moved into place): a failed run leaves nothing."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        partial.replace(path)
        self.path = path


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster.json; ManifestError names the bad field and the fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"{path}: cannot read it ({err}); run `defer profile` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); run `defer profile` again") from None
    return cluster_from_dict(data, path)


def cluster_from_dict(data: Any, path: Path | None = None) -> Cluster:
    where = path or "cluster"
    if not isinstance(data, dict) or data.get("schema_version") != CLUSTER_SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ManifestError(f"{where}: schema_version {version!r} is not supported (this defer "
                            f"reads {CLUSTER_SCHEMA_VERSION}); run `defer profile` again")
    try:
        nodes = [_node(d) for d in data["nodes"]]
        links = [_link(d) for d in data["links"]]
        model = dict(data["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"{where}: missing or malformed field ({err}); run `defer profile` "
                            "again") from None
    if not nodes:
        raise ManifestError(f"{where}: no nodes; run `defer profile` with --nodes")
    if len({n.address for n in nodes}) != len(nodes):
        raise ManifestError(f"{where}: a node is listed twice")
    return Cluster(model, nodes, links, data.get("created_by", ""), path)


_NODE_KEYS = {"address", "engine", "threads", "cores", "memory_free", "op_costs"}


def _node(d: dict[str, Any]) -> NodeProfile:
    parse_address(d["address"])
    costs = {str(k): float(v) for k, v in d["op_costs"].items()}
    if any(not math.isfinite(v) or v < 0 for v in costs.values()):
        raise ValueError(f"node {d['address']}: op costs must be finite seconds >= 0")
    return NodeProfile(d["address"], str(d["engine"]), int(d["threads"]), int(d["cores"]),
                       int(d["memory_free"]), costs,
                       {k: v for k, v in d.items() if k not in _NODE_KEYS})


def _link(d: dict[str, Any]) -> Link:
    for end in (d["from"], d["to"]):
        if end != DISPATCHER:
            parse_address(end)
    bandwidth, rtt = float(d["bandwidth"]), float(d["rtt"])
    if not (bandwidth > 0 and math.isfinite(bandwidth) and 0 <= rtt < math.inf):
        raise ValueError(f"link {d['from']} -> {d['to']}: bandwidth must be > 0 bytes/s and "
                         "rtt >= 0 s")
    return Link(d["from"], d["to"], bandwidth, rtt)
