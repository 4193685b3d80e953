"""Placement: which devices of a fleet a chain uses, in which order, and where it cuts.

The objective is partition.py's, taken over every choice of n devices out of the fleet's m,
every order of them and every set of cuts: the slowest stage first, then fewer bytes on the
wire, then the lower total time. A device's stage time depends on the device (its own op costs,
memory) and on the link into it (fleet.py), so order matters when devices or links differ.

Exact for m <= EXACT_LIMIT devices. The optimal slowest stage is found by bisection; "can n
stages all stay under B?" is a forward sweep over states (set of devices used, last device),
each holding the cut positions its chains can reach (a boolean vector over the N+1 cuts). A
state grows by one device e at a time: partition.py's thresholds for the link (last -> e) and
an interval stab give every reachable end at once, for all the states of a layer together:
O(2^m m^2 N) per question, a few dozen questions (shared between the chain lengths asked for).
A chain that meets the optimal bound is read back from the sweep; partition.balanced then cuts
that order with its exact tie-breaks, and a local search over orders (swap two devices, or
one for an unused one) breaks ties between orders on bytes and total time. So: exact on the
slowest stage, a local search on the tie-breaks between device orders.

Above EXACT_LIMIT devices it is a heuristic, and says so (`Placement.exact` False): the n
devices fastest on the whole model, ordered by the exact sweep when n <= EXACT_LIMIT, else
greedily along the fastest links, then the same local search.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from defer.compiler.fleet import Fleet, build_fleet
from defer.compiler.intervals import range_min_after, stab_max
from defer.compiler.partition import (
    Plan,
    Problem,
    balanced,
    end_costs,
    feasible,
    thresholds,
)
from defer.errors import PlanError

log = logging.getLogger(__name__)

EXACT_LIMIT = 10
_REL_TOL = 1e-7  # the bisection's precision on the slowest stage
_SEARCH_BUDGET = 400  # partition.balanced calls the local search may spend per placement
WORTHWHILE = 0.02  # what one more device must add to be worth its hop (latency, a failure point)


@dataclass
class Placement:
    order: list[int]  # fleet device indices, chain order
    devices: list[str]  # their addresses
    plan: Plan
    problem: Problem
    exact: bool = True
    counts: dict[int, float] = field(default_factory=dict)  # best slowest stage per count

    @property
    def bottleneck(self) -> float:
        return self.plan.bottleneck

    @property
    def latency(self) -> float:
        """Seconds one input spends in the chain: every stage's time, links included."""
        return self.plan.total

    def __repr__(self) -> str:
        return (f"Placement({' -> '.join(self.devices)}, cuts={self.plan.cuts}, "
                f"bottleneck={self.bottleneck * 1e3:.3f}ms, "
                f"{'exact' if self.exact else 'heuristic'})")


def place(fleet: Fleet, n: int) -> Placement:
    """The best chain of exactly `n` of the fleet's devices; PlanError if there is none."""
    found = place_each(fleet, [n])[n]
    if found is None:
        raise PlanError(f"no chain of {n} of the {fleet.size} devices fits: "
                        f"{_why_none(fleet, n)}")
    return found


def place_each(fleet: Fleet, counts: Iterable[int] | None = None) -> dict[int, Placement | None]:
    """The best chain for each device count in `counts` (default 1..m); None where none fits."""
    counts = sorted(set(counts or range(1, fleet.size + 1)))
    bad = [n for n in counts if not 1 <= n <= min(fleet.size, fleet.n_ops)]
    if bad:
        raise PlanError(f"-n {bad[0]}: the fleet has {fleet.size} devices and the model "
                        f"{fleet.n_ops} ops; pass -n between 1 and "
                        f"{min(fleet.size, fleet.n_ops)}")
    if fleet.size <= EXACT_LIMIT:
        return _exact(fleet, list(range(fleet.size)), counts, exact=True)
    log.warning("%d devices: more than %d, so placement is a heuristic (the fastest devices, "
                "then a local search)", fleet.size, EXACT_LIMIT)
    speed_rank = list(np.argsort(fleet.whole_model_seconds(), kind="stable"))
    out: dict[int, Placement | None] = {}
    for n in counts:
        chosen = [int(d) for d in speed_rank[:n]]
        if n <= EXACT_LIMIT:
            out[n] = _exact(fleet, chosen, [n], exact=False)[n]
        else:
            out[n] = _search(fleet, _greedy_order(fleet, chosen), exact=False)
    return out


