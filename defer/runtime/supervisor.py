"""Keeps one chain serving, on the dispatcher's loop thread: sends requests to stage 0, matches
results to pending requests, notices lost nodes and drives failover (rewire, then replay) along
the table in `failover.py`, whose docstring states the guarantee. With a tracer, each answered
request's spans go to it in the dispatcher's clock (`trace.py`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from defer.errors import DeferError, NodeError
from defer.runtime.chain import Chain
from defer.runtime.failover import Action, Event, Failover, PendingTable, State
from defer.runtime.protocol import Error, Infer, Message, Result, Stats
from defer.runtime.trace import RequestTrace

log = logging.getLogger(__name__)


class Request(concurrent.futures.Future):
    """A pending inference: resolves to its RESULT message. Holds the encoded request (for
    replay) only until then; remembers when it was submitted and answered."""

    def __init__(self, msg: Infer) -> None:
        super().__init__()
        self.msg: Infer | None = msg
        self.started = time.perf_counter()
        self.finished = 0.0
        self.sent = 0.0  # wall clock of its (last) send to stage 0; tracing only


class Supervisor:
    """The loop-thread half of a Dispatcher: every method here runs on the loop thread."""

    def __init__(self, spares: list[str],
                 tracer: Callable[[RequestTrace], None] | None = None) -> None:
        self.chain: Chain | None = None  # set by the dispatcher right after construction
        self.spares = spares
        self.tracer = tracer
        self.failover = Failover()
        self.pending: PendingTable[Request] = PendingTable()
        self.recoveries: list[dict[str, Any]] = []  # one record per replaced stage
        self.completed = 0
        self.last_result = 0.0
        self.baseline: list[dict[str, Any]] = []  # node counters at the start of a window
        self._lost: dict[int, NodeError] = {}  # stages waiting for a new node
        self._dead: dict[int, NodeError] = {}  # stages without a node, while FAILED
        self._causes: dict[int, NodeError] = {}  # why each dead stage was first lost
        self._lost_at = 0.0

    @property
    def state(self) -> State:
        return self.failover.state

    async def setup(self, addresses: list[str], on_node: Callable[[], Any] = lambda: None,
                    ) -> None:
        await self.chain.wire(addresses, on_node)
        self.baseline = await self.chain.counters()
        self.failover.handle(Event.WIRED)

    # --- the stream -------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        action = self.failover.handle(Event.REQUEST) if self.state is not State.CLOSED \
            else Action.SHUT
        if action is Action.SHUT:
            request.set_exception(NodeError("the dispatcher was closed"))
            return
        self.pending.add(request.msg.request_id, request)
        if action is Action.SEND:
            # OSError: stage 0 is being lost, and the recovery will replay this request
            with contextlib.suppress(OSError):
                self._send(request)
        elif action is Action.RETRY_DEAD:
            self._lost, self._dead = {s: self._causes.get(s, e) for s, e in self._dead.items()}, {}
            self._lost_at = time.perf_counter()
            self.chain.loop.spawn(self._recover(retry_dead=True))
        # HOLD: the request waits in the table and goes with the replay

    def on_message(self, stage: int, msg: Message) -> None:
        if isinstance(msg, Result):
            request = self.pending.resolve(msg.request_id)
            if request is not None:
                request.msg = None
                request.finished = self.last_result = time.perf_counter()
                self.completed += 1
                request.set_result(msg)
                if self.tracer is not None and msg.spans is not None:
                    self._trace(stage, request, msg)  # after: the caller need not wait for it
        elif isinstance(msg, Error) and msg.request_id == 0:
            self._on_node_report(stage, msg)
        elif isinstance(msg, Error):
            node = msg.node or self.chain.addresses[stage]
            request = self.pending.discard(msg.request_id)
            if request is not None:
                request.msg = None
                request.set_exception(NodeError(f"node {node}: {msg.reason}", node=node))
        else:
            log.warning("ignoring unexpected %s from node %s", msg.TYPE.name,
                        self.chain.addresses[stage])

    def _send(self, request: Request) -> None:
        if self.tracer is not None:
            request.sent = time.time()
        self.chain.links[0].channel.write(request.msg)

    def _trace(self, stage: int, request: Request, msg: Result) -> None:
        """Hand the request's spans to the tracer, each in our clock (its node's offset)."""
        received = time.time()
        links = self.chain.links
        spans = tuple(span.shifted(-links[span.stage].channel.clock_offset)
                      if span.stage < len(links) and links[span.stage] else span
                      for span in msg.spans)
        try:
            self.tracer(RequestTrace(
                request_id=msg.request_id, nodes=tuple(self.chain.addresses), sent=request.sent,
                arrived=links[stage].channel.frame_began or received, received=received,
                spans=spans))
        except Exception:  # noqa: BLE001 - a broken trace must not cost the request
            log.exception("tracer failed on request %d", msg.request_id)

    def _on_node_report(self, stage: int, msg: Error) -> None:
        """ERROR with request id 0: a node lost its next hop (`msg.node`), or our session."""
        reporter = self.chain.addresses[stage]
        if msg.node and msg.node != reporter and msg.node in self.chain.addresses:
            target = self.chain.addresses.index(msg.node)  # aborting a lost one is a no-op
            self.chain.abort(target, f"its upstream {reporter} reports: {msg.reason}")
        else:
            self.chain.abort(stage, f"it ended our session: {msg.reason}")

    # --- failover ---------------------------------------------------------------------------

    def on_lost(self, stage: int, error: NodeError) -> None:
        action = self.failover.handle(Event.NODE_LOST)
        if action is Action.IGNORE:
            (log.debug if self.state is State.CLOSED else log.info)("%s", error)
            return
        log.error("%s", error)
        if action is Action.MARK_DEAD:
            self._dead[stage] = self._causes[stage] = error
            return
        self._lost[stage] = error
        if action is Action.RECOVER:
            self._lost_at = time.perf_counter()
            self.chain.loop.spawn(self._recover(retry_dead=False))

    async def _recover(self, retry_dead: bool) -> None:
        """RECOVERING: replace every lost stage (the last first), then replay, or fail."""
        replaced = []
        while self._lost and self.state is State.RECOVERING:
            stage = max(self._lost)  # a replacement connects to its successor: must be up
            error = self._lost.pop(stage)
            lost = self.chain.addresses[stage]
            try:
                address = await self.chain.replace(stage, [lost] if retry_dead else [],
                                                   self.spares)
                self.baseline[stage] = (await self.chain.ask(self.chain.links[stage], Stats())).counters or {}
            except Exception as err:  # noqa: BLE001 - a recovery must end in RUNNING or FAILED
                if not isinstance(err, DeferError):
                    log.exception("recovering stage %d", stage)
                self._causes = {**self._lost, stage: error}
                self._dead = {**self._lost, stage: NodeError(
                    f"node {lost} is lost ({error}) and {err}; every pending request failed. "
                    "Bring it back at the same address (or add spares) to go on", node=lost)}
                self._lost = {}
                break
            replaced.append({"stage": stage, "lost": lost, "by": address, "reason": str(error),
                             "detected_at": self._lost_at})
        if self.state is not State.RECOVERING:
            return  # closed meanwhile
        if self._dead:
            self.failover.handle(Event.RECOVERY_FAILED)
            self._fail_pending(next(iter(self._dead.values())))
            return
        self.failover.handle(Event.REWIRED)
        replayed = self._replay()
        seconds = time.perf_counter() - self._lost_at
        for record in replaced:
            self.recoveries.append({**record, "replayed": replayed, "seconds": seconds})
            log.warning("stage %d: node %s replaced by %s in %.3f s; %d requests replayed",
                        record["stage"], record["lost"], record["by"], seconds, replayed)

    def _replay(self) -> int:
        """Send every pending request again to stage 0, in submission order."""
        requests = self.pending.replay()
        with contextlib.suppress(OSError):  # stage 0 is going too: another recovery follows
            for request in requests:
                self._send(request)
        return len(requests)

    def _fail_pending(self, error: DeferError) -> None:
        for request in self.pending.take_all():
            request.msg = None
            if not request.done():
                request.set_exception(error)

    async def close(self) -> None:
        if self.failover.handle(Event.CLOSE) is Action.SHUT:
            self._fail_pending(NodeError("the dispatcher was closed"))
        if self.chain is not None:
            await self.chain.close()
