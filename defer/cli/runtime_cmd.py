"""`defer serve`, `defer dispatch` and `defer run`: shells over defer.runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

READY_PREFIX = "defer node listening on"


@click.command("serve")
@click.argument("bundle", required=False, type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the node to the network).")
@click.option("--port", type=int, default=7000, show_default=True,
              help="Port to listen on; 0 picks a free one (printed in the ready line).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--cpu", type=int, default=None,
              help="Pin this node to core K (os.sched_setaffinity).  [default: no pinning]")
def serve(bundle: Path | None, host: str, port: int, threads: int, cpu: int | None) -> None:
    """Serve one stage BUNDLE; without it, wait for the dispatcher to push one.

    Once listening, prints one line to stdout: `defer node listening on HOST:PORT`.
    SIGINT/SIGTERM drain in-flight requests and exit 0.
    """
    from defer.runtime.node import NodeConfig, run_node

    def ready(bound_host: str, bound_port: int) -> None:
        click.echo(f"{READY_PREFIX} {bound_host}:{bound_port}")
        sys.stdout.flush()

    run_node(NodeConfig(host=host, port=port, bundle=bundle, threads=threads, cpu=cpu), ready)


COMMANDS = [serve]
