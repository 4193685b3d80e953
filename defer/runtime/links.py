"""Measuring one directed link: timed transfers of a few sizes over an open, authenticated
connection, reduced to a bandwidth and a round-trip time.

`time_link(transfer)` takes the round trip of one transfer as a coroutine (`transfer(n)`: n
payload bytes one way, a small reply the other, in seconds) and times:
- plain round trips (0 bytes): their median is the link's RTT;
- growing payloads (64 KiB, x4 each time) until one takes `seconds` or reaches `max_size`:
  the size S where the link, not the fixed costs, dominates;
- S/2 and S, twice each more.
`fit_link(samples)` fits time = a + bytes / bandwidth through the samples at S/2 and S, so the
fixed costs (RTT, a token bucket's burst, per-message work) cancel out; if noise makes the
slope useless (loopback: microseconds apart), bandwidth = S / (time(S) - RTT).
`measure_link(source, target)` does it for one directed link between the dispatcher (None)
and nodes (open probes): the dispatcher times its links to and from each node, and a node its
link to another node (LINK_TEST), so every link is timed by the same code over the same kind
of authenticated socket.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from defer.errors import NodeError
from defer.runtime.protocol import LinkResult, LinkTest

if TYPE_CHECKING:
    from defer.runtime.probe import Probe

FIRST_SIZE = 64 << 10
GROWTH = 4
ROUND_TRIPS = 5
DEFAULT_MAX_SIZE = 16 << 20
DEFAULT_SECONDS = 0.2

Sample = tuple[int, float]  # (payload bytes, round-trip seconds)


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth: float  # bytes/s
    rtt: float  # seconds

    def __str__(self) -> str:
        return f"{self.bandwidth * 8 / 1e6:.1f} Mbit/s, RTT {self.rtt * 1e3:.2f} ms"


async def time_link(transfer: Callable[[int], Awaitable[float]],
                    max_size: int = DEFAULT_MAX_SIZE,
                    seconds: float = DEFAULT_SECONDS) -> list[Sample]:
    """Timed transfers over one link (see the module docstring), as (bytes, seconds)."""
    samples = [(0, await transfer(0)) for _ in range(ROUND_TRIPS)]
    size = min(FIRST_SIZE, max_size)
    while size > 0:
        took = await transfer(size)
        samples.append((size, took))
        if took >= seconds or size >= max_size:
            break
        size = min(size * GROWTH, max_size)
    for n in (size // 2, size) * 2:
        if n > 0:
            samples.append((n, await transfer(n)))
    return samples


def fit_link(samples: list[Sample]) -> LinkEstimate:
    """Bandwidth and RTT from `time_link`'s samples; ValueError if they hold no transfer."""
    rtt = statistics.median([t for n, t in samples if n == 0] or [0.0])
    top = max(n for n, _ in samples)
    if top == 0:
        raise ValueError("no timed transfer among the samples")
    at = {n: statistics.median([t for m, t in samples if m == n]) for n in (top // 2, top)
          if any(m == n for m, _ in samples)}
    half = top // 2
    if half in at and at[top] > at[half] and half > 0:
        slope = (at[top] - at[half]) / (top - half)
        bandwidth = 1.0 / slope
    else:
        bandwidth = top / max(at[top] - rtt, 1e-9)
    # Noise on a fast link can make the slope steeper than the plain rate: never report more
    # than what the largest transfer alone shows beyond its round trip.
    ceiling = top / max(at[top] - rtt, 1e-9)
    return LinkEstimate(min(bandwidth, ceiling) if bandwidth > 0 else ceiling, rtt)


async def measure_link(source: Probe | None, target: Probe | None,
                       max_size: int = DEFAULT_MAX_SIZE, seconds: float = DEFAULT_SECONDS,
                       timeout: float = 60.0) -> LinkEstimate:
    """The link `source` -> `target`, each an open probe to a node or None for this process
    (the dispatcher). Node to node, the source node times it (LINK_TEST)."""
    if source is None and target is not None:
        samples = await time_link(lambda n: target.transfer(up=n, timeout=timeout),
                                  max_size, seconds)
    elif target is None and source is not None:
        samples = await time_link(lambda n: source.transfer(down=n, timeout=timeout),
                                  max_size, seconds)
    elif source is not None and target is not None:
        reply = await source.ask(LinkTest(target=target.address, max_size=max_size,
                                          seconds=seconds), timeout)
        if not isinstance(reply, LinkResult) or reply.target != target.address:
            raise NodeError(f"node {source.address} answered LINK_TEST with "
                            f"{reply.TYPE.name}", node=source.address)
        samples = list(reply.samples)
    else:
        raise ValueError("a link needs a node at one end at least")
    try:
        return fit_link(samples)
    except ValueError as err:
        raise NodeError(f"link {source.address if source else 'dispatcher'} -> "
                        f"{target.address if target else 'dispatcher'}: {err}") from None
