"""cluster.json -> Fleet: each node's op costs mapped onto the op order by name, slowness,
cut and codec costs scaled per device, hop costs, links (missing ones unusable unless priced),
memory caps; a cluster profiled for another model is refused."""

from __future__ import annotations

import numpy as np
import pytest
from fleet_helpers import address, synthetic_cluster
from onnx_graphs import residual_mlp

from defer.compiler.fleet import build_fleet
from defer.compiler.graph import analyse
from defer.compiler.load import load_model
from defer.compiler.profile import Costs, estimate_costs
from defer.errors import PlanError


@pytest.fixture(scope="module")
def info():
    return analyse(load_model(residual_mlp(width=32, blocks=3)).model)


def _measured(info) -> Costs:
    """Local costs as if profiled here (so slowness applies), with some cut costs."""
    node = estimate_costs(info).node
    costs = Costs(node * 0.1 / node.sum(), np.full(info.n_ops + 1, 1e-3),
                  np.full(info.n_ops + 1, 2e-3), "profile (test)")
    costs.enter[0] = costs.leave[-1] = 0.0
    return costs


def test_costs_slowness_and_cut_costs_per_device(info):
    cluster = synthetic_cluster(info.model, [1.0, 0.25], model_seconds=0.1)
    cluster.nodes[1].extra["hop_cost"] = {"per_message_s": 5e-4, "per_byte_s": 1e-8}
    fleet = build_fleet(info, cluster, _measured(info))
    assert fleet.names == [address(0), address(1)]
    assert fleet.whole_model_seconds() == pytest.approx([0.1, 0.4])
    assert fleet.slowness == pytest.approx([1.0, 4.0])
    cut = fleet.cut_bytes
    assert fleet.enter[0, 5] == pytest.approx(1e-3)
    assert fleet.enter[1, 5] == pytest.approx(4e-3 + 5e-4 + 1e-8 * cut[5])  # x4, + hop cost
    assert fleet.leave[1, 5] == pytest.approx(8e-3 + 1e-8 * cut[5])


def test_links_are_directed_and_missing_ones_unusable_unless_priced(info):
    cluster = synthetic_cluster(info.model, [1.0, 1.0], bandwidth=1e6, rtt=2e-3,
                                links={(1, 0): 0})
    fleet = build_fleet(info, cluster, _measured(info))
    assert fleet.has_link(0, 1) and not fleet.has_link(1, 0)
    assert fleet.latency[0, 1] == pytest.approx(1e-3)  # one way: rtt / 2
    assert fleet.usable([0, 1]) and not fleet.usable([1, 0])
    with pytest.raises(PlanError, match="no measured link"):
        fleet.problem([1, 0])
    priced = build_fleet(info, cluster, _measured(info), bandwidth=5e5, latency=0.01)
    assert priced.bandwidth[1, 0] == 5e5 and priced.latency[1, 0] == 0.01


def test_memory_caps_are_the_smaller_of_free_and_given(info):
    cluster = synthetic_cluster(info.model, [1.0, 1.0], memory=1 << 20)
    cluster.nodes[1].memory_free = 0  # not measured
    fleet = build_fleet(info, cluster, _measured(info), memory=5e5)
    assert fleet.memory_cap == [5e5, 5e5] and fleet.memory is not None
    assert build_fleet(info, cluster, _measured(info)).memory_cap == [1 << 20, None]


def test_a_node_missing_some_ops_is_filled_in_and_one_missing_most_is_refused(info):
    cluster = synthetic_cluster(info.model, [0.5])
    costs = cluster.nodes[0].op_costs
    dropped = min(costs, key=costs.get)  # the cheapest op: under 10% of the work
    costs.pop(dropped)
    fleet = build_fleet(info, cluster, _measured(info))
    position = [op.name for op in info.ops].index(dropped)
    assert fleet.compute[0, position] > 0  # priced at this machine's cost x slowness
    cluster.nodes[0].op_costs = {k: v for i, (k, v) in enumerate(costs.items()) if i % 3 == 0}
    with pytest.raises(PlanError, match="profiled for another model"):
        build_fleet(info, cluster, _measured(info))
