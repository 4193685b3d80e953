"""The gateway's ready line: `defer gateway` prints it on stdout once every port listens and
every chain is wired, `defer gateway listening on http=H:P grpc=H:P metrics=H:P`, and
`defer.local.start_gateway` waits for it. Needs nothing beyond the standard library."""

from __future__ import annotations

from defer.errors import StartupError

READY_PREFIX = "defer gateway listening on "


def ready_line(addresses: dict[str, str]) -> str:
    return READY_PREFIX + " ".join(f"{k}={v}" for k, v in addresses.items())


def parse_ready_line(line: str) -> dict[str, str]:
    """{"http": "H:P", "grpc": "H:P", "metrics": "H:P"}; StartupError for another line."""
    if not line.startswith(READY_PREFIX):
        raise StartupError(f"the gateway printed {line!r}, not its ready line")
    return dict(part.split("=", 1) for part in line[len(READY_PREFIX):].split())
