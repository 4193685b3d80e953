"""The chains behind the gateway: routing, replay when a chain fails, and probing until it rejoins.

A *chain* is one `Dispatcher` over its own nodes: a whole replica of the pipeline. Every call
into a Dispatcher (submit, wait, state) happens on the gateway's event loop thread, so each
Dispatcher is used from one thread, as it asks.

Routing. A request goes to the *ready* chain (state "running") with the fewest requests in
flight; ties go round the chains in turn. A chain takes at most `window` requests at once (its
Dispatcher's window); when every ready chain is full the request waits in the gateway. With no
running chain, a chain that is "recovering" (rewiring a lost stage to a spare) takes requests:
they wait in its table and go with its replay. With neither, the request fails at once with
`UnavailableError` (HTTP 503, gRPC UNAVAILABLE).

The guarantee: every request the gateway accepts gets exactly one answer -- its outputs, or one
error -- and, while some chain is ready, that answer is its outputs. It rests on the
Dispatcher's own guarantee (defer/runtime/dispatcher.py): each submitted request resolves
exactly once, to its RESULT or an error, and a RESULT arriving after the error is dropped by
request id, never delivered. The gateway holds each request's inputs until it answers. When a
chain fails with no spare left, its Dispatcher fails every pending request at once with a
NodeError; the gateway then submits each of those requests again, to another chain chosen as
above (a chain this request has not tried yet first), and answers from there. So nothing is
lost while a chain is ready, and nothing is answered twice: the failed attempt delivered no
result, and the replay is the only attempt left. A replayed request may be *computed* twice
(partly on the dead chain); that is harmless because every chain runs the same bundles on the
same input. A per-request ERROR from a node is replayed the same way (it is deterministic, so
it will usually fail again, and is then answered with that error). A request is tried at most
chains + 1 times; it is answered with the last error after that, or with UnavailableError as
soon as no chain is ready. Timeouts (`timeout`, waiting for a free chain and for the result)
are answered with DeferTimeoutError and not replayed: the request may still be in a chain.

Probing. A failed chain gets no requests. Every `probe_interval` seconds the gateway submits a
probe (zeros of the model's input shapes) to it; a Dispatcher in FAILED state answers its next
request by retrying the dead node's own address (then any spare left): if the node is back,
the chain is rewired, the probe runs and the chain rejoins (state "running" again, requests
flow to it); if not, the probe fails at once and the chain stays out. A probe's outputs are
thrown away. The state of every chain is also polled every `poll` seconds for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from defer.errors import DeferError, DeferTimeoutError, NodeError
from defer.runtime.dispatcher import Dispatcher, Request
from defer.serving.oip import UnavailableError
from defer.tensors import Sample

log = logging.getLogger(__name__)

def state_name(state: Any) -> str:
    """A Dispatcher's state as a lower-case word, whether it is a string or a sentinel."""
    return str(getattr(state, "name", state)).lower()


@dataclass
class Chain:
    """One replica of the pipeline behind the gateway."""

    index: int
    dispatcher: Dispatcher
    window: int
    in_flight: int = 0
    state: str = "running"
    probing: bool = False
    last_probe: float = 0.0
    recoveries_seen: int = 0

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def nodes(self) -> list[str]:
        return list(self.dispatcher.nodes)

    def refresh(self) -> str:
        self.state = state_name(self.dispatcher.state)
        return self.state


@dataclass
class Answer:
    """A request's outputs and where they came from."""

    outputs: dict[str, np.ndarray]
    chain: int
    attempts: int


class Observer:
    """What the pool tells the metrics and the trace (subclasses override what they need)."""

    def chain_state(self, chain: Chain, old: str, new: str) -> None: ...
    def chain_recovered(self, chain: Chain, records: list[dict[str, Any]]) -> None: ...
    def attempt(self, chain: Chain, started: float, ended: float, ok: bool,
                request_id: int) -> None: ...
    def replay(self, chain: Chain) -> None: ...


