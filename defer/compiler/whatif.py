"""What-if planning over a measured fleet (`defer plan`): what each device count gives, what
limits it, what each codec would change, and what to buy.

`plan_fleet` profiles the model here (for the costs of cutting and of codecs), measures each
codec's bytes and CPU on a sample input (wire.py), builds one Fleet per codec from cluster.json
(fleet.py) and places chains of every length on it (placement.py). From those:

- per device count k: the best chain, its predicted throughput and latency, and its bottleneck
  named as a stage on a device or as a link (whichever part of the slowest stage is largest);
- per codec (on every hop, as `compile --codec` deploys it): the best chain, and what the
  slowest link of the base plan carries with it;
- advice: whether fewer devices are faster; the slowest extra device that still adds 1% (a
  copy of the fastest device, slowed down, on its links: bisection); what a link that limits
  the plan would need; what one more device like the fastest adds;
- replicas: whole chains on disjoint devices behind `defer gateway` (chains of k peeled off
  greedily, the fastest first), when that beats one chain. It assumes the dispatcher's own
  link is not shared between the chains' first hops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from defer import progress
from defer.cluster import Cluster
from defer.compiler.fleet import Fleet, build_fleet
from defer.compiler.frontend import front_end
from defer.compiler.load import LoadedModel
from defer.compiler.placement import (
    EXACT_LIMIT,
    WORTHWHILE,
    Placement,
    beats,
    best,
    optimal_bottlenecks,
    place,
    place_each,
)
from defer.compiler.wire import measure_wire
from defer.errors import PlanError
from defer.units import format_bytes

log = logging.getLogger(__name__)

COMPARE_CODECS = ("raw", "lz4", "zfp:1e-3", "q8", "q8+lz4")
MIN_GAIN = 0.01  # what "helps" means for an extra device


@dataclass
class Bottleneck:
    kind: str  # "stage" or "link"
    text: str
    seconds: float  # of that part
    stage: int  # the slowest stage
    link: tuple[int, int] | None = None  # (source, target) fleet ends, for a link
    nbytes: float = 0.0  # what the link carries


@dataclass
class Row:
    n: int
    placement: Placement | None
    bottleneck: Bottleneck | None
    batch: int = 1

    @property
    def throughput(self) -> float:
        return self.batch / self.placement.bottleneck if self.placement else 0.0


@dataclass
class FleetPlan:
    codec: str  # the base codec
    tables: dict[str, list[Row]]  # per codec (on every hop): k = 1..m
    slowest_link: dict | None = None  # the base plan's slowest link and each codec on it
    advice: list[str] = field(default_factory=list)
    replicas: dict | None = None
    exact: bool = True

    @property
    def rows(self) -> list[Row]:
        return self.tables[self.codec]

    def best(self, codec: str | None = None) -> Row:
        rows = self.tables[codec or self.codec]
        found = best({r.n: r.placement for r in rows})
        return next(r for r in rows if r.placement is found)


def plan_fleet(loaded: LoadedModel, cluster: Cluster, *, codec: str = "raw",
               codecs: tuple[str, ...] = COMPARE_CODECS, memory: float | None = None,
               bandwidth: float | None = None, latency: float = 0.0,
               local_input: bool = False, overlap: bool = False, batch: int = 1,
               use_profile: bool = True, order: str = "auto") -> FleetPlan:
    """Every what-if of the module docstring for `loaded` on `cluster`."""
    front = front_end(loaded.format)
    with progress.phase("analyse"):
        info = front.analyse(loaded.model, batch, order)
    costs = front.costs(info, front.profile(info)) if use_profile else front.estimate(info)
    fleets: dict[str, Fleet] = {}
    values = front.crossing_values(info) if set(codecs) - {"raw"} or codec != "raw" else {}
    with progress.phase("codecs", total=len({codec, *codecs})) as step:
        for spec in dict.fromkeys([codec, *codecs]):
            wire = measure_wire(info, spec, values=values) if spec != "raw" else None
            fleets[spec] = build_fleet(info, cluster, costs, wire, codec=spec, memory=memory,
                                       bandwidth=bandwidth, latency=latency,
                                       local_input=local_input, overlap=overlap)
            step()
    with progress.phase("place", total=len(fleets)) as step:
        placed = {}
        for spec, fleet in fleets.items():
            placed[spec] = place_each(fleet)
            step()
    base = fleets[codec]
    tables = {spec: [Row(n, p, describe_bottleneck(fleets[spec], p) if p else None, batch)
                     for n, p in placements.items()] for spec, placements in placed.items()}
    if all(r.placement is None for r in tables[codec]):
        raise PlanError("no chain of these devices fits the model (memory or links); "
                        "check cluster.json's memory and links")
    result = FleetPlan(codec, tables, exact=base.size <= EXACT_LIMIT)
    result.slowest_link = slowest_link(fleets, result.best().placement)
    with progress.phase("advice"):
        result.advice = advise(base, placed[codec], batch)
        result.replicas = replicas(base, result.best().placement, batch)
    return result


def describe_bottleneck(fleet: Fleet, placement: Placement) -> Bottleneck:
    """The largest part of the slowest stage: its compute, the link into it, or (last stage)
    the link taking the results home."""
    problem, plan = placement.problem, placement.plan
    s = int(np.argmax(plan.stage_times))
    a, b = plan.bounds[s], plan.bounds[s + 1]
    device = placement.order[s]
    source = fleet.dispatcher if s == 0 else placement.order[s - 1]
    home = fleet.return_time(device) if s == len(placement.order) - 1 else 0.0
    link_in = float(problem.transfer(a, s)) + float(problem.of_stage("latency", s))
    compute = float(problem.work(s, a, b)) / problem.speeds[s] - home
    parts = [
        Bottleneck("stage", f"stage {s} on {fleet.names[device]} (ops {a}..{b - 1}: "
                            f"{compute * 1e3:.1f} ms of compute)", compute, s),
        Bottleneck("link", _link_text(fleet, source, device, fleet.cut_bytes[a], link_in),
                   link_in, s, (source, device), float(fleet.cut_bytes[a])),
        Bottleneck("link", _link_text(fleet, device, fleet.dispatcher, fleet.cut_bytes[-1],
                                      home), home, s, (device, fleet.dispatcher),
                   float(fleet.cut_bytes[-1])),
    ]
    return max(parts, key=lambda part: part.seconds)


def _link_text(fleet: Fleet, source: int, target: int, nbytes: float, seconds: float) -> str:
    return (f"link {fleet.label(source)} -> {fleet.label(target)} ({format_bytes(nbytes)} at "
            f"{format_rate(fleet.bandwidth[source, target])}: {seconds * 1e3:.1f} ms)")


def format_rate(bytes_per_second: float) -> str:
    bits = bytes_per_second * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.1f} {unit}"
    return f"{bits:.0f} bit/s"


def slowest_link(fleets: dict[str, Fleet], placement: Placement) -> dict | None:
    """The lowest-bandwidth link of `placement` that carries data, and per codec the bytes it
    would carry at the same cut and the seconds that takes (codec CPU not included)."""
    fleet = next(iter(fleets.values()))
    links = fleet.chain_links(placement.order)
    cuts = [*placement.plan.bounds[:-1], placement.plan.bounds[-1]]
    carried = [(fleet.bandwidth[s, t], i) for i, (s, t) in enumerate(links)
               if fleet.cut_bytes[cuts[i]] > 0]
    if not carried:
        return None
    rate, i = min(carried)
    source, target = links[i]
    per_codec = {spec: {"bytes": float(f.cut_bytes[cuts[i]]),
                        "seconds": f.link_time(source, target, f.cut_bytes[cuts[i]])}
                 for spec, f in fleets.items()}
    return {"from": fleet.label(source), "to": fleet.label(target), "bandwidth": float(rate),
            "cut": int(cuts[i]), "codecs": per_codec}


def advise(fleet: Fleet, placements: dict[int, Placement | None], batch: int = 1) -> list[str]:
    """Sentences on what to do: fewer devices, a faster device, a faster link, one more."""
    chosen = best(placements)
    rate = batch / chosen.bottleneck
    lines = []
    n, m = len(chosen.order), fleet.size
    if n < m:
        everyone = placements.get(m)
        left_out = sorted(set(range(m)) - set(chosen.order))
        with_all = (f"all {m} give {batch / everyone.bottleneck:.2f} inf/s" if everyone
                    else f"no chain of all {m} fits")
        more = max((p for p in placements.values() if p is not None),
                   key=lambda p: -p.bottleneck)
        if more.bottleneck < chosen.bottleneck:
            with_all += (f"; {len(more.order)} would add only "
                         f"{chosen.bottleneck / more.bottleneck - 1:.1%}, under the "
                         f"{WORTHWHILE:.0%} a hop must earn")
        lines.append(f"use {n} of the {m} devices ({rate:.2f} inf/s; {with_all}): leave out "
                     f"{', '.join(fleet.names[d] for d in left_out)}")
    bottleneck = describe_bottleneck(fleet, chosen)
    if bottleneck.kind == "link":
        lines.append(_link_advice(fleet, chosen, bottleneck))
    fastest = int(np.argmin(fleet.whole_model_seconds()))
    if m + 1 <= EXACT_LIMIT:
        lines.append(_device_advice(fleet, fastest, rate, batch))
    gain = _best_rate(fleet.with_copy(fastest), batch) / rate - 1
    lines.append(f"a device #{m + 1} like {fleet.names[fastest]} adds {gain:.0%}")
    return lines


def _best_rate(fleet: Fleet, batch: int) -> float:
    return batch / min(optimal_bottlenecks(fleet).values())


def _device_advice(fleet: Fleet, template: int, rate: float, batch: int) -> str:
    """The slowest copy of `template` (its op costs x factor) that still adds MIN_GAIN."""
    whole = float(fleet.whole_model_seconds()[template])

    def helps(factor: float) -> bool:
        return beats(fleet.with_copy(template, factor), batch / (rate * (1 + MIN_GAIN)))

    if not helps(1e-3):
        return "no extra device helps, however fast: the limit is not compute"
    lo, hi = 1e-3, 1.0  # lo helps; find the largest factor that does
    while helps(hi) and hi < 1e3:
        lo, hi = hi, hi * 4
    for _ in range(8):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if helps(mid) else (lo, mid)
    return (f"a device that runs the whole model in under {whole * lo * 1e3:.0f} ms adds "
            f"{MIN_GAIN:.0%} or more (the fastest, {fleet.names[template]}, takes "
            f"{whole * 1e3:.0f} ms; priced on links like its)")


def _link_advice(fleet: Fleet, chosen: Placement, bottleneck: Bottleneck) -> str:
    """The rate the limiting link needs for the chain's next limit to take over."""
    source, target = bottleneck.link
    stage_time = chosen.plan.stage_times[bottleneck.stage]
    others = [t for i, t in enumerate(chosen.plan.stage_times) if i != bottleneck.stage]
    rest = stage_time - bottleneck.seconds  # the stage without this link's transfer
    latency = float(fleet.latency[source, target])
    room = max([*others, rest]) - latency - (0.0 if fleet.overlap else rest)
    name = f"{fleet.label(source)} -> {fleet.label(target)}"
    if room <= 0 or bottleneck.nbytes <= 0:
        return f"the link {name} limits the chain through its latency; move the cut"
    return (f"a link {name} faster than {format_rate(bottleneck.nbytes / room)} (now "
            f"{format_rate(fleet.bandwidth[source, target])}), or a codec on it (see above)")


def replicas(fleet: Fleet, single: Placement, batch: int = 1) -> dict | None:
    """The best set of whole chains on disjoint devices (each k devices, the fastest chain
    first), if more than one chain beats `single`."""
    best_found = None
    for k in range(1, fleet.size // 2 + 1):
        left, chains = list(range(fleet.size)), []
        while len(left) >= k:
            try:
                placed = place(fleet.subset(left), k)
            except PlanError:
                break
            chosen = [left[i] for i in placed.order]
            chains.append(([fleet.names[d] for d in chosen], batch / placed.bottleneck))
            left = [d for d in left if d not in chosen]
        total = sum(r for _, r in chains)
        if len(chains) > 1 and (best_found is None or total > best_found["throughput"]):
            best_found = {"devices_per_chain": k, "chains": chains, "throughput": total}
    if best_found is None or best_found["throughput"] <= batch / single.bottleneck * (1 + MIN_GAIN):
        return None
    best_found["gain"] = best_found["throughput"] / (batch / single.bottleneck) - 1
    return best_found
