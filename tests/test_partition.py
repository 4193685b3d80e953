"""The partitioner against brute force on random small problems, and its baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defer.compiler.memory import StageMemory
from defer.compiler.partition import Problem, balanced, equal_layers
from defer.errors import PlanError


def _memory(m: StageMemory, a: int, b: int) -> float:
    # Written out independently of StageMemory on purpose: shared weights counted once.
    weights = set().union(*(set(m.op_weights[i]) for i in range(a, b)))
    return sum(m.weight_bytes[w] for w in weights) + m.received[a] + sum(m.produced[a:b])


def _per_stage(value, s: int):
    return value[s] if isinstance(value, list) else value


def _stage_time(p: Problem, s: int, a: int, b: int) -> float:
    # Written out independently of Problem.times on purpose.
    compute = p.compute[s] if p.compute.ndim == 2 else p.compute
    enter = p.enter[s] if p.enter.ndim == 2 else p.enter
    leave = p.leave[s] if p.leave.ndim == 2 else p.leave
    work = (sum(compute[a:b]) + enter[a] + leave[b]) / p.speeds[s]
    bandwidth, cap = _per_stage(p.bandwidth, s), _per_stage(p.memory_cap, s)
    transfer = p.cut_bytes[a] / bandwidth if bandwidth else 0.0
    t = (max(work, transfer) if p.overlap else work + transfer) + _per_stage(p.latency, s)
    if p.memory is not None and cap is not None and _memory(p.memory, a, b) > cap:
        return float("inf")
    return t


def brute_force(p: Problem):
    """Best (bottleneck, wire bytes, total time) over every way to cut."""
    best = None
    for cuts in itertools.combinations(range(1, p.n_ops), p.n_stages - 1):
        bounds = [0, *cuts, p.n_ops]
        times = [_stage_time(p, s, bounds[s], bounds[s + 1]) for s in range(p.n_stages)]
        key = (max(times), sum(p.cut_bytes[c] for c in cuts), sum(times))
        if best is None or _better(key, best):
            best = key
    return best


def _better(key, best) -> bool:
    if not np.isclose(key[0], best[0], rtol=1e-9, atol=0):
        return key[0] < best[0]
    if key[1] != best[1]:
        return key[1] < best[1]
    return key[2] < best[2] - 1e-12


@st.composite
def problems(draw):
    n_nodes = draw(st.integers(2, 9))
    n_stages = draw(st.integers(1, min(4, n_nodes)))
    floats = st.floats(0.0, 10.0, allow_nan=False)
    per_device = draw(st.booleans())  # one cost vector per stage (a heterogeneous fleet)
    compute = np.array([draw(st.lists(floats, min_size=n_nodes, max_size=n_nodes))
                        for _ in range(n_stages if per_device else 1)])
    compute = compute if per_device else compute[0]
    # Small integer byte counts so ties on the wire are common and the tie-break is exercised.
    cut_bytes = np.array(draw(st.lists(st.integers(0, 6), min_size=n_nodes + 1,
                                       max_size=n_nodes + 1)), dtype=float)
    speeds = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n_stages,
                           max_size=n_stages))
    per_link = draw(st.booleans())  # each stage's incoming link measured on its own
    links = st.lists(st.sampled_from([None, 0.5, 1.0, 4.0]), min_size=n_stages,
                     max_size=n_stages)
    bandwidth = draw(links) if per_link else draw(st.sampled_from([None, 0.5, 1.0, 4.0]))
    latencies = st.lists(st.sampled_from([0.0, 0.25]), min_size=n_stages, max_size=n_stages)
    latency = draw(latencies) if per_link else draw(st.sampled_from([0.0, 0.25]))
    memory = cap = None
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        n_weights = int(rng.integers(1, 6))  # few weights, so ops share them
        memory = StageMemory(
            op_weights=[sorted(set(rng.integers(0, n_weights, rng.integers(0, 3)).tolist()))
                        for _ in range(n_nodes)],
            weight_bytes=rng.integers(0, 4, n_weights), produced=rng.integers(0, 3, n_nodes),
            received=rng.integers(0, 3, n_nodes + 1))
        caps = st.floats(2.0, 12.0)
        cap = (draw(st.lists(st.one_of(st.none(), caps), min_size=n_stages, max_size=n_stages))
               if draw(st.booleans()) else draw(caps))
    cut_cost = st.lists(st.sampled_from([0.0, 0.0, 0.5, 2.0]), min_size=n_nodes + 1,
                        max_size=n_nodes + 1)
    rows = n_stages if per_device else 1  # a device's own cut costs too
    enter = np.array([draw(cut_cost) for _ in range(rows)])
    leave = np.array([draw(cut_cost) for _ in range(rows)])
    enter, leave = (enter, leave) if per_device else (enter[0], leave[0])
    overlap = draw(st.booleans())
    return Problem(compute, cut_bytes, speeds, bandwidth, latency, memory, cap, enter, leave,
                   overlap)


@settings(max_examples=600, deadline=None)
@given(problems())
def test_balanced_equals_brute_force(problem):
    expected = brute_force(problem)
    if not np.isfinite(expected[0]):
        with pytest.raises(PlanError, match="memory cap"):
            balanced(problem)
        return
    plan = balanced(problem)
    assert plan.bottleneck == pytest.approx(expected[0], rel=1e-9)
    assert plan.wire_bytes == expected[1]
    assert plan.total == pytest.approx(expected[2], rel=1e-9, abs=1e-12)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == problem.n_ops
    assert all(a < b for a, b in zip(plan.bounds, plan.bounds[1:]))


def test_faster_node_gets_two_thirds():
    problem = Problem(np.ones(300), np.zeros(301), speeds=[2.0, 1.0])
    plan = balanced(problem)
    assert plan.cuts == [200]


def test_bandwidth_moves_the_cut_to_a_narrow_place():
    # Equal compute everywhere; cutting in the middle costs 1000 bytes, at node 4 only 10.
    cut_bytes = np.array([0, 1000, 1000, 1000, 10, 1000, 1000, 1000, 0], dtype=float)
    compute = np.ones(8)
    blind = balanced(Problem(compute, cut_bytes, [1.0, 1.0]))
    assert blind.cuts == [4]  # the tie-break already prefers the narrow cut
    cut_bytes[4] = 1000
    cut_bytes[3] = 10
    limited = balanced(Problem(compute, cut_bytes, [1.0, 1.0], bandwidth=100.0))
    assert limited.cuts == [3]  # 3 + 0.1 beats 4 + 10 at the other cut
    assert balanced(Problem(compute, cut_bytes, [1.0, 1.0])).cuts == [4]


def test_layers_baseline_splits_node_counts_evenly():
    plan = equal_layers(Problem(np.arange(10, dtype=float), np.zeros(11), [1.0] * 3))
    assert plan.bounds == [0, 3, 7, 10]


def test_too_many_stages_is_a_plan_error():
    with pytest.raises(PlanError, match="only 3 ops"):
        balanced(Problem(np.ones(3), np.zeros(4), [1.0] * 4))


def test_plan_repr_is_one_line():
    plan = balanced(Problem(np.ones(6), np.zeros(7), [1.0, 1.0]))
    assert "\n" not in repr(plan) and "cuts=[3]" in repr(plan)


def _random_memory(n_ops: int, seed: int) -> StageMemory:
    rng = np.random.default_rng(seed)
    n_weights = int(rng.integers(1, 5))
    return StageMemory([rng.integers(0, n_weights, rng.integers(0, 3)).tolist()
                        for _ in range(n_ops)], rng.integers(0, 5, n_weights),
                       rng.integers(0, 3, n_ops), rng.integers(0, 4, n_ops + 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**16), st.floats(0.0, 30.0))
def test_memory_reach_is_the_last_end_under_the_cap(n_ops, seed, cap):
    memory = _random_memory(n_ops, seed)
    reach = memory.reach(cap)
    for a in range(n_ops):
        fits = [b for b in range(a + 1, n_ops + 1) if _memory(memory, a, b) <= cap]
        assert reach[a] == (max(fits) if fits else a)
        assert fits == list(range(a + 1, reach[a] + 1))  # grows with b: an interval


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**16), st.floats(0.0, 30.0))
def test_fewest_stages_under_a_cap_is_brute_forces(n_ops, seed, cap):
    """What the memory error quotes: the least stage count whose stages all fit the cap."""
    memory = _random_memory(n_ops, seed)
    counts = [len(cuts) + 1 for k in range(n_ops)
              for cuts in itertools.combinations(range(1, n_ops), k)
              if all(_memory(memory, a, b) <= cap
                     for a, b in zip((0, *cuts), (*cuts, n_ops)))]
    assert memory.fewest_stages(cap) == (min(counts) if counts else None)
    if not counts:
        assert memory.largest_op() > cap


def test_large_problem_needs_no_square_matrix():
    import tracemalloc

    rng = np.random.default_rng(0)
    n_ops = 20_000
    compute = rng.exponential(1e-4, n_ops) * (rng.random(n_ops) < 0.5)
    problem = Problem(compute, rng.integers(1000, 100_000, n_ops + 1).astype(float),
                      [1.0] * 16, bandwidth=1e9)
    tracemalloc.start()
    try:
        plan = balanced(problem)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plan.over_ideal < 1.01 and len(plan.bounds) == 17
    # The dense formulation held a 20,001^2 float64 matrix per stage: 3.2 GB each.
    assert peak < 200e6, peak
