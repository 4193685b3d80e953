"""Partition the order of ops into contiguous stages, one per device of the chain.

Stage s covers ops [a, b) and runs on a device of relative speed speeds[s]:

    time(s, a, b) = (compute_s[a:b] + enter[a] + leave[b]) / speeds[s]
                    + cut_bytes[a] / bandwidth_s + latency_s

`compute` is one (N,) vector of seconds per op, or one such vector per stage (a heterogeneous
fleet, each device costed on itself); so are `enter` and `leave` ((N+1,) or one row per stage).
`bandwidth`, `latency` and `memory_cap` are one value for every stage, or one per stage (stage
s's incoming link, its device's memory). `cut_bytes[a]` is what crosses into the stage (for stage
0, the model inputs); `enter`/`leave` are the extra seconds of starting / ending a stage at a cut
(layout reorders, broken fusions, codec work, per-message costs), zero when unknown. With
`overlap`, a device receives while it computes, so the stage takes
max(compute part, transfer part) + latency instead of their sum.

The objective is lexicographic: the slowest stage (pipeline throughput = 1 / slowest), then
fewer bytes on the wire (interior cuts), then lower total latency (sum of stage times). A stage
over the memory cap (see memory.py) is infeasible. `balanced` solves it exactly in two passes
that never hold a matrix over all (a, b) pairs:

1. The optimal bottleneck by bisection. "Can every stage stay under B?" is a forward sweep of
   reachable cut positions, O(N) per stage (O(N log N) with a memory cap), vectorised.
2. Among plans under that bottleneck, fewest bytes then lowest total, by dynamic programming
   over blocks of end positions. Only cut positions that can be reached from the start AND can
   still reach the end under the bottleneck are visited, and a stage's start is bounded below
   by its compute, so the work is a band around the optimum. Memory O(N * n_stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from defer.compiler.intervals import range_min_after, stab_max
from defer.compiler.memory import StageMemory
from defer.errors import PlanError
from defer.units import format_bytes

_REL_EPS = 1e-9
_BLOCK = 1 << 19  # elements of one (starts x ends) block of the second pass
_BISECTIONS = 80


@dataclass
class Problem:
    compute: np.ndarray  # (N,) seconds per op at speed 1, or (n_stages, N): one per device
    cut_bytes: np.ndarray  # (N+1,) bytes crossing a cut before op k
    speeds: list[float]  # one per stage, chain order
    bandwidth: float | None | Sequence[float | None] = None  # bytes/s; None = unlimited
    latency: float | Sequence[float] = 0.0  # seconds per hop
    memory: StageMemory | None = None  # what a stage [a, b) holds
    memory_cap: float | None | Sequence[float | None] = None
    enter: np.ndarray | None = None  # (N+1,) seconds at speed 1, or (n_stages, N+1)
    leave: np.ndarray | None = None  # (N+1,) or (n_stages, N+1)
    overlap: bool = False  # transfer overlaps compute: max instead of sum
    _prefix: list[np.ndarray] = field(init=False, repr=False, compare=False)
    _reach: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.compute = np.asarray(self.compute, dtype=float)
        self.cut_bytes = np.asarray(self.cut_bytes, dtype=float)
        rows = self.compute if self.compute.ndim == 2 else [self.compute]
        self._prefix = [np.concatenate([[0.0], np.cumsum(r)]) for r in rows]
        for name in ("enter", "leave"):
            if getattr(self, name) is not None:
                setattr(self, name, np.asarray(getattr(self, name), dtype=float))
        for name in ("compute", "enter", "leave", "bandwidth", "latency", "memory_cap"):
            value = getattr(self, name)
            rows = value.ndim == 2 if isinstance(value, np.ndarray) else isinstance(value,
                                                                                    Sequence)
            if rows and len(value) != len(self.speeds):
                raise PlanError(f"{len(value)} values of {name} for {len(self.speeds)} stages; "
                                "give one, or one per stage")

    @property
    def n_ops(self) -> int:
        return self.compute.shape[-1]

    @property
    def n_stages(self) -> int:
        return len(self.speeds)

    def prefix(self, stage: int) -> np.ndarray:
        """(N+1,) cumulative compute seconds of the device of `stage`."""
        return self._prefix[stage if len(self._prefix) > 1 else 0]

    def work(self, stage: int, a, b):
        """Seconds at speed 1 of ops [a, b) plus the cut costs (scalars or broadcast arrays)."""
        prefix = self.prefix(stage)
        work = prefix[b] - prefix[a]
        if self.enter is not None:
            work = work + self.of_stage("enter", stage)[a]
        if self.leave is not None:
            work = work + self.of_stage("leave", stage)[b]
        return work

    def of_stage(self, name: str, stage: int):
        """A per-stage field (bandwidth, latency, memory_cap, enter, leave) for `stage`."""
        value = getattr(self, name)
        if isinstance(value, np.ndarray):
            return value[stage] if value.ndim == 2 else value
        return value[stage] if isinstance(value, Sequence) else value

    def cut_costs(self, name: str, stage: int) -> np.ndarray | float:
        """(N+1,) `enter` or `leave` of `stage`'s device (0.0 when not given)."""
        value = self.of_stage(name, stage)
        return 0.0 if value is None else value

    def transfer(self, a, stage: int = 0):
        bandwidth = self.of_stage("bandwidth", stage)
        return self.cut_bytes[a] / bandwidth if bandwidth else 0.0 * self.cut_bytes[a]

    def times(self, stage: int, a, b):
        """time(stage, a, b) for scalars or broadcast arrays of starts and ends."""
        compute = self.work(stage, a, b) / self.speeds[stage]
        latency = self.of_stage("latency", stage)
        if self.overlap:
            return np.maximum(compute, self.transfer(a, stage)) + latency
        return compute + self.transfer(a, stage) + latency

    def reach(self, stage: int = 0) -> np.ndarray | None:
        """Per start, the last end under the stage's memory cap (None: no cap)."""
        cap = self.of_stage("memory_cap", stage)
        if self.memory is None or cap is None:
            return None
        if cap not in self._reach:
            self._reach[cap] = self.memory.reach(cap)
        return self._reach[cap]

    def fits(self, stage: int, a: int, b: int) -> bool:
        cap = self.of_stage("memory_cap", stage)
        return self.memory is None or cap is None or self.memory.of(a, b) <= cap


