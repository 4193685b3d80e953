"""Bounds and field checkers of the wire protocol: every metadata field is checked by one of
these on decode; each returns the value (normalised) or raises ProtocolError, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defer.address import parse_address
from defer.errors import ProtocolError, UsageError

MAGIC = b"DEFR"
PROTOCOL_VERSION = 1
ALIGN = 8  # metadata and every payload segment are padded to this, so tensors land aligned
MAX_DIMS = 16
MAX_NAME = 1024


@dataclass(frozen=True)
class Limits:
    """Upper bounds the decoder enforces (and the encoder respects) on every frame."""

    metadata: int = 64 * 1024
    tensor: int = 256 * 1024 * 1024
    frame: int = 1024 * 1024 * 1024
    segments: int = 4096


DEFAULT_LIMITS = Limits()
# Before a peer has authenticated it may send HELLO frames only: a few kilobytes, no payload.
HANDSHAKE_LIMITS = Limits(metadata=4096, tensor=0, frame=4096, segments=0)
# "probe": `defer profile` / `defer doctor`, or a node measuring its link to another node. A
# probe connection never takes over a node's chain (unlike a second "dispatcher").
ROLES = frozenset({"dispatcher", "upstream", "node", "probe"})
MAX_TEXT = 16 * 1024  # reasons, node ids and other free text


# --- field checkers: each returns the value (normalised) or raises ProtocolError -------------

def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed frame: {what}")


def _int(v: Any, name: str) -> int:
    if type(v) is not int or not 0 <= v < 2**63:
        raise _bad(f"field {name!r} must be a non-negative integer, got {v!r:.60}")
    return v


def _str(v: Any, name: str) -> str:
    if type(v) is not str:
        raise _bad(f"field {name!r} must be a string, got {type(v).__name__}")
    if len(v) > MAX_TEXT:
        raise _bad(f"field {name!r} has {len(v)} characters, over {MAX_TEXT}")
    return v


def _name(v: Any, name: str) -> str:
    v = _str(v, name)
    if not v or len(v) > MAX_NAME:
        raise _bad(f"field {name!r} must have 1..{MAX_NAME} characters")
    return v


def _hex(v: Any, name: str, length: int = 64) -> str:
    v = _str(v, name)
    if len(v) != length or v.strip("0123456789abcdef"):
        raise _bad(f"field {name!r} must be {length} lowercase hex digits")
    return v


def _opt_hex(v: Any, name: str) -> str | None:
    return None if v is None else _hex(v, name)


def _role(v: Any, name: str) -> str:
    if v not in ROLES:
        raise _bad(f"field {name!r} must be one of {sorted(ROLES)}, got {v!r:.40}")
    return v


def _hop(v: Any, name: str) -> str:
    v = _name(v, name)
    if v != "dispatcher":
        try:
            parse_address(v)
        except UsageError:
            raise _bad(f"field {name!r} must be host:port or 'dispatcher', got {v!r:.60}") from None
    return v


def _clock(v: Any, name: str) -> float:
    if type(v) not in (int, float) or not 0 <= v < 1e11:
        raise _bad(f"field {name!r} must be a time in seconds since the epoch, got {v!r:.40}")
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise _bad(f"field {name!r} must be true or false")
    return v


def _name_tuple(v: Any, name: str) -> tuple[str, ...]:
    if type(v) is not list or len(v) > 4096:
        raise _bad(f"field {name!r} must be a list of at most 4096 tensor names")
    names = tuple(_name(x, name) for x in v)
    if len(set(names)) != len(names):
        raise _bad(f"field {name!r} lists a name twice")
    return names


def _opt_dict(v: Any, name: str) -> dict[str, Any] | None:
    if v is not None and type(v) is not dict:
        raise _bad(f"field {name!r} must be an object or null")
    return v


def _seconds(v: Any, name: str) -> float:
    """A duration: a finite number of seconds, 0 <= v < 1e6."""
    if type(v) not in (int, float) or not 0 <= v < 1e6:
        raise _bad(f"field {name!r} must be a duration in seconds (0 to 1e6), got {v!r:.40}")
    return float(v)


def _address(v: Any, name: str) -> str:
    """host:port (not 'dispatcher')."""
    v = _hop(v, name)
    if v == "dispatcher":
        raise _bad(f"field {name!r} must be host:port")
    return v
