"""`defer compile --cluster` end to end: three running nodes (one far too slow) described by a
cluster.json, the plan placed on the two fast ones and recorded in the manifest, then `defer
dispatch` with no --nodes streams through exactly those nodes, bit for bit against the whole
model; -n 3 says fewer devices would be faster; the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from fleet_helpers import synthetic_cluster
from onnx_graphs import residual_mlp
from runtime_helpers import reference

from defer.cli import main
from defer.local import start_node, stop_processes
from defer.manifest import load_manifest


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(model, model path, cluster.json path, node addresses): empty nodes, bundles pushed."""
    tmp = tmp_path_factory.mktemp("fleet")
    model = residual_mlp(width=32, blocks=4)
    onnx.save(model, str(tmp / "mlp.onnx"))
    nodes = [start_node() for _ in range(3)]
    try:
        addresses = [n.address for n in nodes]
        synthetic_cluster(tmp / "mlp.onnx", [1.0, 0.001, 1.0],
                          addresses=addresses).save(tmp / "cluster.json")
        yield model, tmp / "mlp.onnx", tmp / "cluster.json", addresses
    finally:
        stop_processes(nodes)


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compile_places_on_the_fast_nodes_and_dispatch_needs_no_nodes(fleet, tmp_path):
    model, path, cluster, addresses = fleet
    result = _invoke("compile", path, "--cluster", cluster, "-o", tmp_path / "b",
                     "--no-profile", "--verify")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "b")
    assert len(manifest.stages) == 2 and sorted(manifest.devices) == sorted(
        [addresses[0], addresses[2]])
    assert manifest.plan["placement"]["exact"] and "placed on 2 of the 3 devices" in \
        result.output
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((20, 1, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=xs)
    result = _invoke("dispatch", "--manifest", tmp_path / "b", "--cluster", cluster,
                     "--input", tmp_path / "x.npz", "--output", tmp_path / "y.npz",
                     "--report", tmp_path / "r.json", "--timeout", "20")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [h["from"] for h in report["hops"][1:]] == manifest.devices
    want = np.stack([r["y"] for r in reference(model, [{"x": x} for x in xs])])
    assert np.array_equal(np.load(tmp_path / "y.npz")["y"], want)


def test_a_count_that_is_slower_is_said_so(fleet, tmp_path):
    _, path, cluster, _ = fleet
    result = _invoke("compile", path, "--cluster", cluster, "-n", "3", "-o", tmp_path / "b",
                     "--no-profile")
    assert result.exit_code == 0, result.output
    assert "2 devices would be faster" in result.output
    assert len(load_manifest(tmp_path / "b").stages) == 3


@pytest.mark.parametrize("args, message", [
    (["--speeds", "1,2"], "drop --cut, --strategy layers and --speeds"),
    (["--cut", "relu0"], "drop --cut"),
    (["-n", "4"], "between 1 and 3"),
])
def test_bad_cluster_options_are_one_line_errors(fleet, tmp_path, args, message):
    _, path, cluster, _ = fleet
    result = _invoke("compile", path, "--cluster", cluster, "-o", tmp_path / "b",
                     "--no-profile", *args)
    errors = [line for line in result.output.splitlines() if line.startswith("defer: error:")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0]


def test_dispatch_without_nodes_or_placed_devices_asks_for_nodes(fleet, tmp_path):
    _, path, cluster, addresses = fleet
    assert _invoke("compile", path, "-n", "2", "-o", tmp_path / "b", "--no-profile").exit_code == 0
    result = _invoke("dispatch", "--manifest", tmp_path / "b", "--count", "2")
    assert result.exit_code == 2 and "which nodes?" in result.output
    result = _invoke("dispatch", "--manifest", tmp_path / "b", "--nodes", "127.0.0.1:1,"
                     + addresses[0], "--cluster", cluster, "--count", "2")
    assert result.exit_code == 2 and "127.0.0.1:1 not in" in result.output
