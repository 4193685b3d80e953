"""`defer compile` and `defer inspect` through click's CliRunner."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from defer.cli import main
from defer.manifest import SCHEMA_VERSION, load_manifest
from tests.onnx_graphs import dense_chain, multi_io, residual_mlp


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(residual_mlp(blocks=3), path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compile_verify_and_inspect(model_path, tmp_path):
    out = tmp_path / "bundles"
    result = _run("compile", model_path, "-n", 3, "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: max abs error" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and len(manifest["stages"]) == 3
    assert sorted(p.name for p in out.glob("bundle_*.onnx")) == [f"bundle_{i}.onnx" for i in range(3)]
    shown = _run("inspect", out)
    assert shown.exit_code == 0
    assert "balanced: slowest stage" in shown.output and "layers: slowest stage" in shown.output


@pytest.mark.parametrize("make, n", [(multi_io, 3), (dense_chain, 4)])
def test_multi_io_and_dense_models_verify(tmp_path, make, n):
    path = tmp_path / "m.onnx"
    onnx.save(make(), path)
    result = _run("compile", path, "-n", n, "-o", tmp_path / "out", "--verify")
    assert result.exit_code == 0, result.output


def test_speeds_give_the_fast_node_more_work(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual_mlp(blocks=12, width=64), path)
    result = _run("compile", path, "-n", 2, "--speeds", "2,1", "--no-profile", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "o" / "manifest.json").read_text())["stages"]
    first = stages[0]["compute"] * 2  # back to speed-1 seconds
    share = first / (first + stages[1]["compute"])
    assert 0.6 < share < 0.73


BAD = [
    (["compile", "missing.onnx", "-n", "2"], "no such file"),
    (["compile", "{txt}", "-n", "2"], "unknown model format"),
    (["compile", "{model}", "-n", "0"], "at least one stage"),
    (["compile", "{model}", "-n", "500"], "13 or fewer"),
    (["compile", "{model}", "--cut", "nope"], "no op or tensor"),
    (["compile", "{model}", "-n", "2", "--memory", "10B"], "memory cap"),
    (["compile", "{model}", "-n", "2", "--bandwidth", "fast"], "bandwidth 'fast'"),
    (["compile", "{model}", "-n", "2", "--speeds", "1"], "--speeds needs 2"),
    (["compile", "{model}"], "pass -n N"),
    (["inspect", "{tmp}/nothing"], "no such manifest"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(model_path, tmp_path, args, message):
    txt = tmp_path / "model.txt"
    txt.write_text("not a model")
    out = tmp_path / "out"
    args = [a.format(model=model_path, txt=txt, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, [*args, "-o", str(out)] if args[0] == "compile" else args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error" in line]) == 1
    assert not out.exists()


def test_keras_input_without_tensorflow_says_which_extra(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "model.h5"
    path.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    result = _run("compile", path, "-n", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "pip install 'defer-edge[keras]'" in result.output
    assert "Traceback" not in result.output


def test_schema_1_manifests_are_still_read(model_path, tmp_path):
    out = tmp_path / "bundles"
    assert _run("compile", model_path, "-n", 2, "-o", out, "--no-profile").exit_code == 0
    data = json.loads((out / "manifest.json").read_text())
    old = {**data, "schema_version": 1, "codec": {"default": "lz4", "hops": {}},
           "model": {("n_nodes" if k == "n_ops" else k): v for k, v in data["model"].items()},
           "stages": [{{"n_ops": "n_nodes", "first_op": "first_node", "last_op": "last_node"}
                       .get(k, k): v for k, v in s.items() if k != "format"}
                      for s in data["stages"]]}
    (out / "manifest.json").write_text(json.dumps(old))
    manifest = load_manifest(out)
    assert manifest.codec == "lz4" and manifest.model["n_ops"] == data["model"]["n_ops"]
    assert [s.n_ops for s in manifest.stages] == [s["n_ops"] for s in data["stages"]]
    assert all(s.format == "onnx" for s in manifest.stages)
    assert _run("inspect", out).exit_code == 0


def test_compile_prices_this_machines_hop_unless_told_none(model_path, tmp_path, hop_cost_cache):
    from defer import hop

    hop.save(hop.HopCost(2e-3, 1e-9, 2e-9), hop_cost_cache)
    try:
        priced = _run("compile", model_path, "-n", 2, "--no-profile", "-o", tmp_path / "a")
        bare = _run("compile", model_path, "-n", 2, "--no-profile", "-o", tmp_path / "b",
                    "--hop-cost", "none")
    finally:
        hop.save(hop.HopCost(), hop_cost_cache)
    assert priced.exit_code == 0 and bare.exit_code == 0, priced.output + bare.output
    assert "hops priced at 2.000 ms per request" in priced.output
    assert "hops priced" not in bare.output
    times = [load_manifest(tmp_path / d).plan["stage_times"] for d in "ab"]
    assert all(p > b + 1.9e-3 for p, b in zip(*times))
    shown = _run("inspect", tmp_path / "a")
    assert "not measured yet" in shown.output
