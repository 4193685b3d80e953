"""cluster.json: written atomically, read back equal, extras kept; bad files name the field."""

from __future__ import annotations

import json

import pytest

from defer.cluster import Cluster, Link, NodeProfile, load_cluster
from defer.errors import ManifestError, UsageError


def _cluster() -> Cluster:
    nodes = [NodeProfile("10.0.0.1:7000", "onnx", 1, 4, 2 << 30, {"conv1": 0.002, "fc": 1e-4},
                         {"hop_cost": {"per_message_s": 1e-4, "per_byte_s": 1e-10}}),
             NodeProfile("[::1]:7001", "tflite", 1, 1, 512 << 20, {"conv1": 0.004})]
    links = [Link("dispatcher", "10.0.0.1:7000", 12.5e6, 0.001),
             Link("10.0.0.1:7000", "[::1]:7001", 2.5e6, 0.004)]
    return Cluster({"name": "m", "sha256": "0" * 64}, nodes, links, "defer test")


def test_round_trip_keeps_everything(tmp_path):
    cluster = _cluster()
    cluster.save(tmp_path / "cluster.json")
    back = load_cluster(tmp_path / "cluster.json")
    assert back.to_dict() == cluster.to_dict()
    assert back.node("[::1]:7001").engine == "tflite"
    assert back.node("10.0.0.1:7000").extra["hop_cost"]["per_byte_s"] == 1e-10
    assert back.link("10.0.0.1:7000", "[::1]:7001").bandwidth == 2.5e6
    assert back.link("[::1]:7001", "10.0.0.1:7000") is None  # links are directed
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(schema_version=9), "schema_version 9"),
    (lambda d: d["nodes"][0].pop("op_costs"), "op_costs"),
    (lambda d: d["nodes"][0]["op_costs"].update(x=-1), "finite seconds"),
    (lambda d: d["links"][0].update(bandwidth=0), "bandwidth must be > 0"),
    (lambda d: d["nodes"][1].update(address="nope"), "expected host:port"),
    (lambda d: d.update(nodes=[]), "no nodes"),
])
def test_bad_files_name_the_field(tmp_path, change, match):
    data = _cluster().to_dict()
    change(data)
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises((ManifestError, UsageError), match=match):
        load_cluster(tmp_path / "c.json")


def test_missing_file_says_run_profile(tmp_path):
    with pytest.raises(UsageError, match="defer profile"):
        load_cluster(tmp_path / "none.json")
