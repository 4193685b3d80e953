"""The node (`defer serve`): real processes on loopback, port 0, readiness by the ready line. A
malformed frame or a wrong protocol version closes that connection only; SIGINT/SIGTERM drain
and exit 0; an empty node takes a pushed bundle; STATS counts what it did; startup failures
have their own exit codes.
"""

from __future__ import annotations

import signal
import socket
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.cli import main
from defer.local import start_node, stop_processes
from defer.runtime import protocol as p
from defer.runtime.dispatcher import Dispatcher


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory):
    model = residual_mlp()
    return model, compile_tiny(model, tmp_path_factory.mktemp("one"), n_stages=1)


@pytest.fixture(scope="module")
def node(one_stage):
    _, manifest = one_stage
    started = start_node(manifest.bundle_path(0))
    yield started
    stop_processes([started])


def _raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _samples(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(n)]


def test_ready_line_names_a_real_port(node):
    host, port = node.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with _raw_connection(node.address):
        pass


@pytest.mark.parametrize("garbage, reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40), "not a defer frame"),
    (struct.pack("<4sBBHQIIQ", b"DEFR", 9, 1, 0, 0, 0, 0, 0), "protocol version 9"),
    (p.encode(p.Ping(request_id=1)), "expected HELLO, got PING"),
], ids=["http", "future-version", "not-hello"])
def test_bad_first_frame_closes_that_connection_and_the_node_serves_on(node, one_stage,
                                                                     garbage, reason):
    model, manifest = one_stage
    with _raw_connection(node.address) as bad:
        bad.sendall(garbage)
        with _raw_connection(node.address) as idle:  # another connection, untouched
            assert _read_until_closed(bad) == b""
            idle.sendall(p.encode(p.Hello(role="upstream")))
            decoder = p.Decoder()
            decoder.feed(idle.recv(65536))
            assert isinstance(decoder.next(), p.Hello)
    xs = _samples(3)
    with Dispatcher(manifest, [node.address], timeout=10) as dispatcher:
        got = [dispatcher.infer(x)["y"] for x in xs]
    for out, want in zip(got, reference(model, [{"x": x} for x in xs])):
        assert np.array_equal(out, want["y"])
    assert reason in node.log_tail(200)


def test_malformed_frame_mid_session_is_logged_and_only_that_connection_closes(node,
                                                                             one_stage):
    _, manifest = one_stage
    with _raw_connection(node.address) as sock:
        sock.sendall(p.encode(p.Hello(role="dispatcher")))
        frame = bytearray(p.encode(p.Stats(request_id=5)))
        frame[40:44] = b"\xff\xfe\xfd\xfc"  # break the JSON metadata
        sock.sendall(bytes(frame))
        replies = p.Decoder()
        replies.feed(_read_until_closed(sock))
        assert isinstance(replies.next(), p.Hello)
    assert "metadata is not UTF-8 JSON" in node.log_tail(50)
    with Dispatcher(manifest, [node.address], timeout=10) as dispatcher:
        assert dispatcher.infer(_samples(1)[0])["y"].shape == (1, 16)


def test_stats_count_requests_bytes_and_compute(node, one_stage):
    _, manifest = one_stage
    with Dispatcher(manifest, [node.address], codec="lz4", timeout=10) as dispatcher:
        list(dispatcher.map(_samples(20)))
        stats = dispatcher.stats()
    (stage,) = stats["stages"]
    assert stage["requests"] == 20 and stage["errors"] == 0
    assert stage["ort_ms_per_inference"] > 0 and stage["cpu_s_per_inference"] > 0
    assert 0 < stage["busy_share"] <= 1 and stage["overhead_share"] == 1 - stage["busy_share"]
    assert [h["codec"] for h in stats["hops"]] == ["lz4", "lz4"]
    assert all(h["raw_bytes_per_inference"] == 64 for h in stats["hops"])
    assert stats["requests"] == 20 and stats["latency_ms"]["p50"] > 0
    assert "estimate" in stats["energy"]["note"]


