"""The exact sweep of placement.py: which cuts chains of devices can reach, every stage under
a bound, for every (set of devices used, last device) at once; and the least such bound.

A state holds a boolean vector over the N+1 cuts. It grows by one device e: partition.py's
thresholds for the link (last -> e) and an interval stab (intervals.py) give every end reachable
from any reachable start, for all the states of a layer together (one (S, N+1) array per
device), and states of the same key are merged. Cuts from which no chain can still reach the
end within the allowed stages (a relaxation: any device, repeats allowed, fed over its best
link) are dropped as they appear. `bottleneck_bounds` bisects on the bound (geometrically,
between the dearest op on its cheapest device and a bound nothing exceeds) to _REL_TOL, longest
chains first: each question also answers every shorter chain.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from defer.compiler.fleet import Fleet
from defer.compiler.intervals import range_min_after, stab_max
from defer.compiler.partition import Problem, end_costs, thresholds

_REL_TOL = 1e-7  # the bisection's precision on the slowest stage


@dataclass
class Layer:
    """States after some stages: for each, the set of devices used (bit mask), the last one,
    and the cut positions its chains reach."""

    masks: np.ndarray  # (S,) int
    lasts: np.ndarray  # (S,) int
    rows: np.ndarray  # (S, N+1) bool

    def reaches_end(self) -> bool:
        return bool(self.rows[:, -1].any())


class Sweep:
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
        layer = Layer(np.array([0]), np.array([self.start]), start)
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

    def _advance(self, layer: Layer, thr: np.ndarray, finishing: np.ndarray) -> Layer:
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
            return Layer(np.zeros(0, int), np.zeros(0, int), np.zeros((0, self.size), bool))
        masks, lasts, rows = (np.concatenate(x) for x in zip(*grown))
        keys = masks * (len(self.devices) + 1) + lasts
        order = np.argsort(keys, kind="stable")
        _, first = np.unique(keys[order], return_index=True)
        merged = np.logical_or.reduceat(rows[order], first, axis=0)
        return Layer(masks[order][first], lasts[order][first], merged)

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


def bottleneck_bounds(sweep: Sweep, fleet: Fleet, counts: list[int]) -> dict[int, float | None]:
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


def _upper_bound(sweep: Sweep) -> float:
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
