"""`defer plan` on synthetic cluster.json files: the table per device count, bottlenecks named,
a slow device left out, a slow link named with the rate it needs, codecs compared, replicas,
JSON and PNG, and one-line errors."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from fleet_helpers import address, synthetic_cluster
from onnx_graphs import residual_mlp

from defer.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "mlp.onnx"
    onnx.save(residual_mlp(width=64, blocks=6), str(path))
    return path


def _plan(model_path, tmp_path, cluster, *extra):
    cluster.save(tmp_path / "cluster.json")
    result = CliRunner().invoke(main, ["plan", str(model_path), "--cluster",
                                       str(tmp_path / "cluster.json"), "--no-profile",
                                       "--json", str(tmp_path / "plan.json"),
                                       "--png", str(tmp_path / "plan.png"), *extra])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((tmp_path / "plan.json").read_text())


def test_a_slow_device_is_left_out_and_said_so(model_path, tmp_path):
    cluster = synthetic_cluster(model_path, [1.0, 1.0, 1.0, 0.001])
    out, report = _plan(model_path, tmp_path, cluster, "--codecs", "raw")
    rows = report["tables"]["raw"]
    assert [r["n"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["throughput"] > 1.8 * rows[0]["throughput"]  # two equal devices: ~2x
    assert rows[3]["throughput"] < rows[2]["throughput"]  # the slow one makes it worse
    assert report["best"]["n"] == 3 and address(3) not in report["best"]["devices"]
    assert "use 3 of the 4 devices" in out and f"leave out {address(3)}" in out
    assert "stage" in rows[3]["bottleneck"] and address(3) in rows[3]["bottleneck"]
    assert "adds" in out and "a device that runs the whole model in under" in out
    assert (tmp_path / "plan.png").exists() or "matplotlib not installed" in out


def test_a_slow_link_is_the_bottleneck_with_the_rate_it_needs(model_path, tmp_path):
    # Two devices, the links between them slow (256 B in 60 ms), the dispatcher's fast; nodes
    # receive while they compute (--overlap): the hop is what limits the chain of two.
    slow = {(0, 1): 256 / 0.06, (1, 0): 256 / 0.06}
    cluster = synthetic_cluster(model_path, [1.0, 1.0], links=slow)
    out, report = _plan(model_path, tmp_path, cluster, "--codecs", "raw,q8,lz4", "--overlap")
    best = report["best"]
    assert best["n"] == 2 and best["bottleneck_kind"] == "link"
    assert best["bottleneck"].startswith(f"link {best['devices'][0]} -> {best['devices'][1]}")
    assert "faster than" in out and "34.1 kbit/s" in out  # the rate now
    assert report["slowest_link"]["codecs"]["q8"]["bytes"] < \
        report["slowest_link"]["codecs"]["raw"]["bytes"] / 3.5
    # q8 sends a quarter of the bytes on that hop: compute limits again.
    q8 = max(r["throughput"] for r in report["tables"]["q8"])
    assert q8 > 1.15 * best["throughput"]


def test_replicas_beat_a_chain_of_equal_devices(model_path, tmp_path):
    # Four equal devices, and links slow enough that every cut costs: four whole copies side by
    # side beat one chain of four.
    cluster = synthetic_cluster(model_path, [1.0] * 4, bandwidth=2e4)
    out, report = _plan(model_path, tmp_path, cluster, "--codecs", "raw")
    assert report["replicas"] and report["replicas"]["gain"] > 0.05
    assert "behind `defer gateway`" in out


@pytest.mark.parametrize("args, message", [
    (["--codec", "gzip"], "unknown codec"),
    (["--codecs", "raw,zfp:-1"], "tolerance"),
    (["--bandwidth", "fast"], "bandwidth"),
])
def test_bad_options_are_one_line_errors(model_path, tmp_path, args, message):
    synthetic_cluster(model_path, [1.0]).save(tmp_path / "c.json")
    result = CliRunner().invoke(main, ["plan", str(model_path), "--cluster",
                                       str(tmp_path / "c.json"), "--no-profile", *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_cluster_of_another_model_is_refused(model_path, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(residual_mlp(width=8, blocks=2, seed=3), str(other))
    cluster = synthetic_cluster(other, [1.0, 1.0])
    for node in cluster.nodes:  # op names of another model
        node.op_costs = {f"x{name}": v for name, v in node.op_costs.items()}
    cluster.save(tmp_path / "c.json")
    result = CliRunner().invoke(main, ["plan", str(model_path), "--cluster",
                                       str(tmp_path / "c.json"), "--no-profile"])
    assert result.exit_code == 2 and "profiled for another model" in result.output


@pytest.mark.keras
def test_a_tflite_model_is_planned_on_its_own_ops(tmp_path):
    from tflite_helpers import need_tensorflow, tflite_bytes

    need_tensorflow()
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tflite_bytes("tiny_cnn"))
    out, report = _plan(path, tmp_path, synthetic_cluster(path, [1.0, 0.5]), "--codecs",
                        "raw,q8c:-1")
    assert [r["n"] for r in report["tables"]["raw"]] == [1, 2] and "q8c:-1" in out


def test_help_shows_defaults():
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "[default: raw]" in result.output
    assert "--cluster" in result.output and "q8" in result.output
