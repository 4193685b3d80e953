"""A node with only the runtime and the [tflite] extra (no TensorFlow) serves a TFLite bundle in
a chain. Opt-in (it needs a prepared venv, about a minute to build): make one with
  python -m venv /tmp/lean && /tmp/lean/bin/pip install -e '.[tflite]'
and run with DEFER_TFLITE_VENV=/tmp/lean. Checked: `import tensorflow` fails in the venv; the
node process maps LiteRT and neither TensorFlow nor onnxruntime; the chain (stage 0 in the
lean venv, stage 1 in this environment) equals the whole .tflite under LiteRT.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from defer.local import start_node, stop_processes
from defer.runtime.dispatcher import Dispatcher
from tests.tflite_helpers import (
    need_tensorflow,
    run_whole,
    sample_feeds,
    tflite_bytes,
    write_bundles,
)

VENV = os.environ.get("DEFER_TFLITE_VENV")
# start_node runs [*prefix, sys.executable, "-m", "defer", "serve", ...]: run the same command
# line with the venv's python instead.
SHIM = ("import runpy, sys; sys.argv = ['defer'] + sys.argv[4:]; "
        "runpy.run_module('defer', run_name='__main__', alter_sys=True)")

pytestmark = [pytest.mark.keras, pytest.mark.slow,
              pytest.mark.skipif(not VENV, reason="set DEFER_TFLITE_VENV to a [tflite]-only venv")]


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_node_without_tensorflow_serves_a_tflite_stage(tmp_path):
    need_tensorflow()
    from defer.compiler.tflite import read_tflite

    python = str(Path(VENV) / "bin" / "python")
    no_tf = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert no_tf.returncode != 0 and "No module named 'tensorflow'" in no_tf.stderr
    graph = read_tflite(tflite_bytes("densenet_tiny", "int8"))
    manifest = write_bundles(graph, [0, graph.n_ops // 2, graph.n_ops], tmp_path / "bundles")
    samples = sample_feeds(graph, count=3, seed=3)
    nodes = []
    try:
        nodes.append(start_node(manifest.bundle_path(0), command_prefix=(python, "-c", SHIM)))
        nodes.append(start_node(manifest.bundle_path(1)))
        with Dispatcher(manifest, [n.address for n in nodes], timeout=60) as dispatcher:
            outputs = list(dispatcher.map(samples))
            maps = _mapped(nodes[0].process.pid)
            dispatcher.shutdown_nodes()
    finally:
        stop_processes(nodes, wait=10.0)
    assert str(Path(VENV).resolve()) in maps or VENV in maps
    assert "ai_edge_litert" in maps
    assert "tensorflow" not in maps and "onnxruntime" not in maps
    for sample, got in zip(samples, outputs):
        want = run_whole(graph, sample)
        for output in want:
            np.testing.assert_array_equal(got[output], want[output])
