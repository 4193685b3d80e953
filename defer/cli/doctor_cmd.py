"""`defer doctor`: a shell over defer.fleet.doctor. Prints one line per check (every problem
names its node or link) and exits 0 when the chain can start, 1 when it cannot (or, with
--strict, when anything is off), 2 for bad input."""

from __future__ import annotations

from pathlib import Path

import click

from defer.cli.common import heartbeat_option, resolve_token, tls_ca_option, token_options
from defer.errors import NodeError
from defer.fleet.doctor import OK, DoctorOptions, DoctorReport

_DEFAULTS = DoctorOptions()


@click.command("doctor")
@click.option("--manifest", "manifest_path", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="manifest.json, or the bundle folder holding it.")
@click.option("--nodes", required=True, metavar="H:P,H:P,...",
              help="Node addresses in stage order, comma-separated, as for `defer dispatch`.")
@token_options
@tls_ca_option
@click.option("--timeout", type=float, default=_DEFAULTS.timeout, show_default=True,
              help="Seconds to connect, finish HELLO, or answer one request.")
@click.option("--links/--no-links", default=_DEFAULTS.links, show_default=True,
              help="Time the chain's links (dispatcher -> first node, node -> next node, "
                   "last node -> dispatcher) against the plan.")
@heartbeat_option
@click.option("--strict", is_flag=True,
              help="Exit 1 on warnings too (a link slower than planned, another defer "
                   "version).")
@click.option("--problems-only", is_flag=True, help="Print only the lines that are not ok.")
def doctor_command(manifest_path: Path, nodes: str, token: str | None, token_file: Path | None,
                   strict: bool, problems_only: bool, **fields) -> None:
    """Check that a compiled chain can start on these nodes: each is reachable and
    authenticated with the same protocol, can run and hold its stage, serves its bundle or
    can be sent it, answers heartbeats in time; and each link carries what the plan assumed.

    Exit 0 when the chain can start, 1 when it cannot, 2 for bad input."""
    from defer.address import parse_address_list
    from defer.fleet.doctor import check_chain
    from defer.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    addresses = parse_address_list(nodes)
    options = DoctorOptions(token=resolve_token(token, token_file), **fields)
    report = check_chain(manifest, addresses, options)
    click.echo(render_report(report, problems_only))
    errors = sum(f.status == "error" for f in report.findings)
    warnings = len(report.problems) - errors
    if not report.can_start:
        raise NodeError(f"the chain cannot start: {errors} problem(s), {warnings} warning(s) "
                        "(above)")
    if strict and warnings:
        raise NodeError(f"--strict: {warnings} warning(s) (above)")
    click.echo(f"the chain can start on these {len(addresses)} nodes"
               + (f" ({warnings} warning(s) above)" if warnings else ""))


def render_report(report: DoctorReport, problems_only: bool = False) -> str:
    """One line per finding: stage, node or link, check, status, detail."""
    rows = [f for f in report.findings if not problems_only or f.status != OK]
    width = max([len(f.where) for f in rows] + [4])
    lines = [f"{'stage':<5} {'node':<{width}} {'check':<9} {'status':<7} detail"]
    for f in rows:
        stage = "-" if f.stage is None else str(f.stage)
        status = f.status if f.status == OK else f.status.upper()
        lines.append(f"{stage:<5} {f.where:<{width}} {f.check:<9} {status:<7} {f.detail}")
    return "\n".join(lines)