@dataclass
class Plan:
    strategy: str
    bounds: list[int]  # stage s covers [bounds[s], bounds[s+1])
    stage_times: list[float]
    wire_bytes: int  # bytes over interior cuts, per inference
    ideal: float  # op compute spread over the fleet: no plan's slowest stage can beat it
    fits_memory: bool = True

    @property
    def bottleneck(self) -> float:
        return max(self.stage_times)

    @property
    def total(self) -> float:
        return float(sum(self.stage_times))

    @property
    def cuts(self) -> list[int]:
        return self.bounds[1:-1]

    @property
    def imbalance(self) -> float:
        """Slowest stage / mean stage: 1.0 is perfect balance of this plan's own work."""
        mean = self.total / len(self.stage_times)
        return self.bottleneck / mean if mean > 0 else 1.0

    @property
    def over_ideal(self) -> float:
        """Slowest stage / the ideal (op compute spread evenly, no cost for cutting)."""
        return self.bottleneck / self.ideal if self.ideal > 0 else 1.0

    def __repr__(self) -> str:
        return (f"Plan({self.strategy}, n={len(self.stage_times)}, cuts={self.cuts}, "
                f"bottleneck={self.bottleneck * 1e3:.3f}ms, ideal={self.ideal * 1e3:.3f}ms, "
                f"x{self.over_ideal:.3f} of ideal, x{self.imbalance:.3f} of mean, "
                f"wire={self.wire_bytes}B)")


def evaluate(problem: Problem, bounds: list[int], strategy: str = "cuts") -> Plan:
    """The plan that cuts at `bounds` (0 = b_0 < ... < b_n = N), with its predicted times."""
    times = []
    fits = True
    for s in range(problem.n_stages):
        a, b = bounds[s], bounds[s + 1]
        times.append(float(problem.times(s, a, b)) if a < b else float("inf"))
        fits = fits and (a >= b or problem.fits(s, a, b))
    wire = int(sum(problem.cut_bytes[k] for k in bounds[1:-1]))
    return Plan(strategy, list(bounds), times, wire, _ideal(problem), fits)


def balanced(problem: Problem) -> Plan:
    """The exact optimum: minimal bottleneck, then fewest wire bytes, then lowest total time."""
    _check_sizes(problem)
    reach = [problem.reach(s) for s in range(problem.n_stages)]
    bound = _optimal_bottleneck(problem, reach)
    limit = bound * (1 + _REL_EPS) + 1e-15
    bounds = _min_bytes_then_latency(problem, reach, limit)
    return evaluate(problem, bounds, "balanced")


