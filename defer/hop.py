"""The CPU a device spends moving activations through a hop, as the planner prices it.

A node receiving a request, handing it to its engine thread and sending the result on spends
CPU beyond the engine: framing, socket reads and writes, copies, queue hand-offs. It grows with
the bytes moved and has a fixed part per message. `HopCost` is that line:

    per_message_s + recv_per_byte_s * bytes in + send_per_byte_s * bytes out

seconds of CPU per request on the device. `hop_cut_costs` turns it into the partitioner's
`enter`/`leave` vectors (seconds added to a stage starting / ending at each cut), the one place
where a hop is priced: local compiles (`CompileOptions.hop_cost`) and fleet plans (each node's
`hop_cost` in cluster.json, defer/compiler/fleet.py) both go through it.

Where the figure comes from: `defer.calibrate` measures it once per machine with a real node
(trivial bundles, its CPU clock read from outside) and caches it here, at `CACHE_PATH`, keyed by
the machine (CPU model, cores) and the defer version, so a new machine or data path measures
again. This module only reads and writes that file; it imports neither the compiler
nor the runtime.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_PATH = Path("~/.cache/defer/hop_cost.json")
CACHE_VERSION = 1


@dataclass(frozen=True)
class HopCost:
    """Seconds of a device's CPU per request (fixed) and per byte received / sent."""

    per_message_s: float = 0.0
    recv_per_byte_s: float = 0.0
    send_per_byte_s: float = 0.0
    source: str = "given"

    def __post_init__(self) -> None:
        for name in ("per_message_s", "recv_per_byte_s", "send_per_byte_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"hop cost {name}={value!r}: give a number >= 0")

    def seconds(self, bytes_in: float, bytes_out: float) -> float:
        """CPU seconds of one request that brings `bytes_in` and sends `bytes_out`."""
        return (self.per_message_s + self.recv_per_byte_s * bytes_in
                + self.send_per_byte_s * bytes_out)

    def scaled(self, factor: float) -> HopCost:
        """The same hop on a device `factor` times as slow."""
        return HopCost(self.per_message_s * factor, self.recv_per_byte_s * factor,
                       self.send_per_byte_s * factor, self.source)

    def describe(self) -> str:
        return (f"{self.per_message_s * 1e3:.3f} ms per request + "
                f"{self.recv_per_byte_s * 1e9:.3f} ms/MB received + "
                f"{self.send_per_byte_s * 1e9:.3f} ms/MB sent ({self.source})")

    def to_dict(self) -> dict[str, Any]:
        """cluster.json's `hop_cost` form (per_byte_s: the mean of both sides, for readers
        that know only one per-byte figure)."""
        return {**asdict(self),
                "per_byte_s": (self.recv_per_byte_s + self.send_per_byte_s) / 2}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "cluster.json") -> HopCost:
        """From cluster.json's `hop_cost`: `per_message_s`, and `recv_per_byte_s` /
        `send_per_byte_s` or one `per_byte_s` for both sides (missing: 0). ValueError if
        malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"hop cost {data!r:.60}: expected an object")
        both = float(data.get("per_byte_s", 0.0))
        return cls(float(data.get("per_message_s", 0.0)),
                   float(data.get("recv_per_byte_s", both)),
                   float(data.get("send_per_byte_s", both)), data.get("source", source))


def hop_cut_costs(cut_bytes: np.ndarray, hop: HopCost | None) -> tuple[np.ndarray, np.ndarray]:
    """((N+1,) enter, (N+1,) leave): a stage starting at cut a pays the fixed cost and the
    bytes crossing a received; one ending at cut b pays the bytes crossing b sent."""
    cut_bytes = np.asarray(cut_bytes, dtype=float)
    if hop is None:
        return np.zeros_like(cut_bytes), np.zeros_like(cut_bytes)
    return (hop.per_message_s + hop.recv_per_byte_s * cut_bytes,
            hop.send_per_byte_s * cut_bytes)


def machine_key() -> str:
    """What the cached figure belongs to: CPU model, cores, defer version."""
    from defer import __version__

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cpus | defer {__version__}"


def cached(path: Path | None = None) -> HopCost | None:
    """This machine's calibrated hop cost, or None (never measured here, or stale)."""
    path = (path or CACHE_PATH).expanduser()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("machine") != machine_key():
            return None
        return HopCost.from_dict(data["hop_cost"], "calibrated on this machine")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring %s (%s); it will be measured again", path, err)
        return None


def save(hop: HopCost, path: Path | None = None, **facts: Any) -> Path:
    """Cache `hop` as this machine's (with `facts` about the measurement); the path."""
    path = (path or CACHE_PATH).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "machine": machine_key(),
                               "hop_cost": asdict(hop), **facts}, indent=2) + "\n")
    tmp.replace(path)
    return path
