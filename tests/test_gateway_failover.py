"""Two chains behind one gateway, real processes on loopback: 8 concurrent clients stream 600
distinct requests; a node of chain 1 is killed -9 mid-stream (stopped first until requests
are stuck in chain 1, so some are surely pending), with no spares. Every request
gets exactly one answer, equal to the whole model's; chain 1's pending requests are replayed
on chain 0 (metrics say how many). The node comes back at its address and the probe makes
chain 1 rejoin. With every chain down the gateway answers 503 / UNAVAILABLE."""
from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.local import start_gateway, start_node, stop_processes

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

COUNT, CLIENTS, KILL_AT = 600, 8, 150


@pytest.fixture
def two_chains(tmp_path):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path / "bundles", n_stages=2)
    nodes, gateway = [], None
    try:
        nodes = [start_node(manifest.bundle_path(i % 2)) for i in range(4)]
        chains = [[nodes[0].address, nodes[1].address], [nodes[2].address, nodes[3].address]]
        gateway = start_gateway(manifest.path, chains, args=("--probe-interval", "0.2"))
        yield model, manifest, nodes, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        stop_processes(nodes)


def _infer(client, x: np.ndarray) -> tuple[np.ndarray, int]:
    tensor = tritonhttp.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("whole", [tensor])
    return result.as_numpy("y"), result.get_response()["parameters"]["defer_chain"]


def _metrics(gateway) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://{gateway.metrics}/metrics") as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_kill_9_in_one_chain_every_request_answered_once_then_it_rejoins(two_chains):
    model, manifest, nodes, gateway = two_chains
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(COUNT)]
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    answers: list[list] = [[] for _ in range(COUNT)]
    errors: list[BaseException] = []
    next_index, lock, killed = iter(range(COUNT)), threading.Lock(), threading.Event()
    answered = 0

    def client_loop() -> None:
        nonlocal answered
        client = tritonhttp.InferenceServerClient(gateway.http)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                answers[i].append(_infer(client, xs[i]))
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)
            with lock:
                answered += 1
                if answered == KILL_AT:
                    kill_now.set()

    def killer() -> None:
        # A tiny model answers in ~1 ms, so chain 1 is often empty at any given instant: stop
        # its last node first, wait until requests are stuck in chain 1, then kill -9 it.
        kill_now.wait(60)
        nodes[3].process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _metric(
                _metrics(gateway), "defer_chain_requests_in_flight", chain="1") < 1:
            pass
        nodes[3].process.kill()  # chain 1's last stage; no spare anywhere
        killed.set()

    kill_now = threading.Event()
    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=killer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert killed.is_set() and not errors, errors[:3]
    for i, got in enumerate(answers):
        assert len(got) == 1, f"request {i} got {len(got)} answers"
        assert np.array_equal(got[0][0], want[i]), f"request {i} differs from the whole model"
    chains = [got[0][1] for got in answers]
    assert 0 < chains.count(1) < COUNT and chains.count(0) > COUNT // 2

    values = _metrics(gateway)
    assert _metric(values, "defer_requests_total", protocol="http", outcome="ok") == COUNT
    assert _metric(values, "defer_failovers_total", chain="1") == 1
    assert _metric(values, "defer_failovers_total", chain="0") == 0
    replays = _metric(values, "defer_replays_total", chain="1")
    assert replays >= 1  # chain 1 had requests in flight when its node died
    assert _metric(values, "defer_chain_state", chain="1", defer_chain_state="failed") == 1
    ok = sum(_metric(values, "defer_chain_requests_total", chain=c, outcome="ok")
             for c in ("0", "1"))
    assert ok == COUNT  # each request answered by exactly one chain
    print(f"{COUNT} requests, {CLIENTS} clients, kill -9 of chain 1's node at answer {KILL_AT}:"
          f" {int(replays)} replayed on chain 0, {chains.count(1)} answered by chain 1")

    # the node comes back at its own address: a probe rewires chain 1 and it takes requests
    port = int(nodes[3].address.rsplit(":", 1)[1])
    nodes[3] = start_node(manifest.bundle_path(1), port=port)
    client = tritonhttp.InferenceServerClient(gateway.http)
    deadline, served_by = time.monotonic() + 30, set()
    while 1 not in served_by and time.monotonic() < deadline:
        y, chain = _infer(client, xs[0])
        assert np.array_equal(y, want[0])
        served_by.add(chain)
    assert 1 in served_by, f"chain 1 did not rejoin within 30 s:\n{gateway.log_tail()}"
    values = _metrics(gateway)
    assert _metric(values, "defer_chain_rejoins_total", chain="1") == 1

    # every chain down: not ready, and requests get 503 at once
    for node in (nodes[0], nodes[3]):
        node.process.kill()
        node.process.wait()
    deadline = time.monotonic() + 10
    status = None
    while status != 503 and time.monotonic() < deadline:
        try:
            _infer(client, xs[0])
        except InferenceServerException as err:
            status = int(err.status())
    assert status == 503
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{gateway.http}/v2/health/ready")
    assert err.value.code == 503


def test_a_chains_own_spare_takes_over_in_place(tmp_path):
    """--spares: chain 0 has a spare (an empty node); kill -9 of its last node makes its
    Dispatcher push the bundle to the spare and replay: no request fails or leaves the chain."""
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path / "bundles", n_stages=2)
    xs = [np.full((1, 16), i / 10, np.float32) for i in range(30)]
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    nodes, gateway = [], None
    try:
        nodes = [start_node(manifest.bundle_path(0)), start_node(manifest.bundle_path(1)),
                 start_node()]
        gateway = start_gateway(manifest.path, [[nodes[0].address, nodes[1].address]],
                                args=("--spares", nodes[2].address, "--name", "whole"))
        client = tritonhttp.InferenceServerClient(gateway.http)
        for i in range(10):
            assert np.array_equal(_infer(client, xs[i])[0], want[i])
        nodes[1].process.kill()
        for i in range(10, 30):
            y, chain = _infer(client, xs[i])
            assert np.array_equal(y, want[i]) and chain == 0
        values = _metrics(gateway)
        assert _metric(values, "defer_chain_recoveries_total", chain="0") == 1
        assert _metric(values, "defer_failovers_total", chain="0") == 0
        assert _metric(values, "defer_chain_state", chain="0", defer_chain_state="running") == 1
    finally:
        if gateway is not None:
            gateway.stop()
        stop_processes(nodes)