def feasible(problem: Problem, limit: float) -> bool:
    """Whether some plan keeps every stage at or under `limit` (one forward sweep)."""
    _check_sizes(problem)
    reach = [problem.reach(s) for s in range(problem.n_stages)]
    return _feasible(problem, reach, limit * (1 + _REL_EPS) + 1e-15)


def equal_layers(problem: Problem) -> Plan:
    """The baseline of hand-cut tools: equal op counts per stage."""
    _check_sizes(problem)
    n, count = problem.n_stages, problem.n_ops
    bounds = [round(i * count / n) for i in range(n + 1)]
    return evaluate(problem, bounds, "layers")


def _check_sizes(problem: Problem) -> None:
    if problem.n_stages < 1:
        raise PlanError(f"n = {problem.n_stages}: a plan needs at least 1 stage; pass -n 1 or more")
    if problem.n_stages > problem.n_ops:
        raise PlanError(f"n = {problem.n_stages} stages but the model has only "
                        f"{problem.n_ops} ops; pass -n {problem.n_ops} or fewer")


# --- pass 1: the optimal bottleneck ---------------------------------------------------------


def thresholds(problem: Problem, stage: int, limit: float) -> np.ndarray:
    """thr[a]: a stage starting at a ends in time at b iff end_costs(b) <= thr[a]."""
    speed, latency = problem.speeds[stage], problem.of_stage("latency", stage)
    start = problem.prefix(stage) - problem.cut_costs("enter", stage)
    transfer = problem.transfer(np.arange(problem.n_ops + 1), stage)
    if problem.overlap:
        thr = (limit - latency) * speed + start
        thr = np.where(transfer + latency <= limit, thr, -np.inf)
    else:
        thr = (limit - latency - transfer) * speed + start
    thr[-1] = -np.inf  # no stage starts after the last op
    return thr


def end_costs(problem: Problem, stage: int) -> np.ndarray:
    """(N+1,) what a stage ending at b needs of thresholds(): prefix[b] + leave[b]."""
    return problem.prefix(stage) + problem.cut_costs("leave", stage)


def _forward(problem: Problem, reach: list[np.ndarray | None], limit: float,
             keep: bool = False) -> list[np.ndarray]:
    """Positions reachable after each number of stages, every stage taking <= limit."""
    size = problem.n_ops + 1
    reached = np.zeros(size, dtype=bool)
    reached[0] = True
    sets = [reached]
    for s in range(problem.n_stages):
        thr = np.where(reached, thresholds(problem, s, limit), -np.inf)
        best = stab_max(thr, reach[s])  # best[b] = max thr[a] over starts a < b <= reach[a]
        reached = end_costs(problem, s) <= best
        reached[0] = False
        if keep:
            sets.append(reached)
        elif not reached.any():
            break
    return sets if keep else [reached]


def _backward(problem: Problem, reach: list[np.ndarray | None],
              limit: float) -> list[np.ndarray]:
    """Positions from which stages s.. can still finish at N, every stage taking <= limit."""
    size = problem.n_ops + 1
    can = np.zeros(size, dtype=bool)
    can[-1] = True
    sets = [can]
    for s in reversed(range(problem.n_stages)):
        best = range_min_after(np.where(can, end_costs(problem, s), np.inf), reach[s])
        can = thresholds(problem, s, limit) >= best  # best[a] = min ends[b], a < b <= reach[a]
        sets.append(can)
    return sets[::-1]


def _feasible(problem: Problem, reach: list[np.ndarray | None], limit: float) -> bool:
    last = _forward(problem, reach, limit)[-1]
    return bool(last[-1])


