"""Traces: three real `defer serve` nodes on loopback and a Dispatcher with a tracer (and
`defer dispatch --trace`). The file is trace-event JSON (checked against the format), every
request has receive, queue, compute and send on every stage and a slice on every link, the
outputs still equal the whole model bit for bit, and without a tracer the nodes add nothing.
In memory: node times are converted with each node's HELLO offset, and slices that would
overlap on a thread are clamped."""

from __future__ import annotations

import types

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import compile_tiny, reference, residual_mlp
from trace_helpers import check_trace_events, load_trace

from defer.cli import main
from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher
from defer.runtime.protocol import Result, Span
from defer.runtime.supervisor import Request, Supervisor
from defer.runtime.trace import PHASE_THREADS, RequestTrace, TraceFile

COUNT = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path_factory.mktemp("trace"), n_stages=3)
    nodes = []
    try:
        nodes = [start_node(manifest.bundle_path(i)) for i in range(3)]
        yield model, manifest, [n.address for n in nodes]
    finally:
        stop_processes(nodes)


def _requests(by_phase: dict, pid_base: int = 10_000) -> dict[int, dict]:
    """request id -> what the trace shows of it: {(kind, pid, tid)} of every slice."""
    seen: dict[int, set] = {}
    for event in by_phase["X"] + by_phase["b"]:
        kind = "X" if event["ph"] == "X" else event["cat"]
        seen.setdefault(event["args"]["request"], set()).add(
            (kind, event["pid"] - pid_base, event["tid"]))
    return seen


def _assert_complete(seen: set, n_stages: int) -> None:
    assert ("request", 0, 0) in seen
    for k in range(n_stages + 1):
        assert ("link", 1 + 2 * k, 0) in seen, f"no slice on the link into stage {k}"
    for k in range(n_stages):
        for phase, tid in PHASE_THREADS.items():
            assert ("X", 2 + 2 * k, tid) in seen, f"no {phase} slice on stage {k}"
        assert ("queue", 2 + 2 * k, 0) in seen, f"no queue slice on stage {k}"


def test_every_request_has_a_span_on_every_stage(served, tmp_path):
    model, manifest, chain = served
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(COUNT)]
    trace = TraceFile(tmp_path / "trace.json")
    with Dispatcher(manifest, chain, inflight=4, tracer=trace.chain()) as dispatcher:
        got = [out["y"] for out in dispatcher.map(xs)]
    trace.close()
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))

    by_phase = check_trace_events(load_trace(tmp_path / "trace.json"))
    names = {e["pid"]: e["args"]["name"] for e in by_phase["M"] if e["name"] == "process_name"}
    assert names[10_000] == "dispatcher" and names[10_002] == f"stage 0  {chain[0]}"
    assert names[10_007] == "link stage 2 -> dispatcher"
    requests = _requests(by_phase)
    assert len(requests) == COUNT
    for seen in requests.values():
        _assert_complete(seen, 3)
    compute = [e for e in by_phase["X"] if e["tid"] == PHASE_THREADS["compute"]]
    assert all(e["args"]["engine_ms"] > 0 for e in compute)

    # Off again: the same nodes, reconfigured without tracing, add no spans.
    with Dispatcher(manifest, chain) as dispatcher:
        result = dispatcher.submit(xs[0]).result(10)
        assert isinstance(result, Result) and result.spans is None


def test_dispatch_cli_writes_a_trace(served, tmp_path):
    _, manifest, chain = served
    path = tmp_path / "cli.json"
    result = CliRunner().invoke(main, ["dispatch", "--manifest", str(manifest.path), "--nodes",
                                       ",".join(chain), "--count", "5", "--trace", str(path)])
    assert result.exit_code == 0, result.output
    assert f"trace: {path}" in result.output
    assert "infer done in" in result.output and "wire done in" in result.output  # progress
    events = load_trace(path)
    assert events[-1]["name"] == "trace_end"  # closed: a complete JSON array
    requests = _requests(check_trace_events(events))
    assert len(requests) == 5 and all(_assert_complete(s, 3) is None for s in requests.values())


def test_node_times_are_converted_with_each_nodes_offset():
    """Node k's clock runs k+1 seconds ahead: the tracer hears every span in our clock."""
    heard = []
    supervisor = Supervisor([], tracer=heard.append)
    channels = [types.SimpleNamespace(clock_offset=k + 1.0, frame_began=100.25) for k in range(2)]
    supervisor.chain = types.SimpleNamespace(
        links=[types.SimpleNamespace(channel=c) for c in channels], addresses=["a:1", "b:2"])
    request = Request(None)
    request.sent = 99.0
    spans = tuple(Span(k, 100.0 + k + 1, 100.1 + k + 1, 100.2 + k + 1, 100.3 + k + 1,
                       100.4 + k + 1, 0.01, 0.05, 0.02) for k in range(2))
    supervisor._trace(1, request, Result(request_id=7, spans=spans))
    (trace,) = heard
    assert isinstance(trace, RequestTrace) and trace.request_id == 7 and trace.sent == 99.0
    assert trace.nodes == ("a:1", "b:2") and trace.arrived == 100.25
    for k, span in enumerate(trace.spans):
        assert span.stage == k and span.engine_s == 0.05
        assert [round(t, 6) for t in span[1:6]] == [100.0, 100.1, 100.2, 100.3, 100.4]


def test_slices_on_a_thread_never_overlap_and_an_open_file_parses(tmp_path):
    trace = TraceFile(tmp_path / "t.json")
    first = trace.complete(5, 1, "req 1", 10.0, 30.0)
    second = trace.complete(5, 1, "req 2", 25.0, 40.0)  # a clock estimate made it overlap
    third = trace.complete(5, 1, "req 3", 35.0, 38.0)  # ends before the previous one did
    assert second[0]["ts"] == 30.0 and second[0]["dur"] == 10.0
    assert third[0]["ts"] == 40.0 and third[0]["dur"] == 0.0
    trace.write(trace.process(5, "stage 0") + first + second + third
                + trace.async_span(5, "queue", "req 1", 3.0, 1.0))  # end clamped to begin
    by_phase = check_trace_events(load_trace(tmp_path / "t.json"))  # still open: no `]`
    assert len(by_phase["X"]) == 3 and by_phase["e"][0]["ts"] == 3.0
    trace.close()
    assert load_trace(tmp_path / "t.json")[-1]["name"] == "trace_end"


def test_a_trace_draws_as_a_gantt_chart(served, tmp_path):
    """What the README's picture is drawn with: a row per node phase and link, every request."""
    pytest.importorskip("matplotlib")
    from benchmarks.trace import gantt_rows, render_gantt

    _, manifest, chain = served
    trace = TraceFile(tmp_path / "t.json")
    with Dispatcher(manifest, chain, tracer=trace.chain()) as dispatcher:
        list(dispatcher.map([np.zeros((1, 16), np.float32)] * 4))
    trace.close()
    labels, bars = gantt_rows(load_trace(tmp_path / "t.json"))
    assert labels[:3] == ["dispatcher request", "link dispatcher -> stage 0", "stage 0 receive"]
    assert len(labels) == 1 + 4 * 3 + 4 and all(len(bars[label]) == 4 for label in labels)
    render_gantt(tmp_path / "t.json", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
