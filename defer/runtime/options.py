"""The runtime's options, one object per command, and the defaults the CLI shows.

`NodeConfig` is how to run a node (`defer serve`), `DispatchOptions` how to drive a chain
(`defer dispatch`, `Dispatcher`). Each is validated once, by `checked()`; the CLI reads its
defaults from these classes, so a default is written in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defer.address import parse_address
from defer.codecs import parse_codec
from defer.errors import UsageError
from defer.runtime.report import DEFAULT_WATTS_PER_CORE

DEFAULT_HEARTBEAT = 0.5  # seconds: a dead or hung peer is noticed within 3 x 0.5 s + a tick
DEFAULT_PORT = 7000


def _check_heartbeat(heartbeat: float) -> None:
    if heartbeat < 0:
        raise UsageError(f"--heartbeat must be >= 0 seconds, got {heartbeat}")


@dataclass(frozen=True)
class NodeConfig:
    """How to run a node. `port=0` picks a free port; `cpu` pins the process to that core.

    `token`: peers must prove they hold it (HMAC challenge-response in HELLO). `tls_cert` +
    `tls_key`: serve TLS. `tls_ca`: verify the next hop's TLS certificate against this CA.
    `heartbeat`: seconds between heartbeats on an idle connection (0 = none). `http_port`:
    serve /health/live, /health/ready and /metrics there (0 = any free port).
    `max_model_size`: the largest model (bytes) the node accepts to profile, announced in its
    HELLO (None = a quarter of the memory available at start; see runtime/probing.py).
    `hop_cost`: the device's CPU per hop (HopCost.to_dict()), announced in HELLO so that
    `defer profile` records it in cluster.json.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    bundle: Path | None = None
    threads: int = 1
    cpu: int | None = None
    queue_size: int = 4
    drain_timeout: float = 10.0
    connect_timeout: float = 10.0
    token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    max_connections: int = 64
    http_port: int | None = None  # health + metrics over HTTP (runtime/http.py); None = off
    max_model_size: int | None = None
    hop_cost: dict[str, Any] | None = None  # this device's, announced in HELLO (defer/hop.py)

    def checked(self) -> NodeConfig:
        if self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        for name, port in (("--port", self.port), ("--http-port", self.http_port)):
            if port is not None and not 0 <= port < 65536:
                raise UsageError(f"{name} {port}: use 1..65535, or 0 for any free port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("TLS needs both --tls-cert and --tls-key")
        if self.queue_size < 1:
            raise UsageError(f"queue_size must be >= 1, got {self.queue_size}")
        _check_heartbeat(self.heartbeat)
        if self.max_model_size is not None and self.max_model_size < 1:
            raise UsageError(f"--max-model-size must be > 0 bytes, got {self.max_model_size}")
        return dataclasses.replace(self, token=self.token or None)


@dataclass(frozen=True)
class DispatchOptions:
    """How a Dispatcher drives a chain. `codec` overrides the manifest's hop codec on every
    hop; `inflight` is the window of requests in flight (default max(8, 2 x stages));
    `timeout` bounds every wait, in seconds; `spares` are idle nodes that take over a lost
    stage; `token`/`tls_ca` authenticate and encrypt; `heartbeat` as for nodes."""

    codec: str | None = None
    inflight: int | None = None
    timeout: float = 30.0
    spares: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    watts_per_core: float = DEFAULT_WATTS_PER_CORE  # assumed, for the energy estimate

    def checked(self, n_stages: int, nodes: list[str]) -> DispatchOptions:
        """These options with `inflight` resolved; UsageError for anything wrong."""
        if len(nodes) != n_stages:
            raise UsageError(f"the manifest has {n_stages} stages but {len(nodes)} nodes were "
                             f"given; pass exactly {n_stages} host:port addresses, in stage order")
        spares = tuple(self.spares)
        for address in [*nodes, *spares]:
            parse_address(address)
        if set(spares) & set(nodes):
            raise UsageError(f"spares {sorted(set(spares) & set(nodes))} are also chain nodes; "
                             "a spare must be an idle node")
        if self.codec is not None:
            parse_codec(self.codec)
        inflight = self.inflight if self.inflight is not None else max(8, 2 * n_stages)
        if inflight < 1:
            raise UsageError(f"inflight must be >= 1, got {inflight}")
        if self.timeout <= 0:
            raise UsageError(f"timeout must be > 0 seconds, got {self.timeout}")
        _check_heartbeat(self.heartbeat)
        return dataclasses.replace(self, inflight=inflight, spares=spares,
                                   token=self.token or None)
