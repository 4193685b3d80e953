"""Node addresses: the one parser of `host:port`, `[v6]:port` and comma-separated lists.

`parse_address` raises UsageError showing the expected form; the protocol wraps it into a
ProtocolError for addresses that arrive on the wire.
"""

from __future__ import annotations

from defer.errors import UsageError


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); UsageError names the expected form."""
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # a bare IPv6 address is ambiguous: demand brackets
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad node address {address!r}; expected host:port, e.g. "
                         "127.0.0.1:7000 or [::1]:7000")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address_list(text: str | None) -> list[str]:
    """`"h1:p1, h2:p2"` -> the checked addresses, in order; empty text -> []."""
    addresses = [a.strip() for a in (text or "").split(",") if a.strip()]
    for address in addresses:
        parse_address(address)
    return addresses
