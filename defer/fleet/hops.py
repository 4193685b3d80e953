"""A node's CPU per hop, measured by `defer profile` over the node's probe connection.

Besides its engine, a stage's node spends CPU on every request it passes on: framing, socket
copies, its event loop. On a slow device that is a real share of the stage (ResNet50 cut after
its stem moves ~1.4 MB per request through the node), so the planner adds it to each stage on
that node (cluster.json's `hop_cost`, read by defer/compiler/fleet.py):

    enter = per_message_s + per_byte_s x bytes in,   leave = per_byte_s x bytes out

It is read off the node's own CPU clock (STATS `cpu_s`, its process time), before and after:
- SMALL round trips of empty ECHOs (one message in, one out, as a stage per request):
  per_message_s = their CPU / their count;
- TRANSFERS ECHOs carrying `size` bytes to the node, then as many bringing `size` bytes back:
  per_byte_s = their CPU beyond per_message_s each / the bytes moved.
Both are CPU seconds; the planner needs the node's seconds, which are longer where the node
gets less than a core (a cgroup quota, a busy device): they are divided by the share of a
core the node got while it profiled flat out (its CPU over its wall time across the PROFILE
requests, at most 1), the share its op costs were measured at. Both are lower bounds of a
real hop, whose request also crosses the engine thread and is decoded as tensors; they are
what the probe protocol can time without a bundle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from defer.runtime.protocol import Stats

if TYPE_CHECKING:
    from defer.runtime.probe import Probe

log = logging.getLogger(__name__)

SMALL = 30
TRANSFERS = 4
SIZE = 1 << 20


async def measure_hop_cost(probe: Probe, timeout: float, share: float = 1.0,
                           size: int = SIZE) -> dict | None:
    """{"per_message_s", "per_byte_s"} of the node behind `probe`, in its seconds at `share`
    of a core (`core_share`); None if its STATS carry no CPU clock (then the planner prices
    no hop cost for it)."""
    start = await _cpu(probe, timeout)
    if start is None:
        log.info("node %s reports no cpu_s in STATS: no hop cost measured", probe.address)
        return None
    for _ in range(SMALL):
        await probe.transfer(timeout=timeout)
    small = await _cpu(probe, timeout)
    for _ in range(TRANSFERS):
        await probe.transfer(up=size, timeout=timeout)
    for _ in range(TRANSFERS):
        await probe.transfer(down=size, timeout=timeout)
    moved = await _cpu(probe, timeout)
    per_message = max(small - start, 0.0) / SMALL
    beyond = (moved - small) - 2 * TRANSFERS * per_message
    per_byte = max(beyond, 0.0) / (2 * TRANSFERS * size)
    log.info("node %s: a hop costs it %.3f ms per message + %.3f ns per byte of CPU, at %.2f "
             "of a core", probe.address, per_message * 1e3, per_byte * 1e9, share)
    return {"per_message_s": per_message / share, "per_byte_s": per_byte / share,
            "core_share": share}


async def clock(probe: Probe, timeout: float) -> tuple[float, float] | None:
    """(CPU seconds, wall seconds) of the node's process now, from its STATS, or None."""
    counters = await _counters(probe, timeout)
    cpu, wall = counters.get("cpu_s"), counters.get("wall_s")
    if isinstance(cpu, int | float) and isinstance(wall, int | float):
        return float(cpu), float(wall)
    return None


def core_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float:
    """The share of a core a node got between two `clock` readings (in (0, 1]; 1 unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return 1.0
    return min(1.0, max((after[0] - before[0]) / (after[1] - before[1]), 1e-3))


async def _cpu(probe: Probe, timeout: float) -> float | None:
    value = (await _counters(probe, timeout)).get("cpu_s")
    return float(value) if isinstance(value, int | float) else None


async def _counters(probe: Probe, timeout: float) -> dict:
    reply = await probe.ask(Stats(), timeout)
    counters = getattr(reply, "counters", None)
    return counters if isinstance(counters, dict) else {}
