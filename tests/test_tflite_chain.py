"""TFLite stage bundles served by real `defer serve` processes (LiteRT inside, TCP between them)
give exactly what the whole .tflite gives under LiteRT in this process: several tensors per
hop (DenseNet), two inputs and two outputs, int8 hops (raw, and zfp falling back to lz4).
"""

from __future__ import annotations

import numpy as np
import pytest

from defer.fidelity import run_chain
from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher
from tests.tflite_helpers import (
    need_tensorflow,
    run_whole,
    sample_feeds,
    tflite_bytes,
    write_bundles,
)

pytestmark = pytest.mark.keras

CASES = [  # model, quantization, stages, codec
    ("densenet_tiny", "fp32", 3, "raw"),
    ("multi_io", "fp32", 2, "raw"),
    ("densenet_tiny", "int8", 3, "zfp"),
]


@pytest.mark.parametrize(("name", "mode", "n_stages", "codec"), CASES)
def test_chain_of_nodes_equals_the_whole_tflite(tmp_path, name, mode, n_stages, codec):
    need_tensorflow()
    from defer.compiler.tflite import read_tflite

    graph = read_tflite(tflite_bytes(name, mode))
    bounds = [round(i * graph.n_ops / n_stages) for i in range(n_stages + 1)]
    manifest = write_bundles(graph, bounds, tmp_path / "bundles", codec)
    assert max(len(s.receives) for s in manifest.stages) >= (3 if name == "densenet_tiny" else 1)
    samples = sample_feeds(graph, count=4, seed=2)
    nodes = []
    try:
        for stage in manifest.stages:
            nodes.append(start_node(manifest.bundle_path(stage.index)))
        with Dispatcher(manifest, [n.address for n in nodes], timeout=60) as dispatcher:
            outputs = list(dispatcher.map(samples))
            codecs = dispatcher.hop_codecs
            dispatcher.shutdown_nodes()
    finally:
        stop_processes(nodes, wait=10.0)
    assert all(n.process.returncode == 0 for n in nodes)
    assert codecs[1] == codec
    for sample, got in zip(samples, outputs):
        want = run_whole(graph, sample)
        assert set(got) == set(want)
        for output in want:
            np.testing.assert_array_equal(got[output], want[output])
        in_process = run_chain(manifest, sample)  # the oracle check used by `compile --verify`
        for output in want:
            np.testing.assert_array_equal(in_process[output], want[output])
