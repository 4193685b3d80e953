"""Placement against brute force: every subset of devices, every order, every cut, on random
small fleets (mixed per-op costs, directed links with missing ones, memory caps, codec-like cut
costs); plus the cases that motivate it (a slow device or link left out, order by links)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defer.compiler.fleet import Fleet
from defer.compiler.memory import StageMemory
from defer.compiler.placement import best, place, place_each
from defer.errors import PlanError


def _stage(f: Fleet, source: int, d: int, a: int, b: int) -> float:
    # Written out from fleet.py's docstring, independently of Fleet.problem and Problem.times.
    if f.bandwidth[source, d] <= 0:
        return np.inf
    work = f.compute[d, a:b].sum() + f.enter[d, a] + f.leave[d, b]
    if b == f.n_ops:  # the last stage also sends the results home
        if f.bandwidth[d, f.dispatcher] <= 0:
            return np.inf
        work += f.cut_bytes[-1] / f.bandwidth[d, f.dispatcher] + f.latency[d, f.dispatcher]
    transfer = f.cut_bytes[a] / f.bandwidth[source, d]
    t = (max(work, transfer) if f.overlap else work + transfer) + f.latency[source, d]
    if f.memory is not None and f.memory_cap[d] is not None:
        weights = set().union(*(set(f.memory.op_weights[i]) for i in range(a, b)))
        held = (sum(f.memory.weight_bytes[w] for w in weights) + f.memory.received[a]
                + sum(f.memory.produced[a:b]))
        if held > f.memory_cap[d]:
            return np.inf
    return t


def brute_force(f: Fleet, n: int) -> float:
    """The least slowest stage over every n devices in every order and every cut."""
    best_time = np.inf
    for order in itertools.permutations(range(f.size), n):
        for cuts in itertools.combinations(range(1, f.n_ops), n - 1):
            bounds = [0, *cuts, f.n_ops]
            sources = [f.dispatcher, *order[:-1]]
            slowest = max(_stage(f, s, d, bounds[i], bounds[i + 1])
                          for i, (s, d) in enumerate(zip(sources, order)))
            best_time = min(best_time, slowest)
    return best_time


@st.composite
def fleets(draw):
    m = draw(st.integers(1, 5))
    n_ops = draw(st.integers(1, 6 if m < 5 else 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    compute = rng.choice([0.0, 0.5, 1.0, 2.0, 5.0], (m, n_ops)) * rng.choice([1, 3], (m, 1))
    slowness = rng.choice([0.5, 1.0, 3.0], m)
    bandwidth = rng.choice([0.0, 0.5, 2.0, 10.0, np.inf], (m + 1, m + 1),
                           p=[0.15, 0.25, 0.25, 0.2, 0.15])
    np.fill_diagonal(bandwidth, 0.0)
    latency = rng.choice([0.0, 0.25], (m + 1, m + 1))
    cut_bytes = rng.integers(0, 5, n_ops + 1).astype(float)
    memory, caps = None, [None] * m
    if draw(st.booleans()):
        n_weights = int(rng.integers(1, 5))
        memory = StageMemory([sorted(set(rng.integers(0, n_weights, rng.integers(0, 3)).tolist()))
                              for _ in range(n_ops)], rng.integers(0, 4, n_weights),
                             rng.integers(0, 3, n_ops), rng.integers(0, 3, n_ops + 1))
        caps = [None if rng.random() < 0.3 else float(rng.integers(3, 12)) for _ in range(m)]
    cut_cost = rng.choice([0.0, 0.0, 0.5], (2, m, n_ops + 1))  # each device its own
    return Fleet([f"10.0.0.{i}:7000" for i in range(m)], compute, slowness, bandwidth,
                 latency, caps, cut_bytes, cut_cost[0], cut_cost[1], memory,
                 draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(fleets(), st.integers(1, 5))
def test_placement_equals_brute_force(fleet, n):
    n = min(n, fleet.size, fleet.n_ops)
    expected = brute_force(fleet, n)
    if not np.isfinite(expected):
        with pytest.raises(PlanError):
            place(fleet, n)
        return
    placed = place(fleet, n)
    assert placed.bottleneck == pytest.approx(expected, rel=1e-6)
    assert len(set(placed.order)) == n and placed.plan.bounds[-1] == fleet.n_ops
    # The plan's own figures are the fleet's stage times for that order and those cuts.
    sources = [fleet.dispatcher, *placed.order[:-1]]
    bounds = placed.plan.bounds
    own = [_stage(fleet, s, d, bounds[i], bounds[i + 1])
           for i, (s, d) in enumerate(zip(sources, placed.order))]
    assert placed.plan.stage_times == pytest.approx(own, rel=1e-9)


def _fleet(compute, bandwidth=None, n_ops=None, cut=1e6, **changes) -> Fleet:
    compute = np.asarray(compute, dtype=float)
    m, n_ops = compute.shape
    bw = np.full((m + 1, m + 1), 1e12 if bandwidth is None else bandwidth, dtype=float)
    np.fill_diagonal(bw, 0.0)
    fields = dict(names=[f"10.0.0.{i}:7000" for i in range(m)], compute=compute,
                  slowness=np.ones(m), bandwidth=bw, latency=np.zeros((m + 1, m + 1)),
                  memory_cap=[None] * m, cut_bytes=np.full(n_ops + 1, cut),
                  enter=np.zeros((m, n_ops + 1)), leave=np.zeros((m, n_ops + 1)))
    fields.update(changes)
    return Fleet(**fields)


def test_a_very_slow_device_is_left_out():
    # Three devices at 1 s/op and one at 20 s/op: a chain of four must give the slow one an
    # op (20 s); three devices do 40 ops at ~13.3 s.
    compute = np.vstack([np.ones((3, 40)), np.full((1, 40), 20.0)])
    placements = place_each(_fleet(compute))
    assert placements[4].bottleneck == pytest.approx(20.0)
    assert best(placements).order != placements[4].order and len(best(placements).order) == 3
    assert 3 not in best(placements).order


def test_a_slow_link_is_routed_around_by_order():
    # Device 0 -> 1 is slow; 1 -> 0 is fast: the chain must be 1 then 0.
    fleet = _fleet(np.ones((2, 10)), cut=1e6)
    fleet.bandwidth[0, 1] = 1e5  # 10 s for a cut
    placed = place(fleet, 2)
    assert placed.order == [1, 0] and placed.bottleneck == pytest.approx(5.0, rel=1e-6)


def test_faster_device_gets_more_ops():
    fleet = _fleet(np.vstack([np.ones(30), np.full(30, 2.0)]))
    placed = place(fleet, 2)
    counts = np.diff(placed.plan.bounds)
    assert counts[placed.order.index(0)] == 20 and placed.bottleneck == pytest.approx(20.0)


def test_more_than_ten_devices_is_a_heuristic_that_says_so(caplog):
    rng = np.random.default_rng(0)
    fleet = _fleet(rng.uniform(1, 3, (12, 60)))
    placed = place(fleet, 4)
    assert not placed.exact and "heuristic" in caplog.text
    assert placed.bottleneck < fleet.compute.sum(axis=1).min() / 3


@pytest.mark.slow
def test_ten_devices_are_solved_exactly_in_reasonable_time():
    import time

    rng = np.random.default_rng(1)
    fleet = _fleet(rng.uniform(1, 3, (10, 150)) * rng.uniform(0.5, 4, (10, 1)),
                   bandwidth=rng.uniform(5e5, 5e6, (11, 11)), cut=1e5)
    started = time.perf_counter()
    placements = place_each(fleet)
    took = time.perf_counter() - started
    assert all(p is not None and p.exact for p in placements.values())
    assert took < 60, took  # generous: the machine is shared
    print(f"10 devices, 150 ops, every n = 1..10: {took:.1f} s")


def test_bad_counts_name_the_range():
    with pytest.raises(PlanError, match="between 1 and 2"):
        place(_fleet(np.ones((2, 5))), 3)