class ChainPool:
    """Route requests over chains with replay on failure (see the module docstring)."""

    def __init__(self, dispatchers: list[Dispatcher], probe_inputs: Sample, *,
                 timeout: float = 30.0, probe_interval: float = 1.0, poll: float = 0.1,
                 observers: tuple[Observer, ...] = ()):
        self.chains = [Chain(i, d, d.inflight) for i, d in enumerate(dispatchers)]
        for chain in self.chains:
            chain.refresh()
            chain.recoveries_seen = len(chain.dispatcher.recoveries)
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.poll = poll
        self.probe_inputs = probe_inputs
        self.observers = observers
        self.max_attempts = len(self.chains) + 1
        self._changed = asyncio.Event()  # set (and replaced) whenever a chain may be free
        self._ids = 0
        self._turn = 0

    @property
    def ready(self) -> bool:
        return any(c.state == "running" for c in self.chains)

    def describe(self) -> str:
        return "; ".join(f"chain {c.index} ({','.join(c.nodes)}): {c.state}" for c in self.chains)

    # --- routing and replay ------------------------------------------------------------------

    async def infer(self, inputs: Sample) -> Answer:
        """Run one request on some chain: its outputs, or UnavailableError / the last error."""
        self._ids += 1
        request_id, tried, error = self._ids, set(), None
        for attempt in range(1, self.max_attempts + 1):
            chain = await self._acquire(tried, error)
            tried.add(chain.index)
            started = time.perf_counter()
            try:
                outputs = await self._run(chain, inputs)
            except NodeError as err:
                if isinstance(err, DeferTimeoutError):
                    raise
                error = err
                self._tell("attempt", chain, started, time.perf_counter(), False, request_id)
                self._refresh(chain)
                log.debug("chain %d lost a request (%s); replaying it", chain.index, err)
                self._tell("replay", chain)
                continue
            finally:
                chain.in_flight -= 1
                self._notify()
            self._tell("attempt", chain, started, time.perf_counter(), True, request_id)
            return Answer(outputs, chain.index, attempt)
        raise error

    async def _acquire(self, tried: set[int], error: DeferError | None) -> Chain:
        """The chain for the next attempt; waits while every usable chain is full."""
        deadline = time.monotonic() + self.timeout
        while True:
            for chain in self.chains:
                self._refresh(chain)
            usable = ([c for c in self.chains if c.state == "running"]
                      or [c for c in self.chains if c.state == "recovering"])
            if not usable:
                cause = f" (last: {error})" if error else ""
                raise UnavailableError(f"no chain is ready: {self.describe()}{cause}")
            free = [c for c in usable if c.in_flight < c.window]
            if free:
                self._turn += 1  # ties go round, so one client at a time still uses every chain
                n = len(self.chains)
                chain = min(free, key=lambda c: (c.index in tried, c.in_flight,
                                                 (c.index - self._turn) % n))
                chain.in_flight += 1
                return chain
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeferTimeoutError(f"no chain had room for the request within "
                                        f"{self.timeout:g} s: {self.describe()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _run(self, chain: Chain, inputs: Sample) -> dict[str, np.ndarray]:
        request = chain.dispatcher.submit(inputs)
        outcome = await self._outcome(chain, request)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _outcome(self, chain: Chain, request: Request) -> Any:
        """Wait for a submitted request without ever cancelling it (the Dispatcher owns it):
        its outputs, or the error it failed with."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future = loop.create_future()

        def take() -> None:  # on this loop's thread: the Dispatcher is used from one thread
            try:
                outcome: Any = chain.dispatcher.wait(request)  # done: returns at once
            except DeferError as err:
                outcome = err
            if not settled.done():
                settled.set_result(outcome)

        request.add_done_callback(lambda _: loop.call_soon_threadsafe(take))
        try:
            return await asyncio.wait_for(asyncio.shield(settled), self.timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"chain {chain.index} ({','.join(chain.nodes)}) gave no "
                                    f"result within {self.timeout:g} s") from None

    # --- state, probes -----------------------------------------------------------------------

    def _tell(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    def _notify(self) -> None:
        """Wake every request waiting for a chain: set this event, start a new one."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _refresh(self, chain: Chain) -> None:
        old, new = chain.state, chain.refresh()
        if old != new:
            log.warning("chain %d (%s): %s -> %s", chain.index, ",".join(chain.nodes), old, new)
            self._tell("chain_state", chain, old, new)
        records = chain.dispatcher.recoveries
        if len(records) > chain.recoveries_seen:
            self._tell("chain_recovered", chain, list(records[chain.recoveries_seen:]))
            chain.recoveries_seen = len(records)

    async def watch(self, stop: asyncio.Event, spawn: Callable[[Any], Any]) -> None:
        """Poll chain states and probe failed chains until `stop` is set."""
        while not stop.is_set():
            now = time.monotonic()
            changed = False
            for chain in self.chains:
                old = chain.state
                self._refresh(chain)
                changed |= old != chain.state
                if (chain.state == "failed" and not chain.probing
                        and now - chain.last_probe >= self.probe_interval):
                    chain.probing, chain.last_probe = True, now
                    spawn(self._probe(chain))
            if changed:
                self._notify()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll)

    async def _probe(self, chain: Chain) -> None:
        try:
            await self._run(chain, self.probe_inputs)
        except DeferError as err:
            log.debug("probe of chain %d failed: %s", chain.index, err)
        else:
            log.warning("chain %d (%s) is back: it rejoins", chain.index, ",".join(chain.nodes))
        finally:
            chain.probing = False
            self._refresh(chain)
            self._notify()

    def close(self) -> None:
        """Close every Dispatcher (joins their loop threads; the nodes keep running)."""
        for chain in self.chains:
            chain.dispatcher.close()


def probe_inputs(specs: list) -> Sample:
    """Zeros of every input spec, dynamic dimensions set to 1."""
    return {s.name: np.zeros(s.concrete_shape(1), dtype=s.dtype) for s in specs}
