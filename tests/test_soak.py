"""Soak: 5,000 requests through 4 real node processes after a warm-up. None lost, none duplicated
(every node computed exactly 5,000, the dispatcher took exactly 5,000 first results, each equal
to the whole model), and each node's RSS grows by less than 10% from the end of the warm-up to
the end of the run (psutil).
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher

WARMUP, COUNT = 500, 5000


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    model = residual_mlp()
    return model, compile_tiny(model, tmp_path_factory.mktemp("soak"), n_stages=4)


def _rss(nodes) -> list[int]:
    return [psutil.Process(n.process.pid).memory_info().rss for n in nodes]


@pytest.mark.slow
def test_soak_5000_requests_none_lost_none_duplicated_memory_flat(four, record_property):
    model, manifest = four
    rng = np.random.default_rng(9)
    xs = rng.standard_normal((WARMUP + COUNT, 1, 16)).astype(np.float32)
    want = np.stack([r["y"] for r in reference(model, [{"x": x} for x in xs[WARMUP:]])])
    nodes = [start_node(manifest.bundle_path(i)) for i in range(4)]
    try:
        with Dispatcher(manifest, [n.address for n in nodes], timeout=20) as dispatcher:
            list(dispatcher.map(xs[:WARMUP]))
            dispatcher.reset_stats()
            before = _rss(nodes)
            start = time.perf_counter()
            got = np.stack([o["y"] for o in dispatcher.map(xs[WARMUP:])])
            took = time.perf_counter() - start
            after = _rss(nodes)
            stats = dispatcher.stats()
    finally:
        stop_processes(nodes)
    assert np.array_equal(got, want)  # all 5,000, in order, each equal to the reference
    assert stats["requests"] == COUNT and dispatcher.dropped_results == 0
    assert [s["requests"] for s in stats["stages"]] == [COUNT] * 4
    assert [s["errors"] for s in stats["stages"]] == [0] * 4
    growth = [a / b - 1 for a, b in zip(after, before)]
    record_property("soak_rss_growth", max(growth))
    record_property("soak_throughput", COUNT / took)
    print(f"soak: {COUNT} requests through 4 nodes in {took:.1f} s ({COUNT / took:.0f}/s); "
          "node RSS after warm-up -> end (MB): " + ", ".join(
              f"{b / 2**20:.1f} -> {a / 2**20:.1f} ({g:+.1%})"
              for b, a, g in zip(before, after, growth)))
    assert max(growth) < 0.10
