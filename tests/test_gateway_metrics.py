"""The gateway's metrics in-process: chain state transitions count failovers and rejoins the way
defer/serving/metrics.py says (a failed probe or a spare take-over is neither), the text
exposition parses with prometheus_client's parser, and the Grafana dashboard in
deploy/grafana queries only metrics the gateway or the nodes export."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from defer.serving.metrics import GatewayMetrics
from defer.serving.pool import Chain

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "defer-gateway.json"


def _metrics() -> tuple[GatewayMetrics, list[Chain]]:
    chains = [Chain(index=i, dispatcher=None, window=8) for i in range(2)]
    return GatewayMetrics(chains, name="m", version="0"), chains


def _samples(metrics: GatewayMetrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_failovers_and_rejoins_follow_the_stable_state():
    metrics, (_, chain) = _metrics()
    walk = ["recovering", "running",  # a spare took over: no failover
            "recovering", "failed",   # no spare left: one failover
            "recovering", "failed",   # a probe found the node still down: nothing
            "recovering", "running"]  # the node is back: one rejoin
    state = "running"
    for new in walk:
        metrics.chain_state(chain, state, new)
        state = new
    metrics.chain_recovered(chain, [{"stage": 1}])
    values = _samples(metrics)
    assert values[("defer_failovers_total", (("chain", "1"),))] == 1
    assert values[("defer_chain_rejoins_total", (("chain", "1"),))] == 1
    assert values[("defer_chain_recoveries_total", (("chain", "1"),))] == 1
    assert values[("defer_failovers_total", (("chain", "0"),))] == 0
    assert values[("defer_chain_state", (("chain", "1"), ("defer_chain_state", "running")))] == 1
    assert values[("defer_chain_state", (("chain", "1"), ("defer_chain_state", "failed")))] == 0


def test_dashboard_queries_only_exported_metrics():
    metrics, chains = _metrics()
    metrics.answered("http", "ok", 0.01)
    metrics.batch_size.observe(3)
    exported = {name for name, _ in _samples(metrics)}
    # the nodes' families (defer serve --http-port), with the suffixes their samples take
    node_source = (DASHBOARD.parent.parent.parent / "defer" / "runtime" / "http.py").read_text()
    exported |= {family + suffix for family in re.findall(r'"(defer_[a-z_]+)"', node_source)
                 for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"\bdefer_[a-z_]+", target["expr"])}
    queried |= set(re.findall(r"\bdefer_[a-z_]+",
                              json.dumps(dashboard["templating"])))
    assert queried and queried <= exported, sorted(queried - exported)