def _optimal_bottleneck(problem: Problem, reach: list[np.ndarray | None]) -> float:
    hi = _upper_bound(problem)
    if not _feasible(problem, reach, hi):
        raise PlanError(_infeasible_message(problem))
    lo = 0.0
    for _ in range(_BISECTIONS):
        if hi - lo <= 1e-13 * hi:
            break
        mid = 0.5 * (lo + hi)
        if _feasible(problem, reach, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _upper_bound(problem: Problem) -> float:
    """A time no stage can exceed: all ops, the worst cut costs, the worst transfer."""
    every = np.arange(problem.n_ops + 1)
    worst = 0.0
    for s in range(problem.n_stages):
        extra = sum(float(np.max(problem.cut_costs(x, s))) for x in ("enter", "leave"))
        compute = (problem.prefix(s)[-1] + extra) / problem.speeds[s]
        transfer = float(np.max(problem.transfer(every, s)))
        total = max(compute, transfer) if problem.overlap else compute + transfer
        worst = max(worst, total + problem.of_stage("latency", s))
    return worst * (1 + 1e-9) + 1e-300


# --- pass 2: fewest bytes, then lowest total, under the bottleneck --------------------------


def _min_bytes_then_latency(problem: Problem, reach: list[np.ndarray | None],
                            limit: float) -> list[int]:
    loose = limit * (1 + 1e-12)  # prune with a superset of what the exact check accepts
    forward = _forward(problem, reach, loose, keep=True)
    backward = _backward(problem, reach, loose)
    size = problem.n_ops + 1
    wire = problem.cut_bytes.copy()
    wire[0] = 0.0
    cost_bytes = np.full(size, np.inf)
    cost_bytes[0] = 0.0
    cost_time = np.zeros(size)
    choices = []
    for s in range(problem.n_stages):
        starts = np.flatnonzero(forward[s] & backward[s] & np.isfinite(cost_bytes))
        ends = np.flatnonzero(forward[s + 1] & backward[s + 1])
        new_bytes, new_time = np.full(size, np.inf), np.full(size, np.inf)
        choice = np.full(size, -1, dtype=np.int64)
        for block_starts, block_ends in _blocks(problem, s, starts, ends, limit):
            a, b = block_starts[:, None], block_ends[None, :]
            times = problem.times(s, a, b)
            ok = (a < b) & (times <= limit)
            if reach[s] is not None:
                ok &= b <= reach[s][a]
            cand_bytes = np.where(ok, cost_bytes[a] + wire[a], np.inf)
            best_bytes = cand_bytes.min(axis=0)
            cand_time = np.where(ok & (cand_bytes == best_bytes), cost_time[a] + times, np.inf)
            pick = cand_time.argmin(axis=0)
            best_time = cand_time[pick, np.arange(len(block_ends))]
            found = np.isfinite(best_time)
            new_bytes[block_ends[found]] = best_bytes[found]
            new_time[block_ends[found]] = best_time[found]
            choice[block_ends[found]] = block_starts[pick[found]]
        cost_bytes, cost_time = new_bytes, new_time
        choices.append(choice)
    if not np.isfinite(cost_bytes[-1]):
        raise PlanError("internal error: no plan under the optimal bottleneck; "
                        "report this with the model attached")
    bounds = [problem.n_ops]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return bounds[::-1]


def _blocks(problem: Problem, stage: int, starts: np.ndarray, ends: np.ndarray, limit: float):
    """(starts, ends) blocks covering every pair that can be a stage under `limit`.

    A stage [a, b) takes at least (prefix[b] - prefix[a]) / speed, so for each end only the
    starts with prefix[a] >= prefix[b] - (limit - latency) * speed can be feasible."""
    if len(starts) == 0 or len(ends) == 0:
        return
    prefix = problem.prefix(stage)
    span = (limit - problem.of_stage("latency", stage)) * problem.speeds[stage] * (1 + 1e-9)
    first = np.searchsorted(prefix[starts], prefix[ends] - span, side="left")
    last = np.searchsorted(starts, ends, side="left")  # starts < end
    i = 0
    while i < len(ends):
        j = i + 1
        while j < len(ends) and (last[j] - first[i]) * (j + 1 - i) <= _BLOCK:
            j += 1
        lo, hi = first[i], last[j - 1]
        if hi > lo:
            yield starts[lo:hi], ends[i:j]
        i = j


def _ideal(problem: Problem) -> float:
    """The fleet's combined rate on the whole model (no cutting costs): 1 / sum(1 / t_s),
    t_s = the whole model's compute on device s alone. Equal vectors: total / sum(speeds)."""
    rates = [problem.speeds[s] / problem.prefix(s)[-1] if problem.prefix(s)[-1] > 0 else np.inf
             for s in range(problem.n_stages)]
    total_rate = float(np.sum(rates))
    return 1.0 / total_rate if total_rate > 0 and np.isfinite(total_rate) else 0.0


def _infeasible_message(problem: Problem) -> str:
    caps = [c for c in (problem.of_stage("memory_cap", s) for s in range(problem.n_stages))
            if c is not None]
    if problem.memory is not None and caps:
        cap = max(caps)
        fewest = problem.memory.fewest_stages(cap)
        if fewest is None:
            return (f"no plan fits the memory cap of {format_bytes(cap)} per device: one op "
                    f"alone needs {format_bytes(problem.memory.largest_op())}; raise --memory")
        return (f"no {problem.n_stages}-stage plan fits the memory cap of "
                f"{format_bytes(cap)} per device: it takes at least {fewest}; "
                "raise -n or --memory")
    return "no feasible plan; check the speeds and the number of stages"