def place_on_cluster(info, cluster, costs, wire, n: int | None, **fleet_options) -> Placement:
    """The compile recipe's step for `--cluster`: the Fleet of `cluster` for this op order,
    codec and options (fleet.build_fleet), and its best chain of `n` devices (None: the count
    that is best, fewer devices unless more earn WORTHWHILE). `counts` on the result holds
    every count's best slowest stage, so a caller can say when fewer devices are faster."""
    fleet = build_fleet(info, cluster, costs, wire, **fleet_options)
    if n is None:
        placements = place_each(fleet)
        chosen = best(placements)
        chosen.counts = {k: p.bottleneck if p else math.inf for k, p in placements.items()}
    else:
        chosen = place(fleet, n)
        chosen.counts = optimal_bottlenecks(fleet)
    return chosen


def best(placements: dict[int, Placement | None], margin: float = WORTHWHILE) -> Placement:
    """The chain with the fewest devices whose slowest stage is within `margin` of the
    fastest chain's: more devices must earn their hops."""
    found = [p for _, p in sorted(placements.items()) if p is not None]
    if not found:
        raise PlanError("no chain of these devices fits the model; see `defer plan`")
    fastest = min(p.bottleneck for p in found)
    return next(p for p in found if p.bottleneck <= fastest * (1 + margin))


# --- the exact sweep ------------------------------------------------------------------------


@dataclass
class _Layer:
    """States after some stages: for each, the set of devices used (bit mask), the last one,
    and the cut positions its chains reach."""

    masks: np.ndarray  # (S,) int
    lasts: np.ndarray  # (S,) int
    rows: np.ndarray  # (S, N+1) bool

    def reaches_end(self) -> bool:
        return bool(self.rows[:, -1].any())


