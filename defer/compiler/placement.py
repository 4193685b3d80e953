"""Placement: which devices of a fleet a chain uses, in which order, and where it cuts.

The objective is partition.py's, taken over every choice of n devices out of the fleet's m,
every order of them and every set of cuts: the slowest stage first, then fewer bytes on the
wire, then the lower total time. A device's stage time depends on the device (its own op costs,
memory) and on the link into it (fleet.py), so order matters when devices or links differ.

Exact for m <= EXACT_LIMIT devices. The optimal slowest stage is found by bisection; "can n
stages all stay under B?" is a forward sweep over states (set of devices used, last device),
each holding the cut positions its chains can reach (sweep.py): O(2^m m^2 N) per question, a
few dozen questions (shared between the chain lengths asked for). A chain that meets the
optimal bound is read back from the sweep; partition.balanced then cuts
that order with its exact tie-breaks, and a local search over orders (swap two devices, or
one for an unused one) breaks ties between orders on bytes and total time. So: exact on the
slowest stage, a local search on the tie-breaks between device orders.

Above EXACT_LIMIT devices it is a heuristic, and says so (`Placement.exact` False): the n
devices fastest on the whole model, ordered by the exact sweep when n <= EXACT_LIMIT, else
greedily along the fastest links, then the same local search. `best` picks a device count:
the fewest devices within WORTHWHILE of the fastest chain (a hop costs latency and is one more
thing to fail).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from defer.compiler.fleet import Fleet, build_fleet
from defer.compiler.partition import Plan, Problem, balanced, feasible
from defer.compiler.sweep import Sweep, bottleneck_bounds
from defer.errors import PlanError

if TYPE_CHECKING:
    from defer.cluster import Cluster
    from defer.compiler.graph import GraphInfo
    from defer.compiler.profile import Costs
    from defer.compiler.wire import WireCosts

log = logging.getLogger(__name__)

EXACT_LIMIT = 10
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


def place_on_cluster(info: GraphInfo, cluster: Cluster, costs: Costs, wire: WireCosts | None,
                     n: int | None, **fleet_options) -> Placement:
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


# --- exact: the sweep's bounds, then a chain read back and searched ----------------------


def optimal_bottlenecks(fleet: Fleet, counts: Iterable[int] | None = None) -> dict[int, float]:
    """The least slowest stage of any chain of n devices, per n (inf where none fits): the
    exact sweep's bound alone, without cutting or tie-breaks (what what-ifs need)."""
    counts = sorted(set(counts or range(1, fleet.size + 1)))
    if fleet.size > EXACT_LIMIT:
        return {n: p.bottleneck if p else math.inf for n, p in place_each(fleet, counts).items()}
    bounds = bottleneck_bounds(Sweep(fleet, list(range(fleet.size))), fleet, counts)
    return {n: math.inf if b is None else b for n, b in bounds.items()}


def beats(fleet: Fleet, limit: float) -> bool:
    """Whether some chain of the fleet keeps every stage under `limit` (one sweep; above
    EXACT_LIMIT devices, whether the heuristic finds one)."""
    if fleet.size > EXACT_LIMIT:
        return min(optimal_bottlenecks(fleet).values()) <= limit
    return any(Sweep(fleet, list(range(fleet.size))).feasible(limit, fleet.size))


def _exact(fleet: Fleet, devices: list[int], counts: list[int],
           exact: bool) -> dict[int, Placement | None]:
    sweep = Sweep(fleet, devices)
    hi = bottleneck_bounds(sweep, fleet, counts)
    out: dict[int, Placement | None] = {}
    for n in counts:
        if hi[n] is None:
            out[n] = None
            continue
        order = sweep.chain(hi[n] * (1 + 1e-12), n)
        out[n] = _search(fleet, order, exact, spare=[d for d in devices if d not in order])
    return out


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
