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