class _Sweep:
    """Reachable cuts per (set of devices used, last device), for a subset of the fleet."""

    def __init__(self, fleet: Fleet, devices: Sequence[int]):
        self.fleet, self.devices = fleet, list(devices)
        k = len(self.devices)
        self.start = k  # the dispatcher, in local indices
        self.pairs: dict[tuple[int, int], Problem] = {}
        for e, source in itertools.product(range(k), range(k + 1)):
            pair = fleet.pair(self._global(source), self.devices[e]) if source != e else None
            if pair is not None:
                self.pairs[source, e] = pair
        self.reach = {e: p.reach(0) for (_, e), p in self.pairs.items()}
        self.ends = {e: end_costs(p, 0) for (_, e), p in self.pairs.items()}
        self.size = fleet.n_ops + 1

    def _global(self, local: int) -> int:
        return self.fleet.dispatcher if local == self.start else self.devices[local]

    def feasible(self, limit: float, depth: int) -> list[bool]:
        """[n stages can all stay under `limit`, for n = 1..depth]."""
        return [layer.reaches_end() for layer in self._walk(limit, depth)]

    def _walk(self, limit: float, depth: int):
        """The layers after 1..depth stages, each stage under `limit`. Cuts from which no
        chain can reach the end within `depth` stages are dropped as they appear."""
        k = len(self.devices)
        thr = np.full((k + 1, k, self.size), -np.inf)  # [source, device]: partition's thresholds
        for (source, e), pair in self.pairs.items():
            thr[source, e] = thresholds(pair, 0, limit)
        finishing = self._finishing(thr, depth)
        start = np.zeros((1, self.size), dtype=bool)
        start[0, 0] = True
        layer = _Layer(np.array([0]), np.array([self.start]), start)
        for used in range(1, depth + 1):
            layer = self._advance(layer, thr, finishing[depth - used])
            yield layer

    def _finishing(self, thr: np.ndarray, depth: int) -> list[np.ndarray]:
        """[r]: cuts from which r more stages or fewer can reach the end, in a relaxation
        (any device, repeats allowed, fed over its best link): partition's backward sweep."""
        best_thr = thr.max(axis=0)  # (k, N+1)
        can = np.zeros(self.size, dtype=bool)
        can[-1] = True
        out = [can]
        for _ in range(depth):
            step = can.copy()
            for e in self.reach:
                first_end = range_min_after(np.where(can, self.ends[e], np.inf), self.reach[e])
                step |= best_thr[e] >= first_end
            can = step
            out.append(can)
        return out

    def _advance(self, layer: _Layer, thr: np.ndarray, finishing: np.ndarray) -> _Layer:
        """Every state grown by one more device (keeping the cuts in `finishing`), states of
        the same key merged."""
        alive = layer.rows[:, :-1].any(axis=1)  # a chain that reached the end cannot grow
        masks, lasts, rows = layer.masks[alive], layer.lasts[alive], layer.rows[alive]
        grown = []
        for e in self.reach:
            free = (masks >> e) & 1 == 0
            if not free.any():
                continue
            best = stab_max(np.where(rows[free], thr[lasts[free], e], -np.inf), self.reach[e])
            reached = (self.ends[e] <= best) & finishing
            reached[:, 0] = False
            keep = reached.any(axis=1)
            grown.append((masks[free][keep] | 1 << e, np.full(int(keep.sum()), e),
                          reached[keep]))
        if not grown:
            return _Layer(np.zeros(0, int), np.zeros(0, int), np.zeros((0, self.size), bool))
        masks, lasts, rows = (np.concatenate(x) for x in zip(*grown))
        keys = masks * (len(self.devices) + 1) + lasts
        order = np.argsort(keys, kind="stable")
        _, first = np.unique(keys[order], return_index=True)
        merged = np.logical_or.reduceat(rows[order], first, axis=0)
        return _Layer(masks[order][first], lasts[order][first], merged)

    def chain(self, limit: float, n: int) -> list[int]:
        """A device order (global indices) of n stages all under `limit`, read back greedily:
        from the end, each step takes the predecessor whose stage is quickest."""
        layers = list(self._walk(limit, n))
        final = layers[-1]
        i = int(np.flatnonzero(final.rows[:, -1])[0])
        mask, e, b = int(final.masks[i]), int(final.lasts[i]), self.size - 1
        order = [e]
        for layer in reversed(layers[:-1]):
            prev = mask ^ (1 << e)
            options = []
            for j in np.flatnonzero(layer.masks == prev):
                d = int(layer.lasts[j])
                if (d, e) not in self.pairs:
                    continue
                starts = np.flatnonzero(layer.rows[j, :b])
                if self.reach[e] is not None:
                    starts = starts[self.reach[e][starts] >= b]
                if len(starts):
                    times = self.pairs[d, e].times(0, starts, b)
                    pick = int(np.argmin(times))
                    options.append((float(times[pick]), d, int(starts[pick])))
            _, e, b = min(options)
            mask = prev
            order.append(e)
        return [self.devices[e] for e in reversed(order)]


def optimal_bottlenecks(fleet: Fleet, counts: Iterable[int] | None = None) -> dict[int, float]:
    """The least slowest stage of any chain of n devices, per n (inf where none fits): the
    exact sweep's bound alone, without cutting or tie-breaks (what what-ifs need)."""
    counts = sorted(set(counts or range(1, fleet.size + 1)))
    if fleet.size > EXACT_LIMIT:
        return {n: p.bottleneck if p else math.inf for n, p in place_each(fleet, counts).items()}
    bounds = _bounds(_Sweep(fleet, list(range(fleet.size))), fleet, counts)
    return {n: math.inf if b is None else b for n, b in bounds.items()}


def beats(fleet: Fleet, limit: float) -> bool:
    """Whether some chain of the fleet keeps every stage under `limit` (one sweep; above
    EXACT_LIMIT devices, whether the heuristic finds one)."""
    if fleet.size > EXACT_LIMIT:
        return min(optimal_bottlenecks(fleet).values()) <= limit
    return any(_Sweep(fleet, list(range(fleet.size))).feasible(limit, fleet.size))


def _bounds(sweep: _Sweep, fleet: Fleet, counts: list[int]) -> dict[int, float | None]:
    """Per n, a bound within _REL_TOL above the optimal slowest stage (None: no chain fits)."""
    top = _upper_bound(sweep)
    ok = sweep.feasible(top, max(counts))
    # No stage beats the dearest op on the device cheapest for it; bisect between the bounds
    # (geometrically), longest chains first: each test also answers every shorter chain.
    floor = float(fleet.compute[sweep.devices].min(axis=0).max(initial=0.0))
    lo = {n: min(floor, top) for n in counts}
    hi = {n: top if ok[n - 1] else None for n in counts}
    for n in sorted(counts, reverse=True):
        while hi[n] is not None and hi[n] - lo[n] > _REL_TOL * hi[n]:
            mid = math.sqrt(lo[n] * hi[n]) if lo[n] > 0 else 0.5 * hi[n]
            for k, fits in enumerate(sweep.feasible(mid, n), start=1):
                if hi.get(k) is not None:
                    hi[k], lo[k] = (min(hi[k], mid), lo[k]) if fits else (hi[k], max(lo[k], mid))
    return hi


