"""The dispatcher against three real `defer serve` processes on loopback: 200 requests through
`defer dispatch` match the whole model bit for bit (lossless codecs) or within the bound the
tolerance implies (zfp:<tol>), in input order; the window holds under a slow consumer; a wrong
bundle, an absent node or a silent node fail fast with an error naming the node.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import (
    compile_tiny,
    reference,
    residual_mlp,
    simulate_chain,
    two_in_two_out,
)

from defer.cli import main
from defer.errors import DeferTimeoutError, InputError, ManifestError, NodeError, UsageError
from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher

COUNT = 200


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path_factory.mktemp("residual"), cuts=("relu1", "mm2"))
    assert [t.name for t in manifest.stages[1].forward] == ["r1"]  # a pass-through tensor
    return model, manifest


@pytest.fixture(scope="module")
def chain(residual):
    """Three nodes: the first started with its bundle, the others empty (bundles pushed)."""
    _, manifest = residual
    nodes = []
    try:
        nodes.append(start_node(manifest.bundle_path(0)))
        nodes += [start_node(), start_node()]
        yield [n.address for n in nodes]
    finally:
        stop_processes(nodes)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, residual):
    model, _ = residual
    rng = np.random.default_rng(42)
    xs = rng.standard_normal((COUNT, 1, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("inputs") / "x.npz"
    np.savez(path, x=xs)
    return path, xs, np.stack([r["y"] for r in reference(model, [{"x": x} for x in xs])])


def _dispatch(manifest, chain, tmp_path, inputs_path, codec, inflight=6):
    out, report = tmp_path / f"y-{codec}.npz", tmp_path / f"r-{codec}.json"
    result = CliRunner().invoke(main, [
        "dispatch", "--manifest", str(manifest.path), "--nodes", ",".join(chain),
        "--input", str(inputs_path), "--codec", codec, "--inflight", str(inflight),
        "--output", str(out), "--report", str(report), "--timeout", "20"])
    assert result.exit_code == 0, result.output
    return np.load(out)["y"], json.loads(report.read_text()), result.output


@pytest.mark.parametrize("codec", ["raw", "lz4", "zfp", "zfp+lz4"])
def test_lossless_codecs_are_bit_exact_and_in_order(residual, chain, inputs, tmp_path, codec):
    _, manifest = residual
    path, _, want = inputs
    got, report, text = _dispatch(manifest, chain, tmp_path, path, codec)
    assert got.shape == want.shape == (COUNT, 1, 16)
    assert np.array_equal(got, want)  # every input is distinct: equality also proves order
    assert report["requests"] == COUNT and [h["codec"] for h in report["hops"]] == [codec] * 4
    for line in ("inferences/s", "p50", "p95", "p99", "bytes/inf", "busy", "overhead",
                 "CPU-s/inf", "assumed 5 W"):
        assert line in text


def _lipschitz_bound(model, tol: float) -> float:
    """|y error| bound of the 3-stage residual MLP (cuts after relu1 and mm2) when every hop
    adds at most `tol` per element and forwarded r1 keeps its hop-1 error (inf-norm)."""
    weights = {i.name: np.abs(np.frombuffer(i.raw_data, np.float32).reshape(i.dims))
               for i in model.graph.initializer}
    lip = {k: float(w.sum(axis=0).max()) for k, w in weights.items()}  # max column abs sum
    e_x = tol                                  # hop 0
    e_r1 = lip["w1"] * e_x + tol               # stage 0, then hop 1
    e_h2 = lip["w2"] * e_r1 + tol              # stage 1, then hop 2 (r1 forwarded as is)
    e_s = e_h2 + e_r1                          # stage 2: relu(h2) + r1
    return (lip["w3"] + 1) * e_s + tol         # relu(s W3) + s, then hop 3


def test_fixed_accuracy_stays_within_the_implied_bound(residual, chain, inputs, tmp_path):
    model, manifest = residual
    path, xs, want = inputs
    tol = 1e-3
    got, report, _ = _dispatch(manifest, chain, tmp_path, path, f"zfp:{tol}")
    bound = _lipschitz_bound(model, tol)
    assert np.max(np.abs(got - want)) <= bound * (1 + 1e-5)
    assert not np.array_equal(got, want)  # it really was lossy
    for x, y in zip(xs[:20], got[:20]):  # and exactly what the codec does hop by hop
        assert np.array_equal(y, simulate_chain(manifest, {"x": x}, f"zfp:{tol}")["y"])
    assert report["hops"][1]["codec"] == "zfp:0.001"


def test_slow_consumer_holds_the_window(residual, chain):
    _, manifest = residual
    pulled = 0

    def source():
        nonlocal pulled
        rng = np.random.default_rng(7)
        for _ in range(40):
            pulled += 1
            yield rng.standard_normal((1, 16)).astype(np.float32)

    with Dispatcher(manifest, chain, inflight=4, timeout=20) as dispatcher:
        taken = 0
        for _ in dispatcher.map(source()):
            taken += 1
            assert dispatcher.in_flight <= 4
            assert pulled - taken <= 4  # inputs are read only as results are taken
            time.sleep(0.005)  # a slow consumer; the assertions are on counts, not time
        assert taken == 40 and dispatcher.max_in_flight == 4 and dispatcher.in_flight == 0
        queued = max(s["queue_max"] for s in dispatcher.stats()["stages"])
        assert queued <= 4


def test_default_window_keeps_every_stage_busy(residual, chain):
    _, manifest = residual
    with Dispatcher(manifest, chain, timeout=20) as dispatcher:
        assert dispatcher.inflight >= 2 * len(manifest.stages)


def test_inputs_are_validated_with_the_fix(residual, chain):
    _, manifest = residual
    x = np.zeros((1, 16), np.float32)
    with Dispatcher(manifest, chain, timeout=20) as dispatcher:
        with pytest.raises(InputError, match=r"astype\('float32'\)"):
            dispatcher.infer(x.astype(np.float64))
        with pytest.raises(InputError, match="reshape"):
            dispatcher.infer(np.zeros((1, 15), np.float32))
        with pytest.raises(InputError, match=r"missing \['x'\], unexpected \['z'\]"):
            dispatcher.infer({"z": x})
        assert dispatcher.infer({"x": x})["y"].shape == (1, 16)


def test_a_node_serving_another_bundle_is_named(residual, chain, tmp_path):
    other = compile_tiny(two_in_two_out(), tmp_path / "other")
    start = time.monotonic()
    with pytest.raises(ManifestError, match=f"node {chain[0]} serves bundle") as err:
        Dispatcher(other, chain, timeout=20)
    assert "defer serve" in str(err.value) and time.monotonic() - start < 10


def test_an_absent_node_is_named_before_any_inference(residual, chain):
    _, manifest = residual
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        absent = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(NodeError, match=f"node {absent} is not reachable") as err:
        Dispatcher(manifest, [chain[0], chain[1], absent], timeout=20)
    assert err.value.node == absent


def test_a_silent_node_times_out_naming_it(residual, chain):
    _, manifest = residual
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        accepted = []
        thread = threading.Thread(target=lambda: accepted.append(silent.accept()))
        thread.start()
        start = time.monotonic()
        with pytest.raises(DeferTimeoutError, match=f"node {address} did not answer"):
            Dispatcher(manifest, [chain[0], address, chain[2]], timeout=1.0)
        assert time.monotonic() - start < 5
        thread.join(5)
        for conn, _ in accepted:
            conn.close()


def test_wrong_node_count_and_bad_address_are_usage_errors(residual, chain):
    _, manifest = residual
    with pytest.raises(UsageError, match="3 stages but 2 nodes"):
        Dispatcher(manifest, chain[:2])
    with pytest.raises(UsageError, match="expected host:port"):
        Dispatcher(manifest, [chain[0], chain[1], "nowhere"], timeout=5)


def test_two_inputs_two_outputs_with_forwarding(tmp_path):
    model = two_in_two_out()
    manifest = compile_tiny(model, tmp_path / "io", n_stages=3)
    rng = np.random.default_rng(3)
    samples = [{"a": rng.standard_normal((1, 8)).astype(np.float32),
                "b": rng.integers(0, 9, (1, 8)).astype(np.int64)} for _ in range(30)]
    nodes = [start_node() for _ in range(3)]
    try:
        with Dispatcher(manifest, [n.address for n in nodes], codec="zfp:0.5",
                        timeout=20) as dispatcher:
            got = list(dispatcher.map(samples))
    finally:
        stop_processes(nodes)
    w = np.abs(np.frombuffer(model.graph.initializer[0].raw_data, np.float32).reshape(8, 8))
    bound = w.sum(axis=0).max() * 0.5 + 3 * 0.5  # a's hop-0 error through W, <= 3 lossy hops
    for out, want in zip(got, reference(model, samples)):
        assert np.array_equal(out["count"], want["count"])  # integers never go lossy
        assert np.max(np.abs(out["sum"] - want["sum"])) <= bound * (1 + 1e-5)


def test_dispatch_help_shows_every_option_with_help():
    result = CliRunner().invoke(main, ["dispatch", "--help"])
    assert result.exit_code == 0
    for option in ("--manifest", "--nodes", "--input", "--count", "--inflight", "--codec",
                   "--output", "--report", "--timeout", "default: 30.0", "--spares", "--token",
                   "DEFER_TOKEN", "--tls-ca", "--heartbeat"):
        assert option in result.output


def test_dispatch_random_inputs_and_unreachable_node_exit_codes(residual, chain, tmp_path):
    _, manifest = residual
    result = CliRunner().invoke(main, ["dispatch", "--manifest", str(manifest.path), "--nodes",
                                       ",".join(chain), "--count", "5"])
    assert result.exit_code == 0 and "5 inferences" in result.output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        absent = f"127.0.0.1:{probe.getsockname()[1]}"
    result = CliRunner().invoke(main, ["dispatch", "--manifest", str(manifest.path), "--nodes",
                                       f"{absent},{chain[1]},{chain[2]}", "--count", "5"])
    assert result.exit_code == 1 and absent in result.output


class _BlackHoleNode:
    """A fake node that completes HELLO/CONFIGURE/STATS/PING like a real one but never answers
    INFER: the dispatcher must time out naming it, not hang."""

    def __init__(self, sha256: str):
        from defer.runtime import protocol as p

        self.p, self.sha256 = p, sha256
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._serve) for _ in range(2)]
        for thread in self.threads:  # the dispatcher's connection and the upstream node's
            thread.start()

    def _serve(self) -> None:
        p = self.p
        try:
            conn, _ = self.server.accept()
        except OSError:  # closed before anyone came
            return
        decoder = p.Decoder()
        with conn:
            while data := conn.recv(65536):
                decoder.feed(data)
                while (msg := decoder.next()) is not None:
                    reply = {p.Hello: lambda m: p.Hello(bundle_sha256=self.sha256),
                             p.Configure: lambda m: p.Ack(request_id=m.request_id, what="c"),
                             p.Stats: lambda m: p.Stats(request_id=m.request_id, counters={}),
                             p.Ping: lambda m: p.Pong(request_id=m.request_id) if m.request_id
                             else None}.get(type(msg), lambda m: None)(msg)
                    if reply is not None:
                        conn.sendall(p.encode(reply))

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for thread in self.threads:
            thread.join(10)


def test_a_node_that_swallows_requests_times_out_naming_it(residual, chain):
    _, manifest = residual
    fake = _BlackHoleNode(manifest.stages[2].sha256)
    try:
        with Dispatcher(manifest, [chain[0], chain[1], fake.address], timeout=1.0) as dispatcher:
            start = time.monotonic()
            with pytest.raises(DeferTimeoutError, match=f"last node {fake.address}") as err:
                dispatcher.infer(np.zeros((1, 16), np.float32))
            assert err.value.node == fake.address and time.monotonic() - start < 10
    finally:
        fake.close()


def test_a_node_dying_mid_stream_fails_fast_naming_it(residual):
    _, manifest = residual
    nodes = [start_node(manifest.bundle_path(i)) for i in range(3)]
    try:
        samples = (np.full((1, 16), i, np.float32) for i in range(10_000))
        with Dispatcher(manifest, [n.address for n in nodes], timeout=20) as dispatcher:
            start = time.monotonic()
            with pytest.raises(NodeError, match=nodes[1].address):
                for i, _ in enumerate(dispatcher.map(samples)):
                    if i == 20:
                        nodes[1].process.kill()
            assert time.monotonic() - start < 15
    finally:
        stop_processes(nodes)


# --- bad input, corrupt bundle, hash mismatch: a clear error each, exit code 2 -----------------

def _cli_dispatch(manifest_path, nodes, *extra):
    return CliRunner().invoke(main, ["dispatch", "--manifest", str(manifest_path), "--nodes",
                                     ",".join(nodes), "--timeout", "10", *extra])


@pytest.mark.parametrize("array, match", [
    (np.zeros((2, 1, 15), np.float32), "shape"),
    (np.zeros((2, 1, 16), np.float64), r"float64, the model wants float32: pass x.astype"),
])
def test_a_wrong_input_file_exits_2_before_connecting(residual, tmp_path, array, match):
    _, manifest = residual
    path = tmp_path / "x.npy"
    np.save(path, array)
    result = _cli_dispatch(manifest.path, ["127.0.0.1:1"] * 3, "--input", str(path))
    assert result.exit_code == 2, result.output
    assert re.search(match, result.output) and "not reachable" not in result.output


def test_corrupt_bundles_and_hash_mismatches_exit_2(residual, chain, tmp_path):
    _, manifest = residual
    copy = tmp_path / "copy"
    shutil.copytree(manifest.path.parent, copy)
    bundle = copy / manifest.stages[0].file
    bundle.write_bytes(bundle.read_bytes()[:-10])  # corrupt, manifest unchanged
    empty = start_node()
    try:
        result = _cli_dispatch(copy, [empty.address, chain[1], chain[2]], "--count", "1")
        assert result.exit_code == 2, result.output
        assert "corrupt or from another compile" in result.output
        # the same corrupt bytes with a manifest that vouches for them: the node refuses them
        data = json.loads((copy / "manifest.json").read_text())
        data["stages"][0]["sha256"] = hashlib.sha256(bundle.read_bytes()).hexdigest()
        (copy / "manifest.json").write_text(json.dumps(data))
        result = _cli_dispatch(copy, [empty.address, chain[1], chain[2]], "--count", "1")
        assert result.exit_code == 2, result.output
        assert "refused LOAD" in result.output and "cannot load the bundle" in result.output
    finally:
        stop_processes([empty])
    # a node that serves another bundle than the manifest lists
    result = _cli_dispatch(manifest.path, [chain[2], chain[0], chain[1]], "--count", "1")
    assert result.exit_code == 2 and "serves bundle" in result.output, result.output


def test_dispatch_prints_and_keeps_measured_beside_predicted_for_inspect(residual, chain, inputs,
                                                                         tmp_path):
    _, manifest = residual
    _, report, output = _dispatch(manifest, chain, tmp_path, inputs[0], "raw")
    assert f"predicted {manifest.plan['throughput']:.2f} inf/s, measured" in output
    shown = CliRunner().invoke(main, ["inspect", str(manifest.path.parent)])
    assert shown.exit_code == 0, shown.output
    assert f"measured {report['throughput']:.2f} inf/s" in shown.output
    assert "by `defer dispatch`" in shown.output
