# The dispatcher (Python API): checks or pushes each node's bundle, wires the chain, streams
# inputs to node 0 and collects results from the last node, in input order, with a bounded
# window of requests in flight. Its asyncio loop runs in one background thread it owns and joins
# on close; every task there belongs to one TaskGroup. Nothing waits forever: every wait has a
# timeout, and a vanished node fails every pending request with a NodeError naming it.
from __future__ import annotations

import asyncio
import concurrent.futures
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
from defer.runtime.channel import Channel
from defer.runtime.codecs import decode_tensor, encode_tensor, parse_codec
from defer.runtime.protocol import (
    Ack,
    Configure,
    Error,
    Hello,
    Infer,
    Load,
    Message,
    Ping,
    Pong,
    Result,
    Shutdown,
    Stats,
    WireTensor,
    raw_nbytes,
)
from defer.runtime.report import DEFAULT_WATTS_PER_CORE, chain_report, counter_delta

log = logging.getLogger(__name__)

Inputs = np.ndarray | dict[str, np.ndarray]


class _Request(concurrent.futures.Future):
    """A pending inference: resolves to its Result; remembers when it was sent and answered."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.perf_counter()
        self.finished = 0.0


class Dispatcher:
    """Drive a chain of `defer serve` nodes, one per stage, in manifest order.

    `codec` overrides the manifest's hop codecs on every hop. `inflight` is the window of
    requests in flight (default max(8, 2 x stages) to keep every stage busy). `timeout` bounds
    every wait, in seconds. Use one Dispatcher from one thread at a time.
    """

    def __init__(self, manifest_path: str | Path | Manifest, nodes: list[str],
                 codec: str | None = None, inflight: int | None = None, timeout: float = 30.0,
                 watts_per_core: float = DEFAULT_WATTS_PER_CORE):
        self.manifest = (manifest_path if isinstance(manifest_path, Manifest)
                         else load_manifest(manifest_path))
        n = len(self.manifest.stages)
        if len(nodes) != n:
            raise UsageError(f"the manifest has {n} stages but {len(nodes)} nodes were given; "
                             f"pass exactly {n} host:port addresses, in stage order")
        self.nodes = list(nodes)
        self.hop_codecs = [parse_codec(codec or self.manifest.hop_codec(i)).spec
                           for i in range(n + 1)]
        self.inflight = inflight if inflight is not None else max(8, 2 * n)
        if self.inflight < 1:
            raise UsageError(f"inflight must be >= 1, got {self.inflight}")
        self.timeout = timeout
        self.watts_per_core = watts_per_core
        self.in_flight = 0  # requests submitted whose results the caller has not taken
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._chans: list[Channel] = []
        self._pending: dict[int, _Request] = {}
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._broken: DeferError | None = None
        self._closing = False
        self._readers: list[asyncio.Task] = []
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

    def shutdown_nodes(self) -> None:
        """Ask every node to drain and exit (SHUTDOWN); nodes that are gone are skipped."""
        self._closing = True
        if self._broken is not None:
            log.info("not sending SHUTDOWN: %s", self._broken)
            return
        for chan in self._chans:
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
            self._fail_all(NodeError("the dispatcher was closed"))
            for chan in self._chans:
                await chan.close()
            for task in self._readers:
                task.cancel()

    def _call(self, command: Callable[[], Any], timeout: float) -> Any:
        """Run coroutine function `command` on the loop thread and wait for its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._commands.put_nowait, (command, future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeferTimeoutError(f"the chain {', '.join(self.nodes)} did not answer within "
                                    f"{timeout:.0f} s") from None

    # --- setup: HELLO, LOAD, CONFIGURE --------------------------------------------------------

    async def _setup(self) -> None:
        for index, address in enumerate(self.nodes):
            self._chans.append(await self._open(index, address))
        for index in reversed(range(len(self.nodes))):
            await self._configure(index)
        self._baseline = await self._node_counters()
        for index, chan in enumerate(self._chans):
            self._readers.append(self._tg.create_task(self._reader(index, chan)))

    async def _open(self, index: int, address: str) -> Channel:
        chan = await Channel.connect(address, self.timeout)
        try:
            hello = await self._guard(address, chan.handshake(Hello(role="dispatcher",
                                                                    node_id="dispatcher"),
                                                              self.timeout))
        except ProtocolError as err:
            await chan.close()
            raise NodeError(f"node {address}: {err}", node=address) from None
        except DeferError:
            await chan.close()
            raise
        stage = self.manifest.stages[index]
        if hello.bundle_sha256 is None:
            await self._push_bundle(chan, index)
        elif hello.bundle_sha256 != stage.sha256:
            await chan.close()
            raise ManifestError(
                f"node {address} serves bundle {hello.bundle_sha256[:12]}, but stage {index} of "
                f"{self.manifest.path or 'the manifest'} is {stage.sha256[:12]} ({stage.file}); "
                f"restart it with `defer serve {self.manifest.bundle_path(index)}`, or without "
                "a bundle so the dispatcher pushes it")
        return chan

    async def _push_bundle(self, chan: Channel, index: int) -> None:
        path = self.manifest.bundle_path(index)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ManifestError(f"cannot read {path} to push to node {chan.peer}: {err}") from None
        sha = sha256_bytes(data)
        if sha != self.manifest.stages[index].sha256:
            raise ManifestError(f"{path} does not match its sha256 in the manifest; recompile")
        log.info("pushing %s (%d bytes) to node %s", path.name, len(data), chan.peer)
        await self._request(chan, Load(sha256=sha, bundle=data))

    async def _configure(self, index: int) -> None:
        stage, n = self.manifest.stages[index], len(self.nodes)
        await self._request(self._chans[index], Configure(
            stage=index, n_stages=n,
            next_hop=self.nodes[index + 1] if index + 1 < n else "dispatcher",
            codec=self.hop_codecs[index + 1], receives=tuple(stage.receives),
            forward=tuple(t.name for t in stage.forward),
            outputs=tuple(t.name for t in stage.outputs)))

    async def _request(self, chan: Channel, msg: Message) -> Message:
        """Send a control message before the readers run and wait for its direct reply."""
        await chan.send(msg)
        reply = await self._guard(chan.peer, chan.recv())
        if isinstance(reply, Error):
            raise ManifestError(f"node {chan.peer} refused {msg.TYPE.name}: {reply.reason}")
        if reply is None:
            raise NodeError(f"node {chan.peer} closed the connection during "
                            f"{msg.TYPE.name}", node=chan.peer)
        return reply

    async def _guard(self, address: str, awaitable) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"node {address} did not answer within {self.timeout:g} s",
                                    node=address) from None
        except OSError as err:
            raise NodeError(f"node {address}: connection lost ({err})", node=address) from None

    # --- the stream -------------------------------------------------------------------------

    async def _reader(self, index: int, chan: Channel) -> None:
        try:
            while (msg := await chan.recv()) is not None:
                self._on_message(chan, msg)
            error = NodeError(f"node {chan.peer} closed the connection", node=chan.peer)
        except (ProtocolError, OSError) as err:
            error = NodeError(f"node {chan.peer}: {err}", node=chan.peer)
        if self._closing:  # nodes leave after SHUTDOWN; the others' replies still count
            log.info("%s", error)
            return
        if self._broken is None:
            self._broken = error
            log.error("%s", error)
        self._fail_all(error)

    def _on_message(self, chan: Channel, msg: Message) -> None:
        if isinstance(msg, Result):
            future = self._pending.pop(msg.request_id, None)
            if future is not None and not future.done():
                future.finished = self._last_result = time.perf_counter()
                self._completed += 1
                future.set_result(msg)
        elif isinstance(msg, Error):
            node = msg.node or chan.peer
            future = self._pending.pop(msg.request_id, None) or \
                self._replies.pop(msg.request_id, None)
            if future is not None and not future.done():
                future.set_exception(NodeError(f"node {node}: {msg.reason}", node=node))
        elif isinstance(msg, Stats | Pong | Ack):
            future = self._replies.pop(msg.request_id, None)
            if future is not None and not future.done():
                future.set_result(msg)
        else:
            log.warning("ignoring unexpected %s from node %s", msg.TYPE.name, chan.peer)

    def _fail_all(self, error: DeferError) -> None:
        for table in (self._pending, self._replies):
            for future in table.values():
                if not future.done():
                    future.set_exception(error)
            table.clear()

    def _send_infer(self, msg: Infer, future: _Request) -> None:
        # On the loop thread. No drain needed: the window bounds what is buffered.
        if self._broken is not None:
            future.set_exception(self._broken)
            return
        self._pending[msg.request_id] = future
        self._chans[0].write(msg)

    def _submit(self, inputs: Inputs) -> _Request:
        tensors = self._encode(inputs)
        msg = Infer(request_id=next(self._ids), tensors=tensors)
        future = _Request()
        if self._first_submit is None:
            self._first_submit = future.started
        self._loop.call_soon_threadsafe(self._send_infer, msg, future)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return future

    def _wait(self, future: _Request) -> dict[str, np.ndarray]:
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
        return self._wait(self._submit(inputs))

    def map(self, inputs: Iterable[Inputs]) -> Iterator[dict[str, np.ndarray]]:
        """Stream `inputs` through the chain; yield results in input order.

        At most `inflight` requests are outstanding: the next input is read only when a result
        is taken, so a slow consumer holds the window, not a growing backlog.
        """
        window: deque[_Request] = deque()
        source = iter(inputs)
        try:
            for item in source:
                window.append(self._submit(item))
                if len(window) >= self.inflight:
                    break
            while window:
                future = window.popleft()
                result = self._wait(future)
                item = next(source, _END)
                if item is not _END:
                    window.append(self._submit(item))
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
        missing = [s.name for s in specs if s.name not in inputs]
        extra = sorted(set(inputs) - {s.name for s in specs})
        if missing or extra:
            raise InputError(f"inputs must be exactly {[s.name for s in specs]}; missing "
                             f"{missing}, unexpected {extra}")
        tensors = []
        for spec in specs:
            array = np.asarray(inputs[spec.name])
            if array.dtype.name != spec.dtype:
                raise InputError(f"input {spec.name!r} is {array.dtype.name}, the model wants "
                                 f"{spec.dtype}: pass x.astype({spec.dtype!r})")
            fits = len(array.shape) == len(spec.shape) and all(
                not isinstance(want, int) or want < 0 or want == got
                for want, got in zip(spec.shape, array.shape))
            if not fits:
                raise InputError(f"input {spec.name!r} has shape {tuple(array.shape)}, the model "
                                 f"wants {tuple(spec.shape)} (None/str = any size); reshape it")
            tensor = encode_tensor(spec.name, array, self.hop_codecs[0])
            self._hop0_bytes[tensor.codec] += tensor.nbytes
            self._hop0_raw += raw_nbytes(tensor)
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
        rid = next(self._ids)
        msg = dataclasses.replace(msg, request_id=rid)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def send() -> None:
            self._replies[rid] = future
            chan.write(msg)

        self._loop.call_soon_threadsafe(send)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeferTimeoutError(f"node {chan.peer} did not answer {msg.TYPE.name} within "
                                    f"{timeout:g} s", node=chan.peer) from None

    async def _node_counters(self) -> list[dict[str, Any]]:
        out = []
        for chan in self._chans:
            reply = await self._request(chan, Stats())
            out.append(reply.counters or {})
        return out

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
        """Throughput, latency, bytes per hop, stage busy share/overhead, CPU-s and energy."""
        now = [self._control(c, Stats(), self.timeout).counters or {} for c in self._chans]
        window = (self._last_result - self._first_submit) if self._first_submit else 0.0
        return chain_report(
            nodes=self.nodes, hop_codecs=self.hop_codecs, requests=self._completed,
            window_s=window, latencies_s=self._latencies, hop0_bytes=dict(self._hop0_bytes),
            hop0_raw=self._hop0_raw, watts=self.watts_per_core,
            node_deltas=[counter_delta(a, b) for a, b in zip(now, self._baseline)])


_END = object()
