"""A fleet to plan for: what cluster.json measured, as the partitioner prices it.

`build_fleet` turns a Cluster (defer/cluster.py) and this model's GraphInfo into a `Fleet`:

- per device, (N,) seconds of each op in the chosen order, from the node's own `op_costs`
  (keyed by op name; a constant-only op's cost goes to its first consumer, as the local
  profile does). Ops a node did not time are filled in from this machine's costs scaled by the
  node's *slowness* (its seconds / this machine's over the ops both timed); a node that timed
  less than 90% of the model's work was profiled for another model, a PlanError.
- per device, the seconds of starting and of ending a stage at each cut (`enter`/`leave`):
  the costs of cutting and of the codec measured here, times the slowness (when this
  machine's op costs were measured too; with a FLOP estimate here the ratio means nothing and
  they are priced as on this machine), plus the node's own per-message and per-byte costs of
  a hop if cluster.json has them (`hop_cost`: `per_message_s` once per stage, `per_byte_s` on
  the bytes in and the bytes out, or `recv_per_byte_s` / `send_per_byte_s`; defer/hop.py).
- per ordered pair of ends (devices and the dispatcher), the link's measured bandwidth and one
  way latency (rtt / 2). A link cluster.json does not list is not used, unless a default
  bandwidth is given (`--bandwidth`, with `--latency`), which then prices it.
- per device, a memory cap: its measured free memory, or the given cap if smaller.

Stage s of a chain runs on device d after `source` (the dispatcher for s = 0) and takes

    compute_d[a:b] + enter_d[a] + leave_d[b] + cut_bytes[a] / bw(source, d) + lat
    (+ cut_bytes[N] / bw(d, dispatcher) + its latency, for the last stage: the results' trip)

which is partition.py's stage time with per-stage compute and cut-cost vectors, speed 1 and
per-stage links (the return trip rides in `leave_d[N]`, so `--overlap` counts it as compute).
`Fleet.problem(order)` is the partitioning Problem of one device order; `Fleet.pair(source,
device)` the one-stage Problem the placement's sweeps use.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defer.cluster import DISPATCHER, Cluster, NodeProfile
from defer.compiler.graph import GraphInfo
from defer.compiler.memory import StageMemory
from defer.compiler.partition import Problem
from defer.compiler.profile import Costs, _op_index
from defer.compiler.wire import WireCosts
from defer.errors import PlanError
from defer.hop import HopCost, hop_cut_costs

log = logging.getLogger(__name__)

MIN_COVERAGE = 0.9  # share of the model's work a node must have timed


@dataclass
class Fleet:
    names: list[str]  # device addresses, in cluster.json's order
    compute: np.ndarray  # (m, N) seconds per op on each device
    slowness: np.ndarray  # (m,) each device's seconds per second of this machine's
    bandwidth: np.ndarray  # (m+1, m+1) bytes/s from i to j; index m = dispatcher; 0 = no link
    latency: np.ndarray  # (m+1, m+1) one-way seconds
    memory_cap: list[float | None]  # per device
    cut_bytes: np.ndarray  # (N+1,) bytes on the wire at each cut; [0] inputs, [N] outputs
    enter: np.ndarray  # (m, N+1) seconds of starting a stage at cut k, on each device
    leave: np.ndarray  # (m, N+1) ... of ending one there
    memory: StageMemory | None = None
    overlap: bool = False
    codec: str = "raw"

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def n_ops(self) -> int:
        return self.compute.shape[1]

    @property
    def dispatcher(self) -> int:
        return self.size

    def has_link(self, source: int, target: int) -> bool:
        return bool(self.bandwidth[source, target] > 0)

    def link_time(self, source: int, target: int, nbytes: float) -> float:
        """Seconds to move `nbytes` over source -> target, latency included."""
        return float(nbytes / self.bandwidth[source, target] + self.latency[source, target])

    def return_time(self, device: int) -> float:
        """Seconds for the results to travel from `device` back to the dispatcher."""
        if not self.has_link(device, self.dispatcher):
            return np.inf
        return self.link_time(device, self.dispatcher, self.cut_bytes[-1])

    def chain_links(self, order: Sequence[int]) -> list[tuple[int, int]]:
        """The links a chain uses, in order: dispatcher -> first, ..., last -> dispatcher."""
        ends = [self.dispatcher, *order, self.dispatcher]
        return list(zip(ends, ends[1:]))

    def usable(self, order: Sequence[int]) -> bool:
        return all(self.has_link(s, t) for s, t in self.chain_links(order))

    def problem(self, order: Sequence[int]) -> Problem:
        """The partitioning Problem of the devices `order` in that chain order."""
        order = list(order)
        if not self.usable(order):
            missing = [f"{self.label(s)} -> {self.label(t)}" for s, t in self.chain_links(order)
                       if not self.has_link(s, t)]
            raise PlanError(f"no measured link {', '.join(missing)}; run `defer profile` with "
                            "these nodes, or pass --bandwidth to price unmeasured links")
        sources = [self.dispatcher, *order[:-1]]
        leave = self.leave[order]
        leave[-1] = self._leave(order[-1])
        return Problem(
            compute=self.compute[order], cut_bytes=self.cut_bytes, speeds=[1.0] * len(order),
            bandwidth=[float(self.bandwidth[s, d]) for s, d in zip(sources, order)],
            latency=[float(self.latency[s, d]) for s, d in zip(sources, order)],
            memory=self.memory, memory_cap=[self.memory_cap[d] for d in order],
            enter=self.enter[order], leave=leave, overlap=self.overlap)

    def pair(self, source: int, device: int) -> Problem | None:
        """The one-stage Problem of `device` fed by `source` (None: no link between them)."""
        if not self.has_link(source, device):
            return None
        return Problem(
            compute=self.compute[device], cut_bytes=self.cut_bytes, speeds=[1.0],
            bandwidth=float(self.bandwidth[source, device]),
            latency=float(self.latency[source, device]), memory=self.memory,
            memory_cap=self.memory_cap[device], enter=self.enter[device],
            leave=self._leave(device), overlap=self.overlap)

    def _leave(self, last: int) -> np.ndarray:
        """`last`'s leave with the results' trip home, for a chain that ends on it."""
        leave = self.leave[last].copy()
        leave[-1] += self.return_time(last)
        return leave

    def label(self, end: int) -> str:
        return DISPATCHER if end == self.dispatcher else self.names[end]

    def whole_model_seconds(self) -> np.ndarray:
        """(m,) seconds each device takes for every op of the model."""
        return self.compute.sum(axis=1)

    def subset(self, devices: Sequence[int]) -> Fleet:
        """The fleet of only `devices` (in that order), with the same dispatcher."""
        ends = [*devices, self.dispatcher]
        return dataclasses.replace(
            self, names=[self.names[d] for d in devices], compute=self.compute[list(devices)],
            slowness=self.slowness[list(devices)], enter=self.enter[list(devices)],
            leave=self.leave[list(devices)], bandwidth=self.bandwidth[np.ix_(ends, ends)],
            latency=self.latency[np.ix_(ends, ends)],
            memory_cap=[self.memory_cap[d] for d in devices])

    def with_copy(self, template: int, factor: float = 1.0, name: str = "") -> Fleet:
        """This fleet plus a device like `template` whose ops take `factor` times as long; its
        links are the template's (to and from each end; between the two, the template's
        fastest link)."""
        m = self.size
        order = [*range(m), template, m]  # the copy sits before the dispatcher
        bw, lat = self.bandwidth[np.ix_(order, order)], self.latency[np.ix_(order, order)]
        best = int(np.argmax(self.bandwidth[template]))  # its fastest link, dispatcher's too
        bw[template, m] = bw[m, template] = self.bandwidth[template, best]
        lat[template, m] = lat[m, template] = self.latency[template, best]
        return dataclasses.replace(
            self, names=[*self.names, name or f"another {self.names[template]}"],
            compute=np.vstack([self.compute, self.compute[template] * factor]),
            slowness=np.append(self.slowness, self.slowness[template] * factor),
            enter=np.vstack([self.enter, self.enter[template] * factor]),
            leave=np.vstack([self.leave, self.leave[template] * factor]),
            bandwidth=bw, latency=lat, memory_cap=[*self.memory_cap, self.memory_cap[template]])


def build_fleet(info: GraphInfo, cluster: Cluster, local: Costs, wire: WireCosts | None = None,
                *, codec: str = "raw", memory: float | None = None,
                bandwidth: float | None = None, latency: float = 0.0,
                local_input: bool = False, overlap: bool = False) -> Fleet:
    """The Fleet of `cluster` for the model of `info` (see the module docstring)."""
    compute, slowness = zip(*(device_costs(info, node, local.node) for node in cluster.nodes))
    if local.source.startswith("estimate"):
        slowness = [1.0] * len(slowness)
    names = [node.address for node in cluster.nodes]
    bw, lat = _links(cluster, names, bandwidth, latency)
    cut_bytes = info.cut_bytes().astype(float)
    enter, leave = local.enter.copy(), local.leave.copy()
    if wire is not None:
        cut_bytes, enter, leave = wire.cut_bytes.copy(), enter + wire.decode, leave + wire.encode
    if local_input:
        cut_bytes[0] = 0.0
    hops = [hop_cut_costs(cut_bytes, _hop_cost(node)) for node in cluster.nodes]
    enters = np.array([slow * enter + hop_enter for slow, (hop_enter, _) in zip(slowness, hops)])
    leaves = np.array([slow * leave + hop_leave for slow, (_, hop_leave) in zip(slowness, hops)])
    caps = [_cap(node, memory) for node in cluster.nodes]
    return Fleet(names, np.array(compute), np.array(slowness), bw, lat, caps, cut_bytes, enters,
                 leaves, info.memory() if any(c is not None for c in caps) else None, overlap,
                 codec)


def _hop_cost(node: NodeProfile) -> HopCost | None:
    """The hop cost the node measured (cluster.json's `hop_cost`), else None."""
    hop = node.extra.get("hop_cost")
    if not hop:
        return None
    try:
        return HopCost.from_dict(hop)
    except (TypeError, ValueError):
        raise PlanError(f"{node.address}: malformed hop_cost in cluster.json ({hop!r:.80}); "
                        "run `defer profile` again") from None


def device_costs(info: GraphInfo, node: NodeProfile, local: np.ndarray) -> tuple[np.ndarray, float]:
    """(N,) seconds of each op of `info` on `node`, and the node's slowness against `local`."""
    measured = np.zeros(info.n_ops)
    timed = np.zeros(info.n_ops, dtype=bool)
    positions = _op_index(info)  # the local profile's rule: constant-only ops to first consumer
    for name, seconds in node.op_costs.items():
        if name in positions:
            measured[positions[name]] += seconds
            timed[positions[name]] = True
    covered = float(local[timed].sum()) / float(local.sum()) if local.sum() > 0 else timed.mean()
    if covered < MIN_COVERAGE:
        raise PlanError(f"{node.address}: cluster.json times only {covered:.0%} of this model's "
                        "work (was it profiled for another model?); run `defer profile` with "
                        "this model")
    here = float(local[timed].sum())
    slowness = float(measured[timed].sum()) / here if here > 0 else 1.0
    if not slowness > 0:
        raise PlanError(f"{node.address}: cluster.json gives every op 0 s; run `defer profile` "
                        "again")
    if not timed.all():
        log.info("%s: %d ops not timed, priced at this machine's cost x %.2f", node.address,
                 int((~timed).sum()), slowness)
    return np.where(timed, measured, local * slowness), slowness


def _links(cluster: Cluster, names: list[str], bandwidth: float | None,
           latency: float) -> tuple[np.ndarray, np.ndarray]:
    ends = [*names, DISPATCHER]
    bw = np.zeros((len(ends), len(ends)))
    lat = np.zeros((len(ends), len(ends)))
    for i, source in enumerate(ends):
        for j, target in enumerate(ends):
            if source == target:
                continue
            link = cluster.link(source, target)
            if link is not None:
                bw[i, j], lat[i, j] = link.bandwidth, link.rtt / 2
            elif bandwidth is not None:
                bw[i, j], lat[i, j] = bandwidth, latency
    return bw, lat


def _cap(node: NodeProfile, memory: float | None) -> float | None:
    free = float(node.memory_free) if node.memory_free > 0 else None
    caps = [c for c in (free, memory) if c is not None]
    return min(caps) if caps else None
