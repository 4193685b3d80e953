"""A node's CPU per hop, measured by `defer profile` over the node's probe connection, for a
node that did not calibrate and announce its own (`defer serve --hop-cost auto`, defer/hop.py).

Besides its engine, a stage's node spends CPU on every request it passes on: framing, socket
copies, its event loop. On a slow device that is a real share of the stage (ResNet50 cut after
its stem moves ~1.4 MB per request through the node), so the planner adds it to each stage on
that node (cluster.json's `hop_cost`, a `HopCost`, priced by defer/compiler/fleet.py).

It is read off the node's own CPU clock (STATS `cpu_s`, its process time), before and after:
- SMALL round trips of empty ECHOs (one message in, one out, as a stage per request):
  per_message_s = their CPU / their count;
- TRANSFERS ECHOs carrying `size` bytes to the node (recv_per_byte_s), then as many bringing
  `size` bytes back (send_per_byte_s): their CPU beyond per_message_s each / the bytes moved.
These are CPU seconds; the planner needs the node's seconds, which are longer where the node
gets less than a core (a cgroup quota, a busy device): they are divided by the share of a
core the node got while it profiled flat out (its CPU over its wall time across the PROFILE
requests, at most 1), the share its op costs were measured at. They are lower bounds of a
real hop, whose request also crosses the engine thread and is decoded as tensors: what the
probe protocol can time without a bundle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from defer.hop import HopCost
from defer.runtime.protocol import Stats

if TYPE_CHECKING:
    from defer.runtime.probe import Probe

log = logging.getLogger(__name__)

SMALL = 30
TRANSFERS = 4
SIZE = 1 << 20


async def measure_hop_cost(probe: Probe, timeout: float, share: float = 1.0,
                           size: int = SIZE) -> dict | None:
    """cluster.json's `hop_cost` (a HopCost's dict, plus `core_share`) of the node behind
    `probe`, in its seconds at `share` of a core; None if its STATS carry no CPU clock (then
    the planner prices no hop cost for it)."""
    start = await _cpu(probe, timeout)
    if start is None:
        log.info("node %s reports no cpu_s in STATS: no hop cost measured", probe.address)
        return None
    for _ in range(SMALL):
        await probe.transfer(timeout=timeout)
    small = await _cpu(probe, timeout)
    for _ in range(TRANSFERS):
        await probe.transfer(up=size, timeout=timeout)
    received = await _cpu(probe, timeout)
    for _ in range(TRANSFERS):
        await probe.transfer(down=size, timeout=timeout)
    sent = await _cpu(probe, timeout)
    per_message = max(small - start, 0.0) / SMALL

    def per_byte(cpu: float) -> float:
        return max(cpu - TRANSFERS * per_message, 0.0) / (TRANSFERS * size)

    hop = HopCost(per_message, per_byte(received - small), per_byte(sent - received),
                  f"defer profile: timed transfers at {share:.2f} of a core")
    log.info("node %s: a hop costs it %s", probe.address, hop.describe())
    return {**hop.scaled(1 / share).to_dict(), "core_share": share}


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
