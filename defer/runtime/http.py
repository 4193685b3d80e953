"""A node's HTTP side (`defer serve --http-port P`): health for orchestrators, metrics for
Prometheus. Served by the standard library's HTTP server on one thread the node owns and joins.

    GET /health/live    200 while the process serves (liveness)
    GET /health/ready   200 once a bundle is loaded, else 503 (readiness): JSON either way
    GET /metrics        Prometheus text (needs prometheus-client: the `[metrics]` extra)

Metrics are read from the node's counters when scraped, so the per-request path pays nothing
for them but one histogram bucket increment. Names follow Prometheus conventions: base units
in the name, `_total` for counters; `stage` labels every series with the node's stage.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from defer.errors import StartupError

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[str, Any]]


class NodeHTTP:
    """The HTTP server of one node. `snapshot()` returns the node's STATS counters plus
    `ready` (bundle loaded) and `bundle` (its sha256)."""

    def __init__(self, host: str, port: int, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._registry = _registry(snapshot)
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as err:
            raise StartupError(f"cannot listen for HTTP on {host}:{port}: "
                               f"{err.strerror or err}; pick another --http-port") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="defer-node-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/health/live":
            return 200, "application/json", b'{"live": true}'
        if path == "/health/ready":
            stats = self.snapshot()
            body = json.dumps({"ready": stats["ready"], "bundle": stats["bundle"],
                               "stage": stats["stage"]}).encode()
            return (200 if stats["ready"] else 503), "application/json", body
        if path == "/metrics":
            if self._registry is None:
                return (501, "text/plain", b"node metrics need prometheus-client: "
                        b"pip install 'defer-edge[metrics]'\n")
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found: try /health/live, /health/ready or /metrics\n"


def _handler(owner: NodeHTTP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            status, kind, body = owner.respond(self.path.split("?", 1)[0])
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s: " + format, self.address_string(), *args)

    return Handler


def _registry(snapshot: Snapshot):
    """A registry whose one collector turns a STATS snapshot into metric families; None when
    prometheus-client is not installed."""
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
    except ImportError:
        return None

    class NodeCollector:
        def collect(self) -> Iterator[Any]:
            s = snapshot()
            stage = [str(s["stage"]) if s["stage"] is not None else "none"]

            def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
                family = CounterMetricFamily(name, doc, labels=["stage"])
                family.add_metric(stage, value)
                return family

            def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
                family = GaugeMetricFamily(name, doc, labels=["stage"])
                family.add_metric(stage, value)
                return family

            yield counter("defer_stage_requests", "Requests this stage computed.", s["requests"])
            yield counter("defer_stage_errors", "Requests that failed at this stage.",
                          s["errors"])
            yield counter("defer_stage_busy_seconds", "Seconds the engine spent computing; "
                          "rate() of it is the busy fraction.", s["busy_s"])
            yield counter("defer_stage_decode_seconds", "Seconds spent decoding arriving "
                          "tensors (codec time in).", s["decode_s"])
            yield counter("defer_stage_encode_seconds", "Seconds spent encoding leaving "
                          "tensors (codec time out).", s["encode_s"])
            yield counter("defer_node_cpu_seconds", "CPU seconds of the node process.",
                          s["cpu_s"])
            yield gauge("defer_stage_queue_depth", "Requests waiting for the engine.",
                        s["queue_depth"])
            yield gauge("defer_stage_send_queue_depth", "Results waiting to be sent.",
                        s["send_queue_depth"])
            yield gauge("defer_node_connections", "Open connections.", s["connections"])
            yield counter("defer_node_refused_connections", "Connections closed for a bad "
                          "HELLO, token or frame, or over the limit.", s["refused"])
            yield counter("defer_node_heartbeats_missed", "Peers dropped for staying silent "
                          "past 3 heartbeat intervals.", s["heartbeats_missed"])
            yield gauge("defer_node_ready", "1 once a bundle is loaded.", float(s["ready"]))
            hop = CounterMetricFamily("defer_hop_bytes", "Tensor bytes through this node, by "
                                      "direction and codec.", labels=["stage", "direction",
                                                                      "codec"])
            for direction in ("in", "out"):
                for codec, count in s[f"bytes_{direction}"].items():
                    hop.add_metric([*stage, direction, codec], count)
            yield hop
            yield counter("defer_hop_raw_bytes", "What the bytes sent would be with the raw "
                          "codec.", s["raw_out"])
            histogram = HistogramMetricFamily("defer_stage_compute_seconds", "Engine time per "
                                              "request.", labels=["stage"])
            bounds, counts = s["compute_histogram"]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, bounds), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            histogram.add_metric(stage, buckets, s["busy_s"])
            yield histogram

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector())
    return registry
