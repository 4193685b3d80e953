"""The planner prices the hop: HopCost, its cache, its place in each stage's time, and a tiny
calibration against a real node."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_graphs import residual_mlp

from defer import hop
from defer.compiler import build_problem, compile_model
from defer.compiler.graph import analyse
from defer.compiler.load import load_model
from defer.compiler.options import CompileOptions
from defer.compiler.partition import evaluate
from defer.compiler.profile import estimate_costs
from defer.errors import UsageError

HOP = hop.HopCost(per_message_s=2e-3, recv_per_byte_s=1e-8, send_per_byte_s=3e-8)


def test_cut_costs_are_the_line_on_the_bytes_crossing():
    enter, leave = hop.hop_cut_costs(np.array([100.0, 0.0, 50.0]), HOP)
    assert enter == pytest.approx([2e-3 + 1e-6, 2e-3, 2e-3 + 5e-7])
    assert leave == pytest.approx([3e-6, 0.0, 1.5e-6])
    assert HOP.seconds(100, 50) == pytest.approx(2e-3 + 1e-6 + 1.5e-6)
    none = hop.hop_cut_costs(np.ones(3), None)
    assert not none[0].any() and not none[1].any()


def test_cluster_json_form_round_trips_and_one_per_byte_figure_prices_both_sides():
    back = hop.HopCost.from_dict(HOP.to_dict())
    assert (back.per_message_s, back.recv_per_byte_s, back.send_per_byte_s) == \
        (HOP.per_message_s, HOP.recv_per_byte_s, HOP.send_per_byte_s)
    one = hop.HopCost.from_dict({"per_message_s": 1e-4, "per_byte_s": 1e-10})
    assert one.recv_per_byte_s == one.send_per_byte_s == 1e-10
    with pytest.raises(ValueError):
        hop.HopCost.from_dict({"per_message_s": -1})
    with pytest.raises(ValueError):
        hop.HopCost.from_dict([1, 2])


def test_cache_is_this_machines_and_a_stale_or_broken_file_is_ignored(tmp_path):
    path = tmp_path / "hop.json"
    assert hop.cached(path) is None
    hop.save(HOP, path, count=3)
    assert hop.cached(path).per_message_s == HOP.per_message_s
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "machine": "another machine"}))
    assert hop.cached(path) is None
    path.write_text("{not json")
    assert hop.cached(path) is None


def test_options_resolve_auto_from_the_cache_and_none(hop_cost_cache):
    hop.save(HOP, hop_cost_cache)
    try:
        assert CompileOptions(n_stages=2).checked().hop_cost.per_message_s == HOP.per_message_s
    finally:
        hop.save(hop.HopCost(), hop_cost_cache)
    assert CompileOptions(n_stages=2, hop_cost="none").checked().hop_cost is None
    given = CompileOptions(n_stages=2, hop_cost={"per_message_s": 1e-3}).checked().hop_cost
    assert given.per_message_s == 1e-3
    with pytest.raises(UsageError, match="hop_cost"):
        CompileOptions(n_stages=2, hop_cost="sometimes").checked()


def test_each_stage_pays_its_hop_divided_by_its_speed():
    info = analyse(load_model(residual_mlp(width=32, blocks=3)).model)
    costs = estimate_costs(info)
    bounds = [0, 4, 8, info.n_ops]
    speeds = [1.0, 0.5, 0.25]
    bare = evaluate(build_problem(info, costs, 3, speeds), bounds, "cuts")
    priced = evaluate(build_problem(info, costs, 3, speeds, hop_cost=HOP), bounds, "cuts")
    cut = info.cut_bytes()
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        extra = HOP.seconds(cut[a], cut[b]) / speeds[s]
        assert priced.stage_times[s] - bare.stage_times[s] == pytest.approx(extra)


def test_a_costly_hop_moves_the_cut_off_the_fat_tensors(tmp_path):
    """Per byte dear enough, the plan cuts where fewer bytes cross, and records the price."""
    from onnx_graphs import dense_chain

    model = dense_chain(layers=6, width=64)
    cheap = compile_model(model, 2, tmp_path / "cheap", profile=False, hop_cost=None)
    dear = compile_model(model, 2, tmp_path / "dear", profile=False,
                         hop_cost=hop.HopCost(0.0, 1e-3, 1e-3))
    assert cheap.plan["hop_cost"] is None
    assert dear.plan["hop_cost"]["recv_per_byte_s"] == 1e-3
    assert dear.stages[0].bytes_out <= cheap.stages[0].bytes_out
    assert dear.plan["bottleneck"] > cheap.plan["bottleneck"]


def test_calibration_fits_a_nonnegative_line_from_a_real_node(tmp_path):
    from defer import calibrate

    result = calibrate.fit(tmp_path, count=20, sizes=(4096, 1 << 20))
    fitted = result["hop"]
    assert fitted.per_message_s >= 0 and fitted.recv_per_byte_s >= 0
    assert fitted.send_per_byte_s >= 0
    assert [s for s, _ in result["points"]["recv"]] == [4096, 1 << 20]
    # a node spends something per request beyond its op: between 1 us and 50 ms
    assert all(1e-6 < c < 5e-2 for p in result["points"].values() for _, c in p)


def test_a_node_announces_its_hop_cost_and_profile_records_only_a_well_formed_one(caplog):
    from defer.fleet.profile import announced_hop_cost
    from defer.runtime.node import Node
    from defer.runtime.options import NodeConfig

    node = Node(NodeConfig(port=0, hop_cost=HOP.to_dict()))
    try:
        facts = node.facts()
    finally:
        node.pipeline.close()
    assert announced_hop_cost("n:1", facts).send_per_byte_s == HOP.send_per_byte_s
    assert announced_hop_cost("n:1", {"hop_cost": None}) is None
    assert announced_hop_cost("n:1", {"hop_cost": {"per_message_s": "soon"}}) is None
    assert "malformed hop cost" in caplog.text
