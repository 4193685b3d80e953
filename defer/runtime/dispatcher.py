# The dispatcher (Python API): checks or pushes each node's bundle, wires the chain, streams
# inputs to node 0 and collects results from the last node, in input order, with a bounded
# window of requests in flight. Its asyncio loop runs in one background thread it owns and joins
# on close; every task there belongs to one TaskGroup. Nothing waits forever: every wait has a
# timeout, every connection a heartbeat (`Channel.keepalive`).
#
# Failover is a small state machine, run on the loop thread:
#
#   SETUP --wired--> RUNNING --node lost--> RECOVERING --rewired + replayed--> RUNNING
#                       ^                        | no spare left or none works
#                       |                        v
#                       +---- next request: -- FAILED (every pending request failed)
#                             dead node back
#
# A node is *lost* when its control connection ends or breaks, when it stays silent for 3 of its
# heartbeat intervals (a hung node: noticed within ~1.75 s at the default 0.5 s), or when the node
# before it reports (ERROR with request id 0 naming it) that it lost the data connection to it.
# RECOVERING, per lost stage: take the next spare, push the stage's bundle (LOAD), CONFIGURE it
# with the lost node's next hop, then CONFIGURE the predecessor to send to it (stage 0: inputs go
# to it). A CONFIGURE makes a node drop work queued under the old wiring. Then every pending
# request is sent again to stage 0, in submission order; requests submitted meanwhile wait in
# the table and go with the replay.
#
# The guarantee. Every request has a unique id. The pending table holds the encoded request from
# submission until its first RESULT, or a per-request ERROR from a node (such as a bad input,
# which is not replayed), arrives: then the entry is removed and the caller gets that one
# outcome. Replayed are exactly the requests still in the table when the chain is rewired. A
# RESULT whose id is not in the table -- the second copy of a replayed request, or a result that
# was still travelling through the surviving nodes of the old chain -- is dropped and counted in
# `dropped_results`; both copies come from the same input through the same bundles, so the
# first one is as good as the second. The table is bounded by the window, and so is the memory
# replay needs. With raw hop-0 encoding the table holds a view of the caller's input array: do
# not modify an input until its result is returned.
#
# FAILED: every pending request fails at once with a NodeError naming the dead node; the other
# connections stay open. The next request makes the dispatcher retry the dead node's own address
# (then any spare left): if it is back, the chain is rewired and the stream goes on; if not, the
# request fails at once, naming the node.
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from defer.address import parse_address
from defer.codecs import WireTensor, decode_tensor, encode_tensor, parse_codec
from defer.errors import (
    DeferError,
    DeferTimeoutError,
    InputError,
    ManifestError,
    NodeError,
    ProtocolError,
    UsageError,
)
from defer.manifest import Manifest, load_manifest, sha256_bytes
from defer.runtime.channel import DEFAULT_HEARTBEAT, Channel, client_tls
from defer.runtime.protocol import (
    Ack,
    Configure,
    Error,
    Infer,
    Load,
    Message,
    Ping,
    Pong,
    Result,
    Shutdown,
    Stats,
)
from defer.runtime.report import DEFAULT_WATTS_PER_CORE, chain_report, counter_delta
from defer.tensors import check_sample

log = logging.getLogger(__name__)

Inputs = np.ndarray | dict[str, np.ndarray]
HANDSHAKE_TIMEOUT = 5.0  # connect + HELLO on loopback or a LAN; LOAD gets the full timeout


class Request(concurrent.futures.Future):
    """A pending inference: resolves to its RESULT message. Holds the encoded request (for
    replay) only until then; remembers when it was submitted and answered."""

    def __init__(self, msg: Infer) -> None:
        super().__init__()
        self.msg: Infer | None = msg
        self.started = time.perf_counter()
        self.finished = 0.0


