"""`defer gateway` against the stock clients, with real processes on loopback: 2 `defer serve`
nodes (one chain) and the gateway, every port 0, started on their ready lines. tritonclient's
HTTP and gRPC clients see the manifest's inputs and outputs in the model metadata, get 200
inferences each that equal the whole model bit for bit (raw codec), and get the protocol's
error for a wrong shape; a plain HTTP JSON request (the README's curl) works too; the metrics
endpoint parses with prometheus_client's parser; the trace is trace-event JSON with the nodes'
spans."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from runtime_helpers import compile_tiny, reference, residual_mlp
from trace_helpers import check_trace_events, load_trace

from defer.local import start_gateway, start_node, stop_processes

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

COUNT = 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    model = residual_mlp()
    manifest = compile_tiny(model, tmp / "bundles", n_stages=2)
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(COUNT)]
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    nodes, gateway = [], None
    try:
        nodes = [start_node(manifest.bundle_path(i)) for i in range(2)]
        gateway = start_gateway(manifest.path, [[n.address for n in nodes]],
                                args=("--name", "mlp", "--trace", str(tmp / "trace.json")))
        yield manifest, gateway, xs, want, tmp / "trace.json"
    finally:
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log_tail()
        stop_processes(nodes)


def _metadata_matches(meta: dict, manifest) -> None:
    for got, specs in ((meta["inputs"], manifest.inputs), (meta["outputs"], manifest.outputs)):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got] == \
            [(s.name, "FP32", list(s.shape)) for s in specs]


def test_tritonclient_http(served):
    manifest, gateway, xs, want, _ = served
    client = tritonhttp.InferenceServerClient(gateway.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    _metadata_matches(client.get_model_metadata("mlp"), manifest)
    for i, (x, y) in enumerate(zip(xs, want)):
        binary = i % 2 == 0  # binary tensor data extension, and plain JSON
        tensor = tritonhttp.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("mlp", [tensor], outputs=[
            tritonhttp.InferRequestedOutput("y", binary_data=binary)])
        assert np.array_equal(result.as_numpy("y"), y), f"request {i} differs"
    bad = tritonhttp.InferInput("x", [1, 15], "FP32")
    bad.set_data_from_numpy(xs[0][:, :15])
    with pytest.raises(InferenceServerException, match="shape") as err:
        client.infer("mlp", [bad])
    assert err.value.status() == "400"
    wrong_type = tritonhttp.InferInput("x", [1, 16], "FP64")
    wrong_type.set_data_from_numpy(xs[0].astype(np.float64))
    with pytest.raises(InferenceServerException, match="float64") as err:
        client.infer("mlp", [wrong_type])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("resnet")
    assert err.value.status() == "404"


def test_tritonclient_grpc(served):
    manifest, gateway, xs, want, _ = served
    client = tritongrpc.InferenceServerClient(gateway.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    _metadata_matches(client.get_model_metadata("mlp", as_json=True), manifest)
    for i, (x, y) in enumerate(zip(xs, want)):
        tensor = tritongrpc.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor])
        assert np.array_equal(result.as_numpy("y"), y), f"request {i} differs"
    bad = tritongrpc.InferInput("x", [1, 15], "FP32")
    bad.set_data_from_numpy(xs[0][:, :15])
    with pytest.raises(InferenceServerException, match="shape") as err:
        client.infer("mlp", [bad])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_plain_http_json_like_curl(served):
    _, gateway, xs, want, _ = served
    url = f"http://{gateway.http}/v2/models/mlp/infer"
    status, body = _post(url, {"id": "42", "inputs": [
        {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": xs[0].tolist()}]})
    assert status == 200 and body["id"] == "42" and body["model_name"] == "mlp"
    (output,) = body["outputs"]
    assert output["name"] == "y" and output["shape"] == [1, 16] and output["datatype"] == "FP32"
    assert np.array_equal(np.array(output["data"], np.float32).reshape(1, 16), want[0])
    status, body = _post(url, {"inputs": [
        {"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [0.0] * 15}]})
    assert status == 400 and "shape [1, 15]" in body["error"]
    status, body = _post(f"http://{gateway.http}/v2/models/mlp/nothing", {})
    assert status == 404 and "error" in body


def _scrape(gateway) -> dict:
    with urllib.request.urlopen(f"http://{gateway.metrics}/metrics") as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def test_metrics_parse_and_count(served):
    _, gateway, xs, _, _ = served
    before = _scrape(gateway)
    client = tritonhttp.InferenceServerClient(gateway.http)
    for x in xs[:10]:
        tensor = tritonhttp.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("mlp", [tensor])
    after = _scrape(gateway)
    assert after["defer_requests"].type == "counter"
    assert after["defer_request_duration_seconds"].type == "histogram"
    assert after["defer_requests_in_flight"].type == "gauge"
    ok = dict(family="defer_requests", sample="defer_requests_total", protocol="http",
              outcome="ok")
    assert _value(after, **ok) - _value(before, **ok) == 10
    count = dict(family="defer_request_duration_seconds",
                 sample="defer_request_duration_seconds_count", protocol="http")
    assert _value(after, **count) - _value(before, **count) >= 10
    assert _value(after, "defer_chain_state", "defer_chain_state", chain="0",
                  defer_chain_state="running") == 1
    assert _value(after, "defer_failovers", "defer_failovers_total", chain="0") == 0
    assert _value(after, "defer_requests_in_flight", "defer_requests_in_flight") == 0


def test_trace_is_trace_event_json(served):
    _, gateway, xs, _, trace_path = served
    client = tritongrpc.InferenceServerClient(gateway.grpc)
    tensor = tritongrpc.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(xs[0])
    client.infer("mlp", [tensor])
    by_phase = check_trace_events(load_trace(trace_path))  # still open: no closing bracket
    attempts = [e for e in by_phase["b"] if e["pid"] == 1]
    assert sum(e["name"] == "chain 0" for e in attempts) >= 1
    # chain 0's nodes: every request has receive, compute and send on both stages
    per_request: dict[int, set] = {}
    for event in by_phase["X"]:
        per_request.setdefault(event["args"]["request"], set()).add((event["pid"], event["tid"]))
    assert per_request and all(len(seen) == 2 * 3 for seen in per_request.values())
    names = {e["args"]["name"] for e in by_phase["M"] if e["name"] == "process_name"}
    assert "chain 0  link stage 1 -> dispatcher" in names
