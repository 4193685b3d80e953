"""Partition the topological order of ops into contiguous stages, one per device of the chain.

Stage s covers ops [a, b) and runs on a device of relative speed speeds[s]:

    time(s, a, b) = (compute[a:b] + enter[a] + leave[b]) / speeds[s]
                    + cut_bytes[a] / bandwidth + latency

`cut_bytes[a]` is what crosses into the stage (for stage 0, the model inputs); `enter`/`leave`
are the measured extra costs of starting / ending a stage at a cut (layout reorders, fusions
broken by the cut, codec work), zero when unknown. With `overlap`, a device receives while it
computes, so the link into a stage and the node are separate pipeline resources:

    time(s, a, b) = max((compute[a:b] + enter[a] + leave[b]) / speeds[s],
                        cut_bytes[a] / bandwidth) + latency The objective is
lexicographic: the slowest stage (pipeline throughput = 1 / slowest), then fewer bytes on the
wire (interior cuts), then lower total latency (sum of stage times). `memory[a, b]` over a cap
makes a stage infeasible. `balanced` solves it exactly in two dynamic programmes: the first finds
the optimal bottleneck, the second minimises bytes and latency among plans that attain it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defer.errors import PlanError

_REL_EPS = 1e-9


@dataclass
class Problem:
    compute: np.ndarray  # (N,) seconds per op at speed 1
    cut_bytes: np.ndarray  # (N+1,) bytes crossing a cut before op k
    speeds: list[float]  # one per stage, chain order
    bandwidth: float | None = None  # bytes/s; None = unlimited
    latency: float = 0.0  # seconds per hop
    memory: np.ndarray | None = None  # (N+1, N+1) bytes needed by a stage [a, b)
    memory_cap: float | None = None
    enter: np.ndarray | None = None  # (N+1,) seconds at speed 1
    leave: np.ndarray | None = None  # (N+1,)
    overlap: bool = False  # transfer overlaps compute: max instead of sum

    @property
    def n_ops(self) -> int:
        return len(self.compute)

    @property
    def n_stages(self) -> int:
        return len(self.speeds)

    def time_matrix(self, stage: int) -> np.ndarray:
        """T[a, b] = time of stage `stage` covering [a, b); inf where a >= b or over the cap."""
        prefix = np.concatenate([[0.0], np.cumsum(self.compute)])
        comm = self.cut_bytes / self.bandwidth if self.bandwidth else np.zeros_like(prefix)
        work = prefix[None, :] - prefix[:, None]
        if self.enter is not None:
            work = work + self.enter[:, None]
        if self.leave is not None:
            work = work + self.leave[None, :]
        if self.overlap:
            times = np.maximum(work / self.speeds[stage], comm[:, None]) + self.latency
        else:
            times = work / self.speeds[stage] + comm[:, None] + self.latency
        a, b = np.indices(times.shape)
        times[a >= b] = np.inf
        if self.memory is not None and self.memory_cap is not None:
            times[self.memory > self.memory_cap] = np.inf
        return times


@dataclass
class Plan:
    strategy: str
    bounds: list[int]  # stage s covers [bounds[s], bounds[s+1])
    stage_times: list[float]
    wire_bytes: int  # bytes over interior cuts, per inference
    ideal: float  # op compute / sum of speeds: no plan's slowest stage can beat it
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
        t = problem.time_matrix(s)[a, b] if a < b else np.inf
        if not np.isfinite(t) and a < b:
            fits = False
            t = _unconstrained_time(problem, s, a, b)
        times.append(float(t))
    wire = int(sum(problem.cut_bytes[k] for k in bounds[1:-1]))
    return Plan(strategy, list(bounds), times, wire, _ideal(problem), fits)


def balanced(problem: Problem) -> Plan:
    """The exact optimum: minimal bottleneck, then fewest wire bytes, then lowest total time."""
    _check_sizes(problem)
    matrices = [problem.time_matrix(s) for s in range(problem.n_stages)]
    bound = _optimal_bottleneck(problem, matrices)
    if not np.isfinite(bound):
        raise PlanError(_infeasible_message(problem))
    limit = bound * (1 + _REL_EPS) + 1e-15
    bounds = _min_bytes_then_latency(problem, matrices, limit)
    return evaluate(problem, bounds, "balanced")


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


def _optimal_bottleneck(problem: Problem, matrices: list[np.ndarray]) -> float:
    size = problem.n_ops + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    for times in matrices:
        best = np.min(np.maximum(best[:, None], times), axis=0)
    return float(best[-1])


def _min_bytes_then_latency(problem: Problem, matrices: list[np.ndarray], limit: float) -> list[int]:
    size = problem.n_ops + 1
    wire = problem.cut_bytes.astype(float).copy()
    wire[0] = 0.0
    cost_bytes = np.full(size, np.inf)
    cost_bytes[0] = 0.0
    cost_time = np.zeros(size)
    choices = []
    for times in matrices:
        feasible = times <= limit
        cand_bytes = np.where(feasible, cost_bytes[:, None] + wire[:, None], np.inf)
        cand_time = np.where(feasible, cost_time[:, None] + times, np.inf)
        new_bytes = cand_bytes.min(axis=0)
        at_min = cand_bytes == new_bytes[None, :]
        cand_time = np.where(at_min & np.isfinite(cand_bytes), cand_time, np.inf)
        choice = cand_time.argmin(axis=0)
        cost_bytes, cost_time = new_bytes, cand_time[choice, np.arange(size)]
        choices.append(choice)
    bounds = [problem.n_ops]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return bounds[::-1]


def _unconstrained_time(problem: Problem, stage: int, a: int, b: int) -> float:
    free = Problem(problem.compute, problem.cut_bytes, problem.speeds, problem.bandwidth,
                   problem.latency, enter=problem.enter, leave=problem.leave,
                   overlap=problem.overlap)
    return float(free.time_matrix(stage)[a, b])


def _ideal(problem: Problem) -> float:
    """Total compute (no cutting costs) spread evenly over the summed speeds."""
    return float(np.sum(problem.compute) / np.sum(problem.speeds))


def _infeasible_message(problem: Problem) -> str:
    if problem.memory is not None and problem.memory_cap is not None:
        smallest = float(np.min(problem.memory[np.triu_indices(problem.n_ops + 1, 1)]))
        return (f"no plan fits the memory cap of {problem.memory_cap / 2**20:.1f} MiB per device "
                f"(the smallest single stage needs {smallest / 2**20:.1f} MiB); "
                "raise --memory or use more devices")
    return "no feasible plan; check the speeds and the number of stages"