class Dispatcher:
    """Drive a chain of `defer serve` nodes, one per stage, in manifest order.

    `codec` overrides the manifest's hop codecs on every hop. `inflight` is the window of
    requests in flight (default max(8, 2 x stages) to keep every stage busy). `timeout` bounds
    every wait, in seconds. `spares`: idle nodes ("host:port") that take over a lost stage.
    `token`: prove to every node that we hold it (and demand the same proof from it).
    `tls_ca`: connect with TLS, verifying nodes against this CA file. `heartbeat`: seconds
    between heartbeats on an idle connection. Use one Dispatcher from one thread at a time.
    """

    def __init__(self, manifest_path: str | Path | Manifest, nodes: list[str],
                 codec: str | None = None, inflight: int | None = None, timeout: float = 30.0,
                 watts_per_core: float = DEFAULT_WATTS_PER_CORE, *,
                 spares: Iterable[str] = (), token: str | None = None,
                 tls_ca: str | Path | None = None, heartbeat: float = DEFAULT_HEARTBEAT):
        self.manifest = (manifest_path if isinstance(manifest_path, Manifest)
                         else load_manifest(manifest_path))
        n = len(self.manifest.stages)
        if len(nodes) != n:
            raise UsageError(f"the manifest has {n} stages but {len(nodes)} nodes were given; "
                             f"pass exactly {n} host:port addresses, in stage order")
        self.nodes = list(nodes)
        self.spares = list(spares)
        for address in self.nodes + self.spares:
            parse_address(address)
        if set(self.spares) & set(self.nodes):
            raise UsageError(f"spares {sorted(set(self.spares) & set(self.nodes))} are also "
                             "chain nodes; a spare must be an idle node")
        self.hop_codecs = [parse_codec(codec or self.manifest.codec).spec
                           for i in range(n + 1)]
        self.inflight = inflight if inflight is not None else max(8, 2 * n)
        if self.inflight < 1:
            raise UsageError(f"inflight must be >= 1, got {self.inflight}")
        if heartbeat < 0:
            raise UsageError(f"heartbeat must be >= 0 seconds, got {heartbeat}")
        self.timeout = timeout
        self.token = token
        self.heartbeat = heartbeat
        self._tls = client_tls(tls_ca) if tls_ca is not None else None
        self.watts_per_core = watts_per_core
        self.in_flight = 0  # requests submitted whose results the caller has not taken
        self.max_in_flight = 0
        self.state = "setup"  # setup | running | recovering | failed | closed
        self.recoveries: list[dict[str, Any]] = []  # one record per rewiring
        self.dropped_results = 0  # late or duplicate RESULTs (see the guarantee above)
        self._ids = itertools.count(1)
        self._chans: list[Channel] = []
        self._stage_of: dict[Channel, int] = {}  # live chain connections only
        self._pending: dict[int, Request] = {}
        self._replies: dict[int, tuple[Channel, concurrent.futures.Future]] = {}
        self._lost: deque[tuple[int, Channel | None, DeferError]] = deque()
        self._dead: dict[int, DeferError] = {}  # stages without a node, while FAILED
        self._lost_at = 0.0
        self._baseline: list[dict[str, Any]] = []
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: asyncio.Queue | None = None
        self._thread: threading.Thread | None = None
        self._reset_measures()
        self._start()

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(started),),
                                        name="defer-dispatcher", daemon=True)
        self._thread.start()
        started.result()
        try:
            self._call(self._setup, timeout=self.timeout * (3 * len(self.nodes) + 1))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every connection and join the loop thread. The nodes keep running."""
        if self._thread is None:
            return
        self._closing = True
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._commands.put_nowait, (None, None))
        self._thread.join(self.timeout)
        self._thread = None
        self.state = "closed"

    def shutdown_nodes(self) -> None:
        """Ask every live chain node to drain and exit (SHUTDOWN); lost nodes are skipped."""
        self._closing = True
        for chan in list(self._stage_of):
            try:
                self._control(chan, Shutdown(drain=True), timeout=min(self.timeout, 5.0))
            except DeferError as err:
                log.warning("node %s did not confirm SHUTDOWN: %s", chan.peer, err)

    async def _main(self, started: concurrent.futures.Future) -> None:
        self._loop = asyncio.get_running_loop()
        self._commands = asyncio.Queue()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            started.set_result(None)
            while True:
                command, future = await self._commands.get()
                if command is None:
                    break
                try:
                    future.set_result(await command())
                except Exception as err:  # noqa: BLE001 - handed to the calling thread as is
                    future.set_exception(err)
            self._closing = True
            self._fail_pending(NodeError("the dispatcher was closed"))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*(chan.close() for chan in self._chans))

    def _call(self, command: Callable[[], Any], timeout: float) -> Any:
        """Run coroutine function `command` on the loop thread and wait for its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._commands.put_nowait, (command, future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeferTimeoutError(f"the chain {', '.join(self.nodes)} did not answer within "
                                    f"{timeout:.0f} s") from None

    def _spawn(self, coro) -> asyncio.Task:
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- setup: HELLO, LOAD, CONFIGURE --------------------------------------------------------

    async def _setup(self) -> None:
        for index, address in enumerate(self.nodes):
            self._install(index, await self._open(index, address, push=False))
        for index in reversed(range(len(self.nodes))):
            await self._configure(index, self._chans[index])
        self._baseline = await self._node_counters()
        self.state = "running"

    def _install(self, index: int, chan: Channel) -> None:
        if index < len(self._chans):
            self._chans[index] = chan
        else:
            self._chans.append(chan)
        self.nodes[index] = chan.peer
        self._stage_of[chan] = index

    async def _open(self, index: int, address: str, push: bool) -> Channel:
        """Connect, HELLO (+ token proof), start reading and heartbeats, make sure the node
        serves stage `index`: push the bundle if it serves none (or, with `push`, another)."""
        handshake = min(self.timeout, HANDSHAKE_TIMEOUT)
        chan = await Channel.connect(address, handshake, self._tls)
        try:
            hello = await self._guard(address, chan.handshake(
                "dispatcher", self.token, handshake, self.heartbeat, node_id="dispatcher"))
            self._spawn(self._reader(chan))
            self._spawn(chan.keepalive(self.heartbeat))
            stage = self.manifest.stages[index]
            if hello.bundle_sha256 is None or (push and hello.bundle_sha256 != stage.sha256):
                await self._push_bundle(chan, index)
            elif hello.bundle_sha256 != stage.sha256:
                raise ManifestError(
                    f"node {address} serves bundle {hello.bundle_sha256[:12]}, but stage {index} "
                    f"of {self.manifest.path or 'the manifest'} is {stage.sha256[:12]} "
                    f"({stage.file}); restart it with "
                    f"`defer serve {self.manifest.bundle_path(index)}`, or without a bundle so "
                    "the dispatcher pushes it")
        except ProtocolError as err:
            chan.abort(str(err))
            raise NodeError(f"node {address}: {err}", node=address) from None
        except BaseException:
            chan.abort("setup failed")
            raise
        return chan

    async def _push_bundle(self, chan: Channel, index: int) -> None:
        path = self.manifest.bundle_path(index)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ManifestError(f"cannot read {path} to push to node {chan.peer}: {err}") from None
        sha = sha256_bytes(data)
        if sha != self.manifest.stages[index].sha256:
            raise ManifestError(f"{path} hashes to {sha[:12]}, not the {self.manifest.stages[index].sha256[:12]} "
                                "its manifest lists: the bundle is corrupt or from another "
                                "compile; recompile")
        log.info("pushing %s (%d bytes) to node %s", path.name, len(data), chan.peer)
        await self._ask(chan, Load(sha256=sha, bundle=data))

    async def _configure(self, index: int, chan: Channel) -> None:
        stage, n = self.manifest.stages[index], len(self.nodes)
        await self._ask(chan, Configure(
            stage=index, n_stages=n,
            next_hop=self.nodes[index + 1] if index + 1 < n else "dispatcher",
            codec=self.hop_codecs[index + 1], receives=tuple(stage.receives),
            forward=tuple(t.name for t in stage.forward),
            outputs=tuple(t.name for t in stage.outputs)))

    async def _ask(self, chan: Channel, msg: Message, timeout: float | None = None) -> Message:
        """Send a control message on the loop thread and wait for its reply (ACK, STATS...)."""
        rid = next(self._ids)
        msg = dataclasses.replace(msg, request_id=rid)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._replies[rid] = (chan, future)
        try:
            chan.write(msg)
            reply = await self._guard(chan.peer, asyncio.wrap_future(future), timeout)
        finally:
            self._replies.pop(rid, None)
        if isinstance(reply, Error):
            raise ManifestError(f"node {chan.peer} refused {msg.TYPE.name}: {reply.reason}")
        return reply

    async def _guard(self, address: str, awaitable, timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"node {address} did not answer within {timeout:g} s",
                                    node=address) from None
        except OSError as err:
            raise NodeError(f"node {address}: connection lost ({err})", node=address) from None

    # --- failure detection and failover (the state machine above) ---------------------------

    async def _reader(self, chan: Channel) -> None:
        try:
            while (msg := await chan.recv()) is not None:
                self._on_message(chan, msg)
            reason = chan.dead_reason or "closed the connection"
        except (ProtocolError, OSError) as err:
            reason = chan.dead_reason or str(err) or type(err).__name__
        except Exception as err:  # a bug here must not take the loop thread down silently
            log.exception("reading from node %s", chan.peer)
            reason = f"internal error reading from it: {err!r}"
        chan.abort(reason)
        error = NodeError(f"node {chan.peer} is lost: {reason}", node=chan.peer)
        for owner, future in list(self._replies.values()):
            if owner is chan and not future.done():
                future.set_exception(error)
        self._on_lost(chan, error)

    def _on_lost(self, chan: Channel, error: NodeError) -> None:
        stage = self._stage_of.pop(chan, None)
        if stage is None or self._closing or self.state == "setup":
            # An orderly shutdown closes every connection: not news for the user.
            (log.debug if self._closing else log.info)("%s", error)
            return
        log.error("%s", error)
        if self.state == "failed":
            self._dead[stage] = error
            return
        self._lost.append((stage, chan, error))
        if self.state == "running":
            self.state, self._lost_at = "recovering", time.perf_counter()
            self._spawn(self._recover(retry_dead=False))

    def _on_node_report(self, chan: Channel, msg: Error) -> None:
        """ERROR with request id 0: a node lost its next hop (`msg.node`), or our session."""
        if chan not in self._stage_of:
            return
        if msg.node and msg.node != chan.peer and msg.node in self.nodes:
            target = self._chans[self.nodes.index(msg.node)]
            if target in self._stage_of:
                target.abort(f"its upstream {chan.peer} reports: {msg.reason}")
        else:
            chan.abort(f"it ended our session: {msg.reason}")

    async def _recover(self, retry_dead: bool) -> None:
        """RECOVERING: replace every lost stage, then replay; or fail everything pending."""
        replaced = []
        while self._lost:
            # the last stage first: a replacement connects to its successor, which must be up
            self._lost = deque(sorted(self._lost, key=lambda entry: -entry[0]))
            stage, chan, error = self._lost.popleft()
            if chan is not None and self._chans[stage] is not chan:
                continue  # reported twice; already replaced
            lost = self.nodes[stage]
            candidates = [lost] if retry_dead else []
            try:
                address = await self._replace(stage, candidates)
            except NodeError as err:
                self._dead[stage] = NodeError(
                    f"node {lost} is lost ({error}) and {err}; every pending request failed. "
                    "Bring it back at the same address (or add spares) to go on", node=lost)
                self._dead.update({s: e for s, _, e in self._lost})
                self._lost.clear()
                break
            replaced.append({"stage": stage, "lost": lost, "by": address, "reason": str(error),
                             "detected_at": self._lost_at})
        if self._dead:
            self.state = "failed"
            self._fail_pending(next(iter(self._dead.values())), replies=False)
            return
        replayed = self._replay()
        self.state = "running"
        seconds = time.perf_counter() - self._lost_at
        for record in replaced:
            self.recoveries.append({**record, "replayed": replayed, "seconds": seconds})
            log.warning("stage %d: node %s replaced by %s in %.3f s; %d requests replayed",
                        record["stage"], record["lost"], record["by"], seconds, replayed)

    async def _replace(self, stage: int, candidates: list[str]) -> str:
        """Wire a new node (a candidate, else the next spare) in as `stage`; its address."""
        reasons = []
        while candidates or self.spares:
            address = candidates.pop(0) if candidates else self.spares.pop(0)
            try:
                chan = await self._open(stage, address, push=True)
            except DeferError as err:
                reasons.append(f"{address}: {err}")
                continue
            try:
                await self._configure(stage, chan)
            except DeferError as err:
                chan.abort(str(err))
                reasons.append(f"{address}: {err}")
                continue
            self._install(stage, chan)
            self._baseline[stage] = (await self._ask(chan, Stats())).counters or {}
            if stage > 0 and self._chans[stage - 1] in self._stage_of:
                try:
                    await self._configure(stage - 1, self._chans[stage - 1])
                except DeferError as err:  # the predecessor is broken too: lose it as well
                    self._chans[stage - 1].abort(f"could not rewire it: {err}")
            return address
        tried = "; ".join(reasons) if reasons else "no spare is left"
        raise NodeError(f"no node could take over stage {stage} ({tried})")

    def _replay(self) -> int:
        """Send every pending request again to stage 0, in submission order."""
        chan = self._chans[0]
        with contextlib.suppress(OSError):  # stage 0 is going too: another recovery follows
            for request in self._pending.values():
                chan.write(request.msg)
        return len(self._pending)

    def _fail_pending(self, error: DeferError, replies: bool = True) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.msg = None
            if not future.done():
                future.set_exception(error)
        for _, future in self._replies.values() if replies else ():
            if not future.done():
                future.set_exception(error)

    # --- the stream -------------------------------------------------------------------------

    def _on_message(self, chan: Channel, msg: Message) -> None:
        if isinstance(msg, Result):
            future = self._pending.pop(msg.request_id, None)
            if future is None:
                self.dropped_results += 1
                return
            future.msg = None
            future.finished = self._last_result = time.perf_counter()
            self._completed += 1
            future.set_result(msg)
        elif isinstance(msg, Error):
            if msg.request_id == 0:
                self._on_node_report(chan, msg)
                return
            node = msg.node or chan.peer
            if msg.request_id in self._replies:
                if not self._replies[msg.request_id][1].done():
                    self._replies[msg.request_id][1].set_result(msg)
            elif (future := self._pending.pop(msg.request_id, None)) is not None:
                future.msg = None
                future.set_exception(NodeError(f"node {node}: {msg.reason}", node=node))
        elif isinstance(msg, Stats | Pong | Ack):
            entry = self._replies.get(msg.request_id)
            if entry is not None and not entry[1].done():
                entry[1].set_result(msg)
        else:
            log.warning("ignoring unexpected %s from node %s", msg.TYPE.name, chan.peer)

    def _send_infer(self, future: Request) -> None:
        # On the loop thread. No drain needed: the window bounds what is buffered.
        if self._closing:
            future.set_exception(NodeError("the dispatcher was closed"))
            return
        self._pending[future.msg.request_id] = future
        if self.state == "running":
            # OSError: stage 0 is being lost, and the recovery will replay this request
            with contextlib.suppress(OSError):
                self._chans[0].write(future.msg)
        elif self.state == "failed":
            self.state, self._lost_at = "recovering", time.perf_counter()
            self._lost.extend((stage, None, error) for stage, error in self._dead.items())
            self._dead.clear()
            self._spawn(self._recover(retry_dead=True))
        # setup/recovering: the request waits in the table and goes with the replay

    def submit(self, inputs: Inputs) -> Request:
        """Send one inference without waiting; take its outputs with `wait`."""
        tensors = self._encode(inputs)
        future = Request(Infer(request_id=next(self._ids), tensors=tensors))
        if self._first_submit is None:
            self._first_submit = future.started
        self._loop.call_soon_threadsafe(self._send_infer, future)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return future

    def wait(self, future: Request) -> dict[str, np.ndarray]:
        """The outputs of a submitted request, by output name. NodeError if it failed."""
        try:
            result = future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            raise self._stalled() from None
        finally:
            self.in_flight -= 1
        self._latencies.append(future.finished - future.started)
        arrays = {t.name: decode_tensor(t) for t in result.tensors}
        return {spec.name: arrays[spec.name] for spec in self.manifest.outputs}

    def infer(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Run one inference: a dict by input name (or one array for a single-input model)."""
        return self.wait(self.submit(inputs))

    def map(self, inputs: Iterable[Inputs]) -> Iterator[dict[str, np.ndarray]]:
        """Stream `inputs` through the chain; yield results in input order.

        At most `inflight` requests are outstanding: the next input is read only when a result
        is taken, so a slow consumer holds the window, not a growing backlog.
        """
        window: deque[Request] = deque()
        source = iter(inputs)
        try:
            for item in source:
                window.append(self.submit(item))
                if len(window) >= self.inflight:
                    break
            while window:
                future = window.popleft()
                result = self.wait(future)
                item = next(source, _END)
                if item is not _END:
                    window.append(self.submit(item))
                yield result
        finally:
            self.in_flight -= len(window)

    def _encode(self, inputs: Inputs) -> tuple[WireTensor, ...]:
        specs = self.manifest.inputs
        if not isinstance(inputs, dict):
            if len(specs) != 1:
                raise InputError(f"this model takes {len(specs)} inputs; pass a dict with keys "
                                 f"{[s.name for s in specs]}")
            inputs = {specs[0].name: inputs}
        arrays = check_sample(specs, inputs)
        tensors = []
        for spec in specs:
            tensor = encode_tensor(spec.name, arrays[spec.name], self.hop_codecs[0])
            self._hop0_bytes[tensor.codec] += tensor.nbytes
            self._hop0_raw += tensor.raw_nbytes
            tensors.append(tensor)
        return tuple(tensors)

    def _stalled(self) -> DeferTimeoutError:
        """Name the node that stopped answering (first without a PONG), else the last node."""
        for address, chan in zip(self.nodes, self._chans):
            try:
                self._control(chan, Ping(), timeout=min(2.0, self.timeout))
            except DeferError:
                return DeferTimeoutError(f"no result within {self.timeout:g} s: node {address} "
                                         "does not answer PING", node=address)
        last = self.nodes[-1]
        return DeferTimeoutError(f"no result from the last node {last} within {self.timeout:g} "
                                 "s (every node answers PING: the chain is slower than the "
                                 "timeout; raise it)", node=last)

    # --- control after setup ----------------------------------------------------------------

    def _control(self, chan: Channel, msg: Message, timeout: float) -> Message:
        """From the caller's thread: send a control message and wait for its reply."""
        rid = next(self._ids)
        msg = dataclasses.replace(msg, request_id=rid)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def send() -> None:
            self._replies[rid] = (chan, future)
            try:
                chan.write(msg)
            except OSError as err:
                future.set_exception(NodeError(f"node {chan.peer}: {err}", node=chan.peer))

        self._loop.call_soon_threadsafe(send)
        try:
            reply = future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeferTimeoutError(f"node {chan.peer} did not answer {msg.TYPE.name} within "
                                    f"{timeout:g} s", node=chan.peer) from None
        finally:
            self._loop.call_soon_threadsafe(self._replies.pop, rid, None)
        if isinstance(reply, Error):
            raise NodeError(f"node {chan.peer} refused {msg.TYPE.name}: {reply.reason}",
                            node=chan.peer)
        return reply

    async def _node_counters(self) -> list[dict[str, Any]]:
        return [(await self._ask(chan, Stats())).counters or {} for chan in self._chans]

    def _reset_measures(self) -> None:
        self._latencies: list[float] = []
        self._first_submit: float | None = None
        self._last_result = 0.0
        self._completed = 0
        self._hop0_bytes: Counter[str] = Counter()
        self._hop0_raw = 0

    def reset_stats(self) -> None:
        """Start a new measurement window (e.g. after warm-up). Call with nothing in flight."""
        self._baseline = [self._control(c, Stats(), self.timeout).counters or {}
                          for c in self._chans]
        self._reset_measures()

    def stats(self) -> dict[str, Any]:
        """Throughput, latency, bytes per hop, stage busy share/overhead, CPU-s and energy,
        plus the failovers (`recoveries`) and the dropped late/duplicate results."""
        now = [self._control(c, Stats(), self.timeout).counters or {} for c in self._chans]
        window = (self._last_result - self._first_submit) if self._first_submit else 0.0
        report = chain_report(
            nodes=self.nodes, hop_codecs=self.hop_codecs, requests=self._completed,
            window_s=window, latencies_s=self._latencies, hop0_bytes=dict(self._hop0_bytes),
            hop0_raw=self._hop0_raw, watts=self.watts_per_core,
            node_deltas=[counter_delta(a, b) for a, b in zip(now, self._baseline)])
        report["recoveries"] = list(self.recoveries)
        report["dropped_results"] = self.dropped_results
        return report


_END = object()
