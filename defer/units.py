"""Parse human sizes and rates: `100Mbit`, `12.5MB/s`, `512MB`, `1GiB`."""

from __future__ import annotations

import re

from defer.errors import UsageError

_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")
_PREFIX = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "t": 1e12, "T": 1e12}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_bandwidth(text: str) -> float:
    """Bytes per second from `100Mbit`, `100Mbps`, `1Gbit/s`, `12.5MB/s`."""
    match = _NUMBER.match(text)
    unit = match.group(2) if match else ""
    unit = unit[:-2] if unit.endswith("/s") else unit
    factor = None
    if unit.endswith(("bit", "bps")):
        prefix = unit[:-3]
        factor = _PREFIX.get(prefix, _BINARY.get(prefix))
        factor = factor / 8 if factor else None
    elif unit.endswith("B"):
        prefix = unit[:-1]
        factor = _PREFIX.get(prefix, _BINARY.get(prefix))
    if not match or factor is None or float(match.group(1)) <= 0:
        raise UsageError(f"bandwidth {text!r} not understood; use e.g. 100Mbit, 1Gbit or 12.5MB/s")
    return float(match.group(1)) * factor


def parse_size(text: str) -> float:
    """Bytes from `512MB` (decimal), `512MiB` or `512M` (binary), `2GB`, `1e6`."""
    match = _NUMBER.match(text)
    unit = match.group(2) if match else ""
    if unit.endswith("B"):
        prefix = unit[:-1]
        factor = _BINARY.get(prefix, _PREFIX.get(prefix))
    else:
        factor = _BINARY.get(unit.upper() + "i") if unit else 1
    if not match or factor is None or float(match.group(1)) <= 0:
        raise UsageError(f"size {text!r} not understood; use e.g. 512MB, 512MiB or 2GB")
    return float(match.group(1)) * factor


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
