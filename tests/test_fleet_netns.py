"""Shaped links (root + `ip netns`, tc tbf; benchmarks/netns.py): `defer profile` reports a
20 Mbit/s link at 17-21 Mbit/s, and `defer doctor` names the one 1 Mbit/s link of a chain
planned for 100 Mbit/s while letting it start. Slow; skipped without namespaces."""

from __future__ import annotations

import pytest

from benchmarks import fleet
from benchmarks.common import Context
from benchmarks.netns import available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available()[0], reason=f"no network namespaces: "
                                                            f"{available()[1]}")]


@pytest.fixture
def ctx(tmp_path) -> Context:
    return Context(quick=True, runs=1, work_dir=tmp_path, count=20, log=print)


def test_profile_measures_a_20_mbit_link_at_17_to_21(ctx):
    result = fleet.links(ctx, rate_mbit=20.0)
    shaped = [link for link in result["runs"][0] if link["shaped"]]
    assert len(shaped) == 4  # node -> node both ways, each node -> dispatcher
    assert result["within_17_21"], [round(link["mbit"], 1) for link in shaped]
    unshaped = [link["mbit"] for link in result["runs"][0] if not link["shaped"]]
    assert min(unshaped) > 100  # dispatcher -> node is not shaped


def test_doctor_names_the_slow_link_and_lets_the_chain_start(ctx):
    result = fleet.doctor(ctx, slow_mbit=1.0, plan_mbit=100.0)
    assert result["names_only_the_slow_link"], result["problems"]
    assert result["can_start"]
    (problem,) = result["problems"]
    assert problem["status"] == "warning" and "1.0 Mbit/s" in problem["detail"]
    assert "the plan assumed 100.0 Mbit/s" in problem["detail"]
