"""A node's work pipeline: a bounded compute queue, ONE engine thread, a bounded send queue.

Requests wait in the compute queue; the engine thread runs `stage.run_stage` on each (codec
work included), so receiving, computing and sending overlap; results wait in the send queue for
the next hop (or, from the last stage, the dispatcher). Full queues stop the readers from
reading their sockets: that is the backpressure. Work is stamped with the wiring *generation* it
arrived under; a new CONFIGURE or the dispatcher leaving bumps it, and older work is dropped
(the dispatcher replays what has no result). `drain` waits for both queues to empty (queue
joins, under a timeout) and says how much was left.

Tracing (CONFIGURE's `trace`): each request's clock readings ride with it through the queues,
and its `Span` is appended to its `spans` just before it is sent. Off, nothing is read or added.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from defer.engines import Engine
from defer.errors import DeferError
from defer.runtime.channel import Channel
from defer.runtime.protocol import Configure, Error, Infer, Message, Result, Span
from defer.runtime.stage import StageCounters, StageTimes, run_stage

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, node_id: str, queue_size: int, counters: StageCounters) -> None:
        self.node_id = node_id
        self.counters = counters
        self.engine: Engine | None = None
        self.plan: Configure | None = None
        self.tracing = False  # the plan asks for spans
        self.generation = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defer-engine")
        # (generation, request, (arrived, queued) when tracing)
        self._compute_q: asyncio.Queue[tuple[int, Infer, tuple | None]] = \
            asyncio.Queue(queue_size)
        # (generation, message, (arrived, queued, stage times) when tracing)
        self._send_q: asyncio.Queue[tuple[int, Message, tuple | None]] = asyncio.Queue(queue_size)

    def rewire(self, plan: Configure | None = None) -> None:
        """A new wiring (or none): work queued under the old one will be dropped."""
        self.generation += 1
        self.plan = plan
        self.tracing = plan is not None and plan.trace

    async def put(self, msg: Infer, arrived: float = 0.0) -> None:
        """Queue a request (waits while the compute queue is full: backpressure). `arrived`:
        when its frame began to arrive (wall clock; tracing only)."""
        for tensor in msg.tensors:
            self.counters.bytes_in[tensor.codec] += tensor.nbytes
        stamp = None
        if self.tracing:
            queued = time.time()
            stamp = (arrived or queued, queued)
        await self._compute_q.put((self.generation, msg, stamp))
        self.counters.queue_max = max(self.counters.queue_max, self._compute_q.qsize())

    def depths(self) -> dict[str, int]:
        return {"queue_depth": self._compute_q.qsize(), "send_queue_depth": self._send_q.qsize()}

    async def compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            generation, msg, stamp = await self._compute_q.get()
            try:
                plan, engine = self.plan, self.engine
                if generation != self.generation or plan is None or engine is None:
                    log.debug("dropping request %d: queued under an old wiring", msg.request_id)
                    continue
                out, times = await self._run(loop, plan, engine, msg)
                trace = (plan.stage, *stamp, times) \
                    if stamp is not None and times is not None else None
                await self._send_q.put((generation, out, trace))
            finally:
                self._compute_q.task_done()

    async def _run(self, loop, plan: Configure, engine: Engine,
                   msg: Infer) -> tuple[Message, StageTimes | None]:
        try:
            out, times = await loop.run_in_executor(self.executor, run_stage, plan, engine, msg,
                                                    self.node_id)
        except DeferError as err:
            self.counters.errors += 1
            log.warning("request %d failed: %s", msg.request_id, err)
            return Error(request_id=msg.request_id, reason=str(err), node=self.node_id,
                         code=err.exit_code), None
        except Exception as err:  # a bug must fail one request, never the node
            self.counters.errors += 1
            log.exception("request %d: internal error", msg.request_id)
            return Error(request_id=msg.request_id, node=self.node_id,
                         reason=f"internal error at stage {plan.stage}: {err!r:.200}"), None
        self.counters.add(times)
        return out, times

    async def send_loop(self, route: Callable[[Message], Channel | None],
                        on_lost: Callable[[Channel, str], None]) -> None:
        """Send each result where `route` says; a failed send to the next hop is `on_lost`."""
        while True:
            generation, msg, trace = await self._send_q.get()
            try:
                if generation == self.generation:
                    await self._send(msg if trace is None else _with_span(msg, *trace),
                                     route, on_lost)
            finally:
                self._send_q.task_done()

    async def _send(self, msg: Message, route, on_lost) -> None:
        chan = route(msg)
        if chan is None or chan.closing:
            log.debug("dropping request %d: nowhere to send it", msg.request_id)
            return
        try:
            await chan.send(msg)
        except OSError as err:
            if not isinstance(msg, Result | Error):
                on_lost(chan, str(err) or type(err).__name__)
            return
        if isinstance(msg, Infer | Result):
            for tensor in msg.tensors:
                self.counters.bytes_out[tensor.codec] += tensor.nbytes
                self.counters.raw_out += tensor.raw_nbytes

    async def drain(self, timeout: float) -> int:
        """Wait until every queued request is sent (or dropped); how many were left."""
        async def joined() -> None:
            await self._compute_q.join()
            await self._send_q.join()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(joined(), timeout)
        return self._compute_q.qsize() + self._send_q.qsize()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _with_span(msg: Infer | Result, stage: int, arrived: float, queued: float,
               times: StageTimes) -> Infer | Result:
    """`msg` with this stage's span appended; the send time is now."""
    finished = times.began + times.decode_s + times.compute_s + times.encode_s
    span = Span(stage, arrived, queued, times.began, finished, time.time(), times.decode_s,
                times.compute_s, times.encode_s)
    return dataclasses.replace(msg, spans=(*(msg.spans or ()), span))
