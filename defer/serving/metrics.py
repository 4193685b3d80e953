"""The gateway's Prometheus metrics (prometheus-client), served on `--metrics-port` at /metrics.

Names follow Prometheus conventions: a `defer_` prefix, units in the name, `_total` counters.

    defer_requests_total{protocol,outcome}          inference requests answered; outcome is ok,
                                                    bad_request, not_found, unavailable, timeout
                                                    or error (throughput: rate(...[1m]))
    defer_request_duration_seconds{protocol}        histogram: request received -> answered
    defer_requests_in_flight                        requests received and not yet answered
    defer_chain_state{chain,defer_chain_state}      1 for the chain's current state (an enum)
    defer_chain_requests_in_flight{chain}           requests submitted to the chain, unanswered
    defer_chain_requests_total{chain,outcome}       attempts on the chain: ok or failed
    defer_chain_request_duration_seconds{chain}     histogram: submitted to the chain -> result
    defer_failovers_total{chain}                    times the chain failed with no spare left,
                                                    so its requests moved to other chains
    defer_replays_total{chain}                      requests replayed elsewhere after the chain
                                                    lost them
    defer_chain_recoveries_total{chain}             lost stages the chain's own spares took over
    defer_chain_rejoins_total{chain}                times a failed chain came back
    defer_batch_size                                histogram: requests per batch (--max-batch)
    defer_gateway_info{name,version,chains}         1; what the gateway serves

Each gateway builds its own CollectorRegistry, so several can live in one process (tests).
Node-side metrics (per stage and hop) come from `defer serve --metrics-port`, not from here.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import make_asgi_app

from defer.serving.pool import Chain, Observer

STATES = ["setup", "running", "recovering", "failed", "closed"]
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                   10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class GatewayMetrics(Observer):
    """Every metric of one gateway, in its own registry."""

    def __init__(self, chains: list[Chain], *, name: str, version: str) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("defer_requests", "Inference requests answered, by protocol "
                                "and outcome.", ["protocol", "outcome"], registry=registry)
        self.duration = Histogram("defer_request_duration_seconds", "Time from receiving an "
                                  "inference request to answering it.", ["protocol"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("defer_requests_in_flight", "Inference requests received and "
                               "not yet answered.", registry=registry)
        self.state_enum = Enum("defer_chain_state", "Current state of each chain.", ["chain"],
                                states=STATES, registry=registry)
        self.chain_in_flight = Gauge("defer_chain_requests_in_flight", "Requests submitted to "
                                     "a chain and not yet answered.", ["chain"],
                                     registry=registry)
        self.chain_requests = Counter("defer_chain_requests", "Attempts on a chain, by outcome "
                                      "(ok, or failed and replayed).", ["chain", "outcome"],
                                      registry=registry)
        self.chain_duration = Histogram("defer_chain_request_duration_seconds", "Time from "
                                        "submitting a request to a chain to its result.",
                                        ["chain"], buckets=LATENCY_BUCKETS, registry=registry)
        self.failovers = Counter("defer_failovers", "Times a chain failed with no spare left, "
                                 "so its requests moved to other chains.", ["chain"],
                                 registry=registry)
        self.replays = Counter("defer_replays", "Requests replayed on another chain after this "
                               "chain lost them.", ["chain"], registry=registry)
        self.recoveries = Counter("defer_chain_recoveries", "Lost stages the chain's spares "
                                  "took over.", ["chain"], registry=registry)
        self.rejoins = Counter("defer_chain_rejoins", "Times a failed chain came back.",
                               ["chain"], registry=registry)
        self.batch_size = Histogram("defer_batch_size", "Requests grouped into one batch.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        Info("defer_gateway", "What this gateway serves.", registry=registry).info(
            {"name": name, "version": version, "chains": str(len(chains))})
        self._stable: dict[int, str] = {}  # last running-or-failed state seen, per chain
        for chain in chains:
            label = chain.name
            self._set_state(chain, chain.state)
            self.chain_in_flight.labels(label).set_function(lambda c=chain: c.in_flight)
            for metric in (self.failovers, self.replays, self.recoveries, self.rejoins,
                           self.chain_duration):
                metric.labels(label)  # exported as 0 from the start, not absent
            for outcome in ("ok", "failed"):
                self.chain_requests.labels(label, outcome)

    def asgi_app(self) -> Any:
        return make_asgi_app(self.registry)

    def answered(self, protocol: str, outcome: str, seconds: float) -> None:
        self.requests.labels(protocol, outcome).inc()
        self.duration.labels(protocol).observe(seconds)

    def _set_state(self, chain: Chain, state: str) -> None:
        if state in STATES:
            self.state_enum.labels(chain.name).state(state)

    # --- Observer ----------------------------------------------------------------------------

    def chain_state(self, chain: Chain, old: str, new: str) -> None:
        # running -> (recovering ->) failed is a failover; failed -> (recovering ->) running a
        # rejoin; recovering between two equal states (a spare took over, a probe failed) is
        # neither.
        self._set_state(chain, new)
        stable = self._stable.get(chain.index, "running")
        if new in ("running", "failed") and new != stable:
            (self.failovers if new == "failed" else self.rejoins).labels(chain.name).inc()
            self._stable[chain.index] = new

    def chain_recovered(self, chain: Chain, records: list[dict[str, Any]]) -> None:
        self.recoveries.labels(chain.name).inc(len(records))

    def attempt(self, chain: Chain, started: float, ended: float, ok: bool,
                request_id: int) -> None:
        self.chain_requests.labels(chain.name, "ok" if ok else "failed").inc()
        if ok:
            self.chain_duration.labels(chain.name).observe(ended - started)

    def replay(self, chain: Chain) -> None:
        self.replays.labels(chain.name).inc()
