"""`defer gateway`: a shell over defer.serving.server.run_gateway."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from defer.cli.common import heartbeat_option, resolve_token, token_options
from defer.codecs import CODEC_HELP
from defer.runtime.options import DispatchOptions


def _addresses(text: str, option: str) -> list[str]:
    from defer.address import parse_address_list
    from defer.errors import UsageError

    addresses = parse_address_list(text)
    if not addresses:
        raise UsageError(f"{option} {text!r}: give host:port addresses, comma-separated")
    return addresses


@click.command("gateway")
@click.option("--manifest", "manifest_path", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="manifest.json, or the bundle folder holding it.")
@click.option("--nodes", required=True, metavar="H:P,H:P,...",
              help="The first chain: node addresses in stage order, comma-separated.")
@click.option("--chain", "more_chains", multiple=True, metavar="H:P,H:P,...",
              help="Another chain (a replica of the whole pipeline); repeatable. Requests go "
                   "to the ready chain with the fewest in flight.  [default: none]")
@click.option("--spares", "spare_lists", multiple=True, metavar="H:P,H:P,...",
              help="Idle nodes that take over a lost stage of one chain; repeatable: the first "
                   "--spares is --nodes' chain's, the next the first --chain's, and so on "
                   "('' = none). "
                   "Without a spare left, a failed chain's requests are replayed on another "
                   "chain.  [default: none]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics ports bind (0.0.0.0 exposes them).")
@click.option("--http-port", type=int, default=8000, show_default=True,
              help="Open Inference Protocol over HTTP/REST; 0 picks a free port.")
@click.option("--grpc-port", type=int, default=8001, show_default=True,
              help="Open Inference Protocol over gRPC; 0 picks a free port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True,
              help="Prometheus metrics at /metrics; 0 picks a free port.")
@click.option("--name", default=None,
              help="Model name clients use.  [default: the manifest's model name]")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Group concurrent requests into batches of up to this many samples (needs "
                   "bundles with a dynamic batch dimension; 1 = no batching).")
@click.option("--max-delay-ms", type=float, default=2.0, show_default=True,
              help="With --max-batch: longest a request waits for others to join its batch.")
@click.option("--codec", default=None,
              help=f"Codec on every hop ({CODEC_HELP}).  [default: the manifest's]")
@click.option("--inflight", type=int, default=None,
              help="Requests in flight per chain; more wait in the gateway.  "
                   "[default: max(8, 2 x stages)]")
@click.option("--timeout", type=float, default=DispatchOptions.timeout, show_default=True,
              help="Seconds a request may wait for a chain and for its result.")
@click.option("--probe-interval", type=float, default=1.0, show_default=True,
              help="Seconds between probes of a failed chain (a probe retries its dead node; "
                   "if it is back, the chain rejoins).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every request, and its receive, queue, compute and "
                                 "send on every node and link, as Chrome trace-event JSON here "
                                 "(ui.perfetto.dev, chrome://tracing).  [default: no trace]")
@token_options
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Connect to nodes with TLS, verifying them against this CA "
                                 "or self-signed certificate (PEM).  [default: plain TCP]")
@heartbeat_option
def gateway(manifest_path: Path, nodes: str, more_chains: tuple[str, ...],
            spare_lists: tuple[str, ...], host: str,
            http_port: int, grpc_port: int, metrics_port: int, name: str | None,
            max_batch: int, max_delay_ms: float, codec: str | None, inflight: int | None,
            timeout: float, probe_interval: float, trace_path: Path | None,
            token: str | None, token_file: Path | None, tls_ca: Path | None,
            heartbeat: float) -> None:
    """Serve the Open Inference Protocol (HTTP/REST and gRPC) in front of one or more chains.

    Once every chain is wired and every port listens, prints one line to stdout:
    `defer gateway listening on http=H:P grpc=H:P metrics=H:P`. SIGINT/SIGTERM let requests
    in flight finish, then exit 0; the nodes keep running.
    """
    from defer import progress
    from defer.address import parse_address_list
    from defer.serving.ready import ready_line
    from defer.serving.server import GatewayConfig, run_gateway

    chains = [_addresses(nodes, "--nodes")] + [_addresses(c, "--chain") for c in more_chains]
    spares = [parse_address_list(s) for s in spare_lists]  # "" = this chain has none

    def ready(addresses: dict[str, str]) -> None:
        click.echo(ready_line(addresses))
        sys.stdout.flush()

    config = GatewayConfig(
        manifest=manifest_path, chains=chains, spares=spares, host=host, http_port=http_port,
        grpc_port=grpc_port, metrics_port=metrics_port, name=name, max_batch=max_batch,
        max_delay_ms=max_delay_ms, probe_interval=probe_interval, trace=trace_path,
        dispatch=DispatchOptions(codec=codec, inflight=inflight, timeout=timeout,
                                 token=resolve_token(token, token_file), tls_ca=tls_ca,
                                 heartbeat=heartbeat))
    with progress.reporting(progress.TerminalReporter(prefix="gateway: ")):
        run_gateway(config, ready)
