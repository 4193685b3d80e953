"""`defer doctor` against real node processes on loopback: a healthy chain exits 0, and a
stopped node, a wrong token, a node serving another bundle, a bundle that cannot be pushed and
a wrong node count are each caught, naming the node; a chain the doctor passes does start."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.cli import main
from defer.fleet.doctor import DoctorOptions, check_chain
from defer.local import start_node, stop_processes
from defer.manifest import load_manifest
from defer.runtime.dispatcher import Dispatcher

TOKEN = "doctor-token"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 2-stage manifest; node 0 waits for a push, node 1 serves its bundle already."""
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path_factory.mktemp("doctor"), n_stages=2)
    nodes = [start_node(token=TOKEN), start_node(manifest.bundle_path(1), token=TOKEN)]
    yield model, manifest, nodes
    stop_processes(nodes)


def _doctor(manifest, addresses, *extra, token=TOKEN):
    result = CliRunner().invoke(main, ["doctor", "--manifest", str(manifest.path), "--nodes",
                                       ",".join(addresses), *extra,
                                       *(["--token", token] if token else [])])
    return result.exit_code, result.output


def _lines(output: str, status: str) -> list[str]:
    return [line for line in output.splitlines() if f" {status} " in line]


def test_a_healthy_chain_passes_and_then_starts(chain):
    model, manifest, nodes = chain
    addresses = [n.address for n in nodes]
    code, output = _doctor(manifest, addresses)
    assert code == 0, output
    assert "the chain can start on these 2 nodes" in output and not _lines(output, "ERROR")
    checks = {(line.split()[1], line.split()[2]) for line in output.splitlines()[1:-1]}
    for address in addresses:
        assert {(address, c) for c in ("reach", "engine", "bundle", "memory",
                                       "heartbeat")} <= checks
    links = [line for line in output.splitlines() if " link " in line]
    assert len(links) == 3 and f"dispatcher -> {addresses[0]}" in links[0]
    assert f"{addresses[0]} -> {addresses[1]}" in links[1] and "Mbit/s" in links[1]
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    with Dispatcher(manifest, addresses, token=TOKEN) as dispatcher:
        out = dispatcher.infer({"x": x})
    assert np.allclose(out["y"], reference(model, [{"x": x}])[0]["y"], atol=1e-5)


def test_a_stopped_node_is_named(chain):
    _, manifest, nodes = chain
    gone = start_node(manifest.bundle_path(1), token=TOKEN)
    stop_processes([gone])
    code, output = _doctor(manifest, [nodes[0].address, gone.address])
    assert code == 1
    errors = _lines(output, "ERROR")
    assert len(errors) == 1 and gone.address in errors[0] and "not reachable" in errors[0]
    assert "the chain cannot start: 1 problem(s)" in output


def test_a_wrong_token_is_named_for_each_node(chain):
    _, manifest, nodes = chain
    code, output = _doctor(manifest, [n.address for n in nodes], token="not-the-token")
    assert code == 1
    errors = _lines(output, "ERROR")
    assert [e.split()[1] for e in errors] == [n.address for n in nodes]
    assert all(" auth " in e and "tokens differ" in e for e in errors)
    code, output = _doctor(manifest, [n.address for n in nodes], token=None)
    assert code == 1 and all("requires a token" in e for e in _lines(output, "ERROR"))


def test_a_node_serving_another_bundle_is_named(chain):
    _, manifest, nodes = chain
    other = start_node(manifest.bundle_path(1), token=TOKEN)
    try:
        code, output = _doctor(manifest, [other.address, nodes[1].address])
    finally:
        stop_processes([other])
    assert code == 1
    errors = _lines(output, "ERROR")
    assert len(errors) == 1 and errors[0].split()[:3] == ["0", other.address, "bundle"]
    assert f"but stage 0 is {manifest.stages[0].file}" in errors[0]
    assert "defer serve" in errors[0]  # the fix


def test_a_bundle_that_cannot_be_pushed_is_named(chain, tmp_path):
    _, manifest, nodes = chain
    copy = tmp_path / "copy"
    shutil.copytree(manifest.path.parent, copy)
    (copy / manifest.stages[0].file).write_bytes(b"not the bundle")
    empty = start_node(token=TOKEN)  # serves nothing: the bundle would be pushed
    try:
        code, output = _doctor(load_manifest(copy), [empty.address, nodes[1].address])
    finally:
        stop_processes([empty])
    assert code == 1
    errors = _lines(output, "ERROR")
    assert len(errors) == 1 and empty.address in errors[0]
    assert "from another compile" in errors[0]


def test_a_wrong_node_count_is_bad_input(chain):
    _, manifest, nodes = chain
    code, output = _doctor(manifest, [nodes[0].address])
    assert code == 2 and "2 stages but 1 nodes" in output


def test_the_python_api_reports_findings(chain):
    _, manifest, nodes = chain
    report = check_chain(manifest, [n.address for n in nodes],
                         DoctorOptions(token=TOKEN, links=False))
    assert report.can_start and not [f for f in report.problems if f.status == "error"]
    assert {f.check for f in report.findings} == {"reach", "engine", "bundle", "memory",
                                                  "heartbeat"}