def test_empty_node_takes_a_pushed_bundle(one_stage):
    model, manifest = one_stage
    empty = start_node()
    try:
        assert "bundle none yet" in empty.log_tail()
        xs = _samples(4, seed=1)
        with Dispatcher(manifest, [empty.address], timeout=10) as dispatcher:
            got = list(dispatcher.map(xs))
        for out, want in zip(got, reference(model, [{"x": x} for x in xs])):
            assert np.array_equal(out["y"], want["y"])
        assert "loaded bundle" in empty.log_tail()
    finally:
        stop_processes([empty])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_drain_and_exit_zero(one_stage, sig):
    _, manifest = one_stage
    started = start_node(manifest.bundle_path(0))
    with Dispatcher(manifest, [started.address], timeout=10) as dispatcher:
        dispatcher.infer(_samples(1)[0])
    started.process.send_signal(sig)
    assert started.process.wait(20) == 0
    assert "stopped: 1 requests served" in started.log_tail()
    stop_processes([started])


def test_shutdown_message_stops_the_node(one_stage):
    _, manifest = one_stage
    started = start_node(manifest.bundle_path(0))
    with Dispatcher(manifest, [started.address], timeout=10) as dispatcher:
        dispatcher.shutdown_nodes()
    assert started.process.wait(20) == 0
    stop_processes([started])


def test_serve_help_shows_defaults():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("--port", "default: 7000", "--threads", "--cpu", "127.0.0.1"):
        assert text in result.output


def test_port_in_use_is_a_startup_failure():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 3, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_unknown_core_is_a_usage_error():
    result = CliRunner().invoke(main, ["serve", "--port", "0", "--cpu", "4096"])
    assert result.exit_code == 2 and "--cpu 4096" in result.output


def test_unreadable_bundle_is_a_startup_failure(tmp_path):
    bad = tmp_path / "bundle_0.onnx"
    bad.write_bytes(b"not onnx")
    result = CliRunner().invoke(main, ["serve", "--port", "0", str(bad)])
    assert result.exit_code == 3 and "cannot load the bundle" in result.output


def test_an_ipv6_chain_serves_and_names_nodes_with_brackets(tmp_path):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path, n_stages=2)
    nodes = []
    try:
        nodes = [start_node(manifest.bundle_path(i), host="::1") for i in range(2)]
        assert all(n.address.startswith("[::1]:") for n in nodes)
        x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
        with Dispatcher(manifest, [n.address for n in nodes], timeout=20) as dispatcher:
            got = dispatcher.infer(x)["y"]
        assert np.array_equal(got, reference(model, [{"x": x}])[0]["y"])
    finally:
        stop_processes(nodes)


def test_http_health_and_prometheus_metrics(one_stage):
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    _, manifest = one_stage
    node = start_node(http_port=0)  # empty: not ready until the dispatcher pushes a bundle
    try:
        base = f"http://{node.http_address}"
        assert urllib.request.urlopen(f"{base}/health/live", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/health/ready", timeout=5)
        assert err.value.code == 503
        with Dispatcher(manifest, [node.address], timeout=10) as dispatcher:
            list(dispatcher.map(_samples(7)))
            ready = urllib.request.urlopen(f"{base}/health/ready", timeout=5)
            assert ready.status == 200
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        (requests,) = families["defer_stage_requests"].samples
        assert requests.value == 7 and requests.labels == {"stage": "0"}
        buckets = [s for s in families["defer_stage_compute_seconds"].samples
                   if s.name.endswith("_bucket")]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 7
        assert {s.labels["direction"] for s in families["defer_hop_bytes"].samples} == {"in",
                                                                                       "out"}
        assert families["defer_node_ready"].samples[0].value == 1
    finally:
        stop_processes([node])


def test_hello_carries_the_node_facts_and_a_clock(node):
    import asyncio

    from defer.runtime.channel import Channel

    async def hello():
        chan = await Channel.connect(node.address, 5.0)
        try:
            reply = await chan.handshake("dispatcher", None, 5.0)
        finally:
            await chan.close()
        return reply, chan

    reply, chan = asyncio.run(hello())
    facts = chan.peer_info
    assert facts["cores"] >= 1 and facts["engine"] == "onnx" and "onnx" in facts["engines"]
    assert facts["memory_available"] > 0 and facts["defer"]
    assert abs(chan.clock_offset) < 0.5  # same machine: the clocks agree; the estimate is near 0
    assert reply.bundle_sha256 is not None
