"""Options several commands share: the token (`--token`, `--token-file`, DEFER_TOKEN) and the
heartbeat. Each is declared once here so every command shows the same help and default."""

from __future__ import annotations

from pathlib import Path

import click

from defer.errors import UsageError
from defer.runtime.options import DEFAULT_HEARTBEAT

TOKEN_HELP = ("Shared secret: peers prove they hold it (HMAC challenge-response in HELLO; it "
              "never crosses the wire). Prefer DEFER_TOKEN or --token-file: options show in "
              "`ps`.")
HEARTBEAT_HELP = ("Seconds between heartbeats on an idle connection; a peer silent for 3 of "
                  "its intervals is dead (0 = no heartbeats).")


def token_options(func):
    """Add --token (or DEFER_TOKEN) and --token-file (or DEFER_TOKEN_FILE, e.g. a systemd
    credential); the command receives one `token` argument (None = no authentication)."""
    func = click.option("--token-file", envvar="DEFER_TOKEN_FILE", show_envvar=True,
                        type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Read the token from this file (its first line).  "
                             "[default: none]")(func)
    return click.option("--token", envvar="DEFER_TOKEN", show_envvar=True, default=None,
                        help=TOKEN_HELP + "  [default: none, no authentication]")(func)


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token or --token-file (not both); UsageError names the problem."""
    if token_file is None:
        return token or None
    if token:
        raise UsageError("give the token once: --token/DEFER_TOKEN or --token-file, not both")
    try:
        lines = token_file.read_text().splitlines()
    except OSError as err:
        raise UsageError(f"cannot read --token-file {token_file}: {err}") from None
    if not lines or not lines[0].strip():
        raise UsageError(f"--token-file {token_file} is empty; put the token on its first line")
    return lines[0].strip()


def heartbeat_option(func):
    return click.option("--heartbeat", type=float, default=DEFAULT_HEARTBEAT, show_default=True,
                        help=HEARTBEAT_HELP)(func)


def tls_ca_option(func):
    """--tls-ca for commands that connect to nodes (profile, doctor)."""
    return click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False,
                                                    path_type=Path),
                        default=None, help="Connect to nodes with TLS, verifying them against "
                                           "this CA or self-signed certificate (PEM).  "
                                           "[default: plain TCP]")(func)


HOP_COST_HELP = ("Price the CPU a device spends per hop (per request, per byte in and out): "
                 "auto = measured once on this machine with a real node (~15 s, cached in "
                 "~/.cache/defer/hop_cost.json) and divided by --speeds like the ops; none = "
                 "hops cost no CPU. With --cluster, each node's own hop_cost from "
                 "cluster.json.")


def hop_cost_option(func):
    return click.option("--hop-cost", "hop_cost", type=click.Choice(["auto", "none"]),
                        default="auto", show_default=True, help=HOP_COST_HELP)(func)


def machine_hop_cost(choice: str = "auto"):
    """The HopCost to plan with: this machine's (measured now, once, if not cached), or None."""
    from defer import hop

    if choice == "none":
        return None
    cached = hop.cached()
    if cached is not None:
        return cached
    from defer import calibrate, progress

    click.echo(f"measuring this machine's hop cost once (cached in {hop.CACHE_PATH})",
               err=True)
    with progress.reporting(progress.TerminalReporter(prefix="calibrate: ")):
        measured = calibrate.machine_hop_cost()
    click.echo(f"hop cost: {measured.describe()}", err=True)
    return measured


MEASURED_FILE = "measured.json"


def record_measured(manifest, throughput: float, command: str, nodes: int) -> None:
    """Keep the last measured throughput beside the manifest, for `defer inspect`."""
    import contextlib
    import json
    import time

    if manifest.path is None:
        return
    record = {"throughput": throughput, "command": command, "nodes": nodes,
              "predicted": manifest.plan.get("throughput"),
              "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):  # a read-only bundle folder: inspect shows the plan only
        (manifest.path.parent / MEASURED_FILE).write_text(json.dumps(record, indent=2) + "\n")


def predicted_vs_measured(plan: dict, measured: float | None) -> str:
    """One line: the plan's predicted throughput beside the measured one."""
    predicted = plan.get("throughput")
    if not predicted:
        return "plan: no predicted throughput"
    if measured is None:
        return f"predicted {predicted:.2f} inf/s; not measured yet (defer dispatch / defer run)"
    return (f"predicted {predicted:.2f} inf/s, measured {measured:.2f} inf/s "
            f"({measured / predicted:.0%} of predicted)")