def _exact(fleet: Fleet, devices: list[int], counts: list[int],
           exact: bool) -> dict[int, Placement | None]:
    sweep = _Sweep(fleet, devices)
    hi = _bounds(sweep, fleet, counts)
    out: dict[int, Placement | None] = {}
    for n in counts:
        if hi[n] is None:
            out[n] = None
            continue
        order = sweep.chain(hi[n] * (1 + 1e-12), n)
        out[n] = _search(fleet, order, exact, spare=[d for d in devices if d not in order])
    return out


def _upper_bound(sweep: _Sweep) -> float:
    """A time no stage of any chain exceeds: a device's whole model, its worst cut costs and
    the worst transfer into it (a device that cannot send results home never ends a chain)."""
    worst = 0.0
    for pair in sweep.pairs.values():
        every = np.arange(pair.n_ops + 1)
        cut_costs = [float(np.max(x[np.isfinite(x)], initial=0.0)) for x in (pair.enter,
                                                                             pair.leave)]
        compute = (float(pair.prefix(0)[-1]) + sum(cut_costs)) / pair.speeds[0]
        transfer = float(np.max(pair.transfer(every, 0)))
        worst = max(worst, compute + transfer + pair.of_stage("latency", 0))
    return worst * (1 + 1e-9) + 1e-300


# --- tie-breaks between orders, and the heuristic -------------------------------------------


def _key(plan: Plan, reference: Plan) -> tuple:
    close = abs(plan.bottleneck - reference.bottleneck) <= 1e-9 * reference.bottleneck
    return (reference.bottleneck if close else plan.bottleneck, plan.wire_bytes, plan.total)


def _solve(fleet: Fleet, order: list[int], limit: float = math.inf) -> tuple[Plan, Problem] | None:
    """`order` cut by partition.balanced; None if no cut keeps it under `limit`."""
    if not fleet.usable(order):
        return None
    problem = fleet.problem(order)
    try:
        if limit < math.inf and not feasible(problem, limit):
            return None
        return balanced(problem), problem
    except PlanError:  # a memory cap no cut of this order meets
        return None


def _search(fleet: Fleet, order: list[int], exact: bool,
            spare: Sequence[int] = ()) -> Placement | None:
    """`order` cut by partition.balanced, then improved by swapping devices while the
    bottleneck does not grow and bytes or total time shrink."""
    solved = _solve(fleet, order)
    if solved is None:
        return None
    spare = list(spare)
    budget = _SEARCH_BUDGET
    improved = True
    while improved and budget > 0:
        improved = False
        for candidate in _neighbours(order, spare):
            budget -= 1
            found = _solve(fleet, candidate, solved[0].bottleneck)
            if found is not None and _key(found[0], solved[0]) < _key(solved[0], solved[0]):
                spare = [d for d in (*spare, *order) if d not in candidate]
                order, solved, improved = candidate, found, True
                break
            if budget <= 0:
                break
    plan, problem = solved
    return Placement(order, [fleet.names[d] for d in order], plan, problem, exact)


def _neighbours(order: list[int], spare: list[int]):
    for i, j in itertools.combinations(range(len(order)), 2):
        swapped = list(order)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        yield swapped
    for i, d in itertools.product(range(len(order)), spare):
        yield [*order[:i], d, *order[i + 1:]]


def _greedy_order(fleet: Fleet, devices: list[int]) -> list[int]:
    """From the dispatcher, each next device is the unused one over the fastest link."""
    order, left, end = [], list(devices), fleet.dispatcher
    while left:
        nxt = max(left, key=lambda d: fleet.bandwidth[end, d])
        order.append(nxt)
        left.remove(nxt)
        end = nxt
    return order


def _why_none(fleet: Fleet, n: int) -> str:
    if fleet.memory is not None:
        return "the devices' memory is too small for the stages (see `defer plan`)"
    return "the measured links do not connect such a chain; run `defer profile` on these nodes"
