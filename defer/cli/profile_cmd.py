"""`defer profile`: a shell over defer.fleet.profile (nodes time the model's ops; the links
are timed; cluster.json is written atomically, or not at all)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from defer import progress
from defer.cli.common import resolve_token, tls_ca_option, token_options
from defer.cluster import Cluster
from defer.fleet.profile import ProfileOptions
from defer.units import format_bytes

_DEFAULTS = ProfileOptions(nodes=())


@click.command("profile")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--nodes", required=True, metavar="H:P,H:P,...",
              help="Running `defer serve` nodes to profile, comma-separated.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("cluster.json"), show_default=True,
              help="Where to write the fleet's measurements (written only if all went well, "
                   "or with --skip-bad).")
@click.option("--skip-bad", is_flag=True,
              help="Leave out nodes (and links) that fail, instead of writing nothing.")
@token_options
@tls_ca_option
@click.option("--runs", type=int, default=_DEFAULTS.runs, show_default=True,
              help="Timed runs per op on each node (an op's share is its fastest run, scaled "
                   "to the median whole run).")
@click.option("--warmup", type=int, default=_DEFAULTS.warmup, show_default=True,
              help="Untimed runs first.")
@click.option("--batch", type=int, default=_DEFAULTS.batch, show_default=True,
              help="Batch size to profile at (as `defer compile --batch`).")
@click.option("--sequential", is_flag=True,
              help="Profile one node at a time (nodes that share CPUs, e.g. on one machine).  "
                   "[default: all nodes at once]")
@click.option("--links/--no-links", default=_DEFAULTS.links, show_default=True,
              help="Also time every link: dispatcher <-> each node, and each ordered pair of "
                   "nodes.")
@click.option("--link-seconds", type=float, default=_DEFAULTS.link_seconds, show_default=True,
              help="Grow each link's test transfer until one takes this long.")
@click.option("--timeout", type=float, default=_DEFAULTS.timeout, show_default=True,
              help="Seconds a node may take to answer one profile request.")
def profile_command(model: Path, nodes: str, out_path: Path, token: str | None,
                    token_file: Path | None, **fields) -> None:
    """Profile MODEL on running nodes: each times every op with its own engine and threads,
    and every link's bandwidth and round-trip time is measured; writes cluster.json for
    `defer compile --cluster` and `defer plan`.

    A node that is unreachable, too small, dies mid-profile or answers garbage is named on
    one line, and nothing is written unless --skip-bad."""
    from defer.address import parse_address_list
    from defer.fleet.profile import profile_fleet

    options = ProfileOptions(nodes=tuple(parse_address_list(nodes)),
                             token=resolve_token(token, token_file), **fields).checked()
    started = time.perf_counter()
    with progress.reporting(progress.TerminalReporter(prefix="profile: ")):
        cluster = profile_fleet(model, options)
    cluster.save(out_path)
    click.echo(render_cluster(cluster))
    click.echo(f"wrote {out_path} ({len(cluster.nodes)} nodes, {len(cluster.links)} links) in "
               f"{time.perf_counter() - started:.1f} s")


def render_cluster(cluster: Cluster) -> str:
    """The nodes (op time in all, facts) and links (Mbit/s, RTT) of a cluster, as tables."""
    lines = [f"{'node':<24} {'engine':<7} {'threads':>7} {'cores':>5} {'free memory':>12} "
             f"{'all ops':>10}"]
    for node in cluster.nodes:
        lines.append(f"{node.address:<24} {node.engine:<7} {node.threads:>7} {node.cores:>5} "
                     f"{format_bytes(node.memory_free):>12} "
                     f"{1e3 * sum(node.op_costs.values()):>8.2f} ms")
    if cluster.links:
        lines.append(f"{'link':<50} {'Mbit/s':>10} {'RTT ms':>8}")
        for link in cluster.links:
            lines.append(f"{link.source + ' -> ' + link.target:<50} "
                         f"{link.bandwidth * 8 / 1e6:>10.1f} {link.rtt * 1e3:>8.2f}")
    return "\n".join(lines)
