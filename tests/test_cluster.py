"""The local cluster (`defer run`): real node processes pinned per core, readiness by ready line,
a report comparing chain and single process, and no process left behind on success or error.
Plus the lossy-codec check on a trained model (digits CNN): zfp:1e-2 keeps >= 99% top-1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import compile_tiny, residual_mlp

from defer.cli import main
from defer.local import LocalCluster, run_local
from defer.runtime.dispatcher import Dispatcher


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return compile_tiny(residual_mlp(), tmp_path_factory.mktemp("bundles"),
                        cuts=("relu1", "mm2"))


def test_run_local_reports_fidelity_and_throughput_side_by_side(bundles):
    report = run_local(bundles.path.parent, count=30, timeout=20)
    assert report["n_stages"] == 3 and report["chain"]["requests"] == 30
    assert report["single"]["reference"] == "whole model"
    assert report["fidelity"]["max_abs"] == 0.0  # raw hops: bit-exact
    assert report["single"]["throughput"] > 0 and report["speedup"] > 0
    assert len(report["chain"]["stages"]) == 3 and len(report["chain"]["hops"]) == 4


def test_run_compiles_a_model_file_and_prints_the_report(tmp_path):
    import onnx

    path = tmp_path / "mlp.onnx"
    onnx.save(residual_mlp(), str(path))
    result = CliRunner().invoke(main, ["run", str(path), "-n", "2", "--count", "20",
                                       "--no-profile", "--codec", "zfp:1e-3",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    for text in ("chain of 2 nodes", "single process (whole model, 1 thread)", "speed-up",
                 "max abs error", "zfp:0.001"):
        assert text in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 < report["fidelity"]["max_abs"] < 0.05


def test_run_help_shows_defaults():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "default: 100" in result.output and "-n, --stages" in result.output


def test_no_process_outlives_an_error(bundles):
    with pytest.raises(RuntimeError, match="boom"), LocalCluster(bundles) as cluster:
        processes = [n.process for n in cluster.nodes]
        assert len({n.address for n in cluster.nodes}) == 3
        raise RuntimeError("boom")
    assert all(p.poll() is not None for p in processes)


def test_shutdown_then_wait_exits_zero(bundles):
    cluster = LocalCluster(bundles).__enter__()
    dispatcher = Dispatcher(bundles, cluster.addresses, timeout=20)
    try:
        dispatcher.infer(np.zeros((1, 16), np.float32))
    finally:
        cluster.close(dispatcher)
        dispatcher.close()
    assert [n.process.returncode for n in cluster.nodes] == [0, 0, 0]


@pytest.mark.keras
def test_zfp_keeps_top1_on_the_trained_digits_cnn(digits, tmp_path, record_property):
    from defer.compiler import compile_model

    keras_path, x_test, _ = digits
    manifest = compile_model(keras_path, 3, tmp_path / "bundles", profile=False)
    (spec,) = manifest.inputs
    samples = [x[None].astype(np.float32) for x in x_test]
    with LocalCluster(manifest) as cluster:
        runs = {}
        for codec in ("raw", "zfp:1e-2"):
            with Dispatcher(manifest, cluster.addresses, codec=codec, timeout=30) as dispatcher:
                logits = np.concatenate([next(iter(o.values())) for o in
                                         dispatcher.map(samples)])
                runs[codec] = (logits, dispatcher.stats())
    agreement = float(np.mean(runs["raw"][0].argmax(1) == runs["zfp:1e-2"][0].argmax(1)))
    sent = {c: sum(h["bytes_per_inference"] for h in s["hops"][1:-1]) for c, (_, s) in runs.items()}
    saved = 1 - sent["zfp:1e-2"] / sent["raw"]
    record_property("top1_agreement", agreement)
    record_property("inter_node_bytes_saved", saved)
    print(f"digits CNN, {len(samples)} test images: zfp:1e-2 top-1 agreement {agreement:.2%}, "
          f"inter-node bytes per inference {sent['raw']:.0f} -> {sent['zfp:1e-2']:.0f} "
          f"({saved:.1%} saved)")
    assert agreement >= 0.99
    assert saved > 0
