"""Dynamic batching through a real gateway: a model exported with a symbolic batch dimension,
--max-batch 8; 32 concurrent gRPC requests come back each with its own rows, equal to the
whole model run on that request alone, and the metrics show batches of more than one. A model
with a fixed batch dimension is refused with exit code 2 and a message saying why."""
from __future__ import annotations

import queue
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.local import start_gateway, start_node, stop_processes

tritongrpc = pytest.importorskip("tritonclient.grpc")

COUNT = 32


def dynamic_batch_mlp():
    model = residual_mlp()
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "N"
    return model


def test_concurrent_requests_are_batched_and_split_back(tmp_path):
    model = dynamic_batch_mlp()
    manifest = compile_tiny(model, tmp_path / "bundles", n_stages=2)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 2, 16)).astype(np.float32) for i in range(COUNT)]
    want = [r["y"] for r in reference(model, [{"x": x} for x in xs])]
    nodes, gateway = [], None
    try:
        nodes = [start_node(manifest.bundle_path(i)) for i in range(2)]
        gateway = start_gateway(manifest.path, [[n.address for n in nodes]],
                                args=("--max-batch", "8", "--max-delay-ms", "20"))
        client = tritongrpc.InferenceServerClient(gateway.grpc)
        done: queue.Queue = queue.Queue()
        for i, x in enumerate(xs):
            tensor = tritongrpc.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_infer("whole", [tensor], lambda result, error, i=i:
                               done.put((i, result, error)))
        for _ in range(COUNT):
            i, result, error = done.get(timeout=60)
            assert error is None, error
            # a batched GEMM may round differently from a single-row one: close, not equal
            np.testing.assert_allclose(result.as_numpy("y"), want[i], rtol=1e-5, atol=1e-6)
        with urllib.request.urlopen(f"http://{gateway.metrics}/metrics") as response:
            text = response.read().decode()
        samples = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name.startswith("defer_batch_size")}
        assert samples["defer_batch_size_sum"] == COUNT  # every request in exactly one batch
        assert samples["defer_batch_size_count"] < COUNT  # and some batches held several
    finally:
        if gateway is not None:
            gateway.stop()
        stop_processes(nodes)


def test_a_fixed_batch_dimension_is_refused(tmp_path):
    manifest = compile_tiny(residual_mlp(), tmp_path / "bundles", n_stages=2)
    run = subprocess.run([sys.executable, "-m", "defer", "gateway", "--manifest",
                          str(manifest.path), "--nodes", "127.0.0.1:1,127.0.0.1:2",
                          "--max-batch", "4"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "dynamic batch dimension" in run.stderr and "'x'" in run.stderr
