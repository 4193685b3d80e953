"""Failure detection and failover with replay, with real node processes on loopback: a 4-node
chain loses its middle node (kill -9, or SIGSTOP = hung) mid-stream; with a spare every result
still arrives once, equal to the whole model; without one every pending request fails within 5
s naming the node, and the same dispatcher goes on once the node is back.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections import deque

import numpy as np
import pytest
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.errors import NodeError
from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher

COUNT = 500


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path_factory.mktemp("four"), n_stages=4)
    assert len(manifest.stages) == 4
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(COUNT)]
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    return manifest, xs, want


@pytest.fixture
def chain(four):
    manifest, _, _ = four
    nodes = []
    try:
        nodes += [start_node(manifest.bundle_path(i)) for i in range(4)]
        nodes.append(start_node())  # an idle spare: the dispatcher pushes it a bundle
        yield nodes
    finally:
        stop_processes(nodes)


def _stream_and_break(dispatcher, xs, at, breaker):
    got, broken_at = [], None
    for i, out in enumerate(dispatcher.map(xs)):
        if i == at:
            breaker()
            broken_at = time.perf_counter()
        got.append(out["y"])
    return got, broken_at


def _check_exactly_once(dispatcher, got, want):
    assert len(got) == len(want)
    for i, (out, ref) in enumerate(zip(got, want)):  # inputs are distinct: equal = in order
        assert np.array_equal(out, ref), f"result {i} differs from the reference"
    assert dispatcher.completed == len(want)  # first results only: nothing answered twice
    assert dispatcher.pending == 0


def test_kill_9_of_the_middle_node_loses_nothing_with_a_spare(four, chain, record_property):
    manifest, xs, want = four
    *nodes, spare = chain
    start = time.perf_counter()
    with Dispatcher(manifest, [n.address for n in nodes], spares=[spare.address],
                    timeout=20) as dispatcher:
        got, killed_at = _stream_and_break(dispatcher, xs, 100, nodes[1].process.kill)
        elapsed = time.perf_counter() - start
        stats = dispatcher.stats()
    _check_exactly_once(dispatcher, got, want)
    (recovery,) = dispatcher.recoveries
    assert recovery["lost"] == nodes[1].address and recovery["by"] == spare.address
    assert dispatcher.nodes[1] == spare.address and dispatcher.state == "closed"
    assert stats["stages"][1]["requests"] > 0  # the spare really served stage 1
    detect = recovery["detected_at"] - killed_at
    record_property("recovery_s", recovery["seconds"])
    record_property("detect_s", detect)
    print(f"kill -9 stage 1 of 4 at result 100/{COUNT}: detected after <= {max(detect, 0):.3f} s,"
          f" rewired + replayed {recovery['replayed']} requests in {recovery['seconds']:.3f} s;"
          f" {dispatcher.dropped_results} late/duplicate results dropped; whole stream "
          f"{elapsed:.2f} s")
    assert recovery["seconds"] < 5


def test_a_hung_node_is_noticed_within_2_s_and_replaced(four, chain, record_property):
    manifest, xs, want = four
    *nodes, spare = chain
    hang = lambda: nodes[2].process.send_signal(signal.SIGSTOP)  # noqa: E731
    try:
        with Dispatcher(manifest, [n.address for n in nodes], spares=[spare.address],
                        timeout=20) as dispatcher:
            got, stopped_at = _stream_and_break(dispatcher, xs[:200], 50, hang)
    finally:
        nodes[2].process.send_signal(signal.SIGCONT)
    _check_exactly_once(dispatcher, got, want[:200])
    (recovery,) = dispatcher.recoveries
    detect = recovery["detected_at"] - stopped_at
    record_property("hang_detect_s", detect)
    print(f"SIGSTOP of stage 2: noticed after {detect:.3f} s ({recovery['reason']}), recovered "
          f"in {recovery['seconds']:.3f} s")
    assert recovery["lost"] == nodes[2].address and "silent" in recovery["reason"]
    assert detect < 2.0


def test_without_a_spare_pending_requests_fail_fast_and_the_node_can_come_back(four, chain):
    manifest, xs, want = four
    *nodes, _ = chain
    dead = nodes[1].address
    with Dispatcher(manifest, [n.address for n in nodes], timeout=20) as dispatcher:
        outstanding: deque = deque()
        killed_at = None
        with pytest.raises(NodeError, match=dead):
            for i, x in enumerate(xs):
                outstanding.append(dispatcher.submit(x))
                if i == 60:
                    nodes[1].process.kill()
                    killed_at = time.perf_counter()
                if len(outstanding) == 8:
                    dispatcher.wait(outstanding.popleft())
        _, late = concurrent.futures.wait(outstanding, timeout=5)
        took = time.perf_counter() - killed_at
        assert not late and took < 5, f"{len(late)} requests still pending after {took:.1f} s"
        failed = [f.exception() for f in outstanding if f.exception() is not None]
        assert failed and all(dead in str(err) and err.node == dead for err in failed)
        print(f"no spare: {len(failed) + 1} pending requests failed within {took:.3f} s "
              f"of kill -9, naming {dead}")
        with pytest.raises(NodeError, match=f"{dead}.*not reachable"):
            dispatcher.infer(xs[0])  # still down: fails at once, names it
        port = int(dead.rsplit(":", 1)[1])
        nodes[1] = chain[1] = start_node(port=port)  # back, empty: gets its bundle pushed
        got = [dispatcher.infer(x)["y"] for x in xs[:20]]
        assert all(np.array_equal(g, w) for g, w in zip(got, want[:20]))
        assert dispatcher.state == "running" and dispatcher.nodes[1] == dead
