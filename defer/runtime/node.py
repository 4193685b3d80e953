# One edge node (`defer serve`): an asyncio server that runs one stage bundle with onnxruntime.
# The dispatcher's control connection brings HELLO/LOAD/CONFIGURE/STATS/PING/SHUTDOWN, and the
# inputs when this is stage 0; the previous node's data connection brings INFER otherwise.
# Received requests wait in a bounded queue, onnxruntime (plus codec work) runs in ONE worker
# thread, results wait in a bounded send queue for the next node (or, on the last stage, the
# dispatcher). Full queues stop reading the socket: that is the backpressure. Forwarded tensors
# are passed on as received bytes, never decoded.
# Hardening: a peer must complete HELLO (with the token proof when the node has a token) before
# anything else is read, and until then it may send only small frames; a malformed frame, a
# failed proof or an internal error closes only that connection, with a logged reason; received
# tensors are checked against the bundle's inputs (dtype, shape) before onnxruntime sees them.
# Every connection runs `Channel.keepalive`. A CONFIGURE starts a new wiring: work queued under
# the old one is dropped (the dispatcher replays what has no result). When the next hop is lost,
# the node tells the dispatcher once (ERROR, request id 0, naming the lost node) and drops what it
# cannot send; it never fails requests for a transport fault, since the dispatcher may replay them.
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defer.codecs import decode_tensor, encode_tensor, parse_codec
from defer.engines import Engine, load_engine
from defer.errors import (
    AuthError,
    DeferError,
    InputError,
    ManifestError,
    NodeError,
    ProtocolError,
    StartupError,
    UsageError,
)
from defer.manifest import sha256_bytes
from defer.runtime.channel import (
    DEFAULT_HEARTBEAT,
    STREAM_LIMIT,
    Channel,
    client_tls,
    server_tls,
)
from defer.runtime.protocol import (
    HANDSHAKE_LIMITS,
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
from defer.tensors import check_tensor

log = logging.getLogger(__name__)

READY_PREFIX = "defer node listening on "  # + HOST:PORT: the line `defer serve` prints when ready


@dataclass
class NodeConfig:
    """How to run a node. `port=0` picks a free port; `cpu` pins the process to that core.

    `token`: peers must prove they hold it (HMAC challenge-response in HELLO). `tls_cert` +
    `tls_key`: serve TLS. `tls_ca`: verify the next hop's TLS certificate against this CA.
    `heartbeat`: seconds between heartbeats on an idle connection (0 = none).
    """

    host: str = "127.0.0.1"
    port: int = 7000
    bundle: Path | None = None
    threads: int = 1
    cpu: int | None = None
    queue_size: int = 4
    drain_timeout: float = 10.0
    connect_timeout: float = 10.0
    token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    max_connections: int = 64


class _Counters:
    """What STATS reports. Written by the loop and the worker thread, each its own fields."""

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.busy_s = self.decode_s = self.encode_s = 0.0
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()
        self.raw_out = 0  # what bytes_out would be with the raw codec
        self.queue_max = 0
        self.refused = 0  # connections closed for a bad HELLO, token, frame or over the limit
        self.started = time.monotonic()


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.node_id = f"{config.host}:{config.port}"
        self._engine: Engine | None = None
        self._sha: str | None = None
        self._plan: Configure | None = None
        self._generation = 0  # bumped per dispatcher session; stale work is dropped
        self._control: Channel | None = None
        self._downstream: Channel | None = None
        self._compute_q: asyncio.Queue[tuple[int, Infer]] = asyncio.Queue(config.queue_size)
        self._send_q: asyncio.Queue[tuple[int, Message]] = asyncio.Queue(config.queue_size)
        self._in_worker = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defer-ort")
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._connections = 0
        self._server_tls = self._client_tls = None
        if (config.tls_cert is None) != (config.tls_key is None):
            raise UsageError("TLS needs both --tls-cert and --tls-key")
        if config.tls_cert is not None:
            self._server_tls = server_tls(config.tls_cert, config.tls_key)
        if config.tls_ca is not None:
            self._client_tls = client_tls(config.tls_ca)
        self.counters = _Counters()

    # --- lifecycle --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting, drain in-flight requests, exit. Safe from a signal handler."""
        self._stop.set()

    async def serve(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        """Serve until request_stop() or SHUTDOWN; calls on_ready(host, port) once listening."""
        try:
            if self.config.bundle is not None:
                await self._load_file(self.config.bundle)
            server = await self._listen()  # outside the group: a StartupError stays itself
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn(self._compute_loop())
                self._spawn(self._send_loop())
                await server.start_serving()
                host, port = server.sockets[0].getsockname()[:2]
                self.node_id = f"{host}:{port}"
                log.info("node %s listening (bundle %s, %s, %s)", self.node_id,
                         self._sha or "none yet", "TLS" if self._server_tls else "plain TCP",
                         "token required" if self.config.token else "no token")
                if on_ready is not None:
                    on_ready(host, port)
                await self._stop.wait()
                server.close()
                await self._drain()
        finally:
            self._executor.shutdown(wait=True)

    async def _load_file(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StartupError(f"cannot read bundle {path}: {err}") from None
        try:
            await self._install(data, sha256_bytes(data))
        except ManifestError as err:
            raise StartupError(f"{path}: {err}") from None

    async def _listen(self) -> asyncio.Server:
        try:
            tls = {"ssl": self._server_tls,
                   "ssl_handshake_timeout": self.config.connect_timeout} \
                if self._server_tls else {}
            return await asyncio.start_server(self._on_connect, self.config.host,
                                              self.config.port, start_serving=False,
                                              limit=STREAM_LIMIT, **tls)
        except OSError as err:
            raise StartupError(f"cannot listen on {self.config.host}:{self.config.port}: "
                               f"{err.strerror or err}; pick another --port (0 = any free)") from None

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while (self._compute_q.qsize() or self._send_q.qsize() or self._in_worker) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        left = self._compute_q.qsize() + self._send_q.qsize() + self._in_worker
        for chan in (self._control, self._downstream):
            if chan is not None:
                await chan.close()
        busy = [t for t in self._tasks if not t.done()]
        for task in busy:
            task.cancel()
        log.info("node %s stopped: %d requests served, %d left undrained, %d tasks cancelled",
                 self.node_id, self.counters.requests, left, len(busy))

    def _spawn(self, coro) -> asyncio.Task:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if peer else "unknown peer"
        if self._connections >= self.config.max_connections:
            self.counters.refused += 1
            log.warning("refusing connection from %s: %d connections open, the limit", name,
                        self._connections)
            writer.transport.abort()
            return
        self._connections += 1
        self._spawn(self._connection(Channel(reader, writer, name, HANDSHAKE_LIMITS)))

    # --- connections ------------------------------------------------------------------------

    async def _connection(self, chan: Channel) -> None:
        try:
            hello = await chan.accept(self.node_id, self.config.token, self._sha,
                                      self.config.connect_timeout, self.config.heartbeat)
            if hello.role == "dispatcher" and self._control is not None:
                self._replace_dispatcher(chan)
            self._spawn(chan.keepalive(self.config.heartbeat))
            if hello.role == "dispatcher":
                await self._control_loop(chan)
            else:
                await self._data_loop(chan)
            if chan.dead_reason:
                log.warning("dropped connection from %s: %s", chan.peer, chan.dead_reason)
        except (AuthError, ProtocolError) as err:
            self.counters.refused += 1
            log.warning("closing connection from %s: %s", chan.peer, err)
        except (TimeoutError, OSError) as err:
            log.info("connection from %s lost: %s", chan.peer,
                     chan.dead_reason or err or type(err).__name__)
        except Exception:  # a bug must cost one connection, never the node
            log.exception("internal error on the connection from %s; closing it", chan.peer)
        finally:
            self._connections -= 1
            if chan is self._control:
                self._end_session()
            await chan.close()

    async def _data_loop(self, chan: Channel) -> None:
        while (msg := await chan.recv()) is not None:
            if not isinstance(msg, Infer):
                raise ProtocolError(f"data connection carries INFER only, got {msg.TYPE.name}")
            await self._enqueue(msg)

    async def _control_loop(self, chan: Channel) -> None:
        self._control = chan
        self._generation += 1
        log.info("dispatcher %s connected", chan.peer)
        while (msg := await chan.recv()) is not None:
            match msg:
                case Infer():
                    await self._enqueue(msg)
                case Load():
                    await self._reply(chan, msg, self._on_load(msg))
                case Configure():
                    await self._reply(chan, msg, self._on_configure(msg))
                case Stats():
                    chan.write(Stats(request_id=msg.request_id, counters=self.stats()))
                case Ping():  # heartbeats (request id 0) never get here
                    chan.write(Pong(request_id=msg.request_id))
                case Shutdown():
                    await chan.send(Ack(request_id=msg.request_id, what="shutdown"))
                    self.request_stop()
                case _:
                    raise ProtocolError(f"unexpected {msg.TYPE.name} on a control connection")

    async def _reply(self, chan: Channel, msg: Message, action) -> None:
        try:
            what = await action
        except (DeferError, TimeoutError, OSError) as err:
            reason = str(err) or f"{type(err).__name__} while handling {msg.TYPE.name}"
            await chan.send(Error(request_id=msg.request_id, reason=reason, node=self.node_id))
        else:
            await chan.send(Ack(request_id=msg.request_id, what=what))

    def _replace_dispatcher(self, chan: Channel) -> None:
        # The newest dispatcher wins: the old one is gone or about to be (closing races ours).
        old = self._control
        log.warning("dispatcher %s replaces %s", chan.peer, old.peer)
        with contextlib.suppress(OSError):
            old.write(Error(reason=f"replaced by dispatcher {chan.peer}", node=self.node_id))
        old.writer.close()
        self._end_session()

    def _end_session(self) -> None:
        log.info("dispatcher %s disconnected; dropping its chain", self._control.peer)
        self._control, self._plan = None, None
        self._generation += 1
        self._drop_downstream("the dispatcher left")

    def _drop_downstream(self, reason: str) -> None:
        chan, self._downstream = self._downstream, None
        if chan is not None:
            chan.abort(reason)

    def _lose_downstream(self, chan: Channel, reason: str) -> None:
        """The next hop failed: tell the dispatcher once, naming it, so it can fail over."""
        if chan is not self._downstream:
            return  # already replaced or dropped on purpose
        self._drop_downstream(reason)
        log.error("next hop %s lost: %s", chan.peer, reason)
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.write(Error(reason=f"next hop {chan.peer} lost: {reason}",
                                          node=chan.peer))

    async def _watch_downstream(self, chan: Channel) -> None:
        """Read the next hop's connection (it sends only heartbeats) until it ends."""
        self._spawn(chan.keepalive(self.config.heartbeat))
        try:
            while (msg := await chan.recv()) is not None:
                if not isinstance(msg, Pong):
                    raise ProtocolError(f"the next hop sent {msg.TYPE.name}; it should send "
                                        "only heartbeats")
            reason = chan.dead_reason or "it closed the connection"
        except (ProtocolError, OSError) as err:
            reason = chan.dead_reason or str(err) or type(err).__name__
        self._lose_downstream(chan, reason)

    # --- control actions --------------------------------------------------------------------

    async def _install(self, data: bytes | memoryview, sha: str) -> None:
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(self._executor, load_engine, bytes(data),
                                            self.config.threads)
        self._engine, self._sha, self._plan = engine, sha, None
        log.info("loaded bundle %s (%d bytes)", sha[:12], len(data))

    async def _on_load(self, msg: Load) -> str:
        sha = sha256_bytes(msg.bundle)
        if sha != msg.sha256:
            raise ManifestError(f"pushed bundle hashes to {sha}, not the announced {msg.sha256}")
        await self._install(msg.bundle, sha)
        return "load"

    async def _on_configure(self, msg: Configure) -> str:
        if self._engine is None:
            raise ManifestError(f"node {self.node_id} has no bundle; push one with LOAD or "
                                "start it with `defer serve BUNDLE`")
        parse_codec(msg.codec)
        inputs = {i.name for i in self._engine.inputs}
        outputs = {o.name for o in self._engine.outputs}
        for what, names, pool in (("consumes", inputs, msg.receives),
                                  ("forwards", msg.forward, msg.receives),
                                  ("sends", msg.outputs, outputs)):
            missing = set(names) - set(pool)
            if missing:
                raise ManifestError(f"stage {msg.stage}: bundle {what} {sorted(missing)} that "
                                    "the plan does not provide; manifest and bundle disagree")
        self._generation += 1  # a new wiring: queued work is dropped, the dispatcher replays it
        self._plan = None
        self._drop_downstream("rewired")
        if msg.next_hop != "dispatcher":
            chan = await Channel.connect(msg.next_hop, self.config.connect_timeout,
                                         self._client_tls)
            try:
                await chan.handshake("upstream", self.config.token, self.config.connect_timeout,
                                     self.config.heartbeat, node_id=self.node_id)
            except BaseException:
                chan.abort("handshake failed")
                raise
            self._downstream = chan
            self._spawn(self._watch_downstream(chan))
        self._plan = msg
        log.info("configured as stage %d/%d, next hop %s, codec %s", msg.stage, msg.n_stages,
                 msg.next_hop, msg.codec)
        return "configure"

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "node": self.node_id, "stage": self._plan.stage if self._plan else None,
            "requests": c.requests, "errors": c.errors, "busy_s": c.busy_s,
            "decode_s": c.decode_s, "encode_s": c.encode_s, "cpu_s": time.process_time(),
            "wall_s": time.monotonic() - c.started, "bytes_in": dict(c.bytes_in),
            "bytes_out": dict(c.bytes_out), "raw_out": c.raw_out, "queue_depth": self._compute_q.qsize(),
            "queue_max": c.queue_max, "send_queue_depth": self._send_q.qsize(),
            "refused": c.refused, "connections": self._connections,
        }

    # --- the pipeline -----------------------------------------------------------------------

    async def _enqueue(self, msg: Infer) -> None:
        for t in msg.tensors:
            self.counters.bytes_in[t.codec] += t.nbytes
        await self._compute_q.put((self._generation, msg))
        self.counters.queue_max = max(self.counters.queue_max, self._compute_q.qsize())

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            generation, msg = await self._compute_q.get()
            plan, engine = self._plan, self._engine
            if generation != self._generation or plan is None or engine is None:
                log.debug("dropping request %d: queued under an old wiring", msg.request_id)
                continue
            self._in_worker += 1  # until it is in the send queue, so a drain waits for it
            try:
                out = await loop.run_in_executor(self._executor, self._run_stage, plan,
                                                 engine, msg)
            except DeferError as err:
                self.counters.errors += 1
                log.warning("request %d failed: %s", msg.request_id, err)
                out = Error(request_id=msg.request_id, reason=str(err), node=self.node_id)
            except Exception as err:  # a bug must fail one request, never the node
                self.counters.errors += 1
                log.exception("request %d: internal error", msg.request_id)
                out = Error(request_id=msg.request_id, node=self.node_id,
                            reason=f"internal error at stage {plan.stage}: {err!r:.200}")
            try:
                await self._send_q.put((generation, out))
            finally:
                self._in_worker -= 1

    def _run_stage(self, plan: Configure, engine: Engine, msg: Infer) -> Message:
        """Worker thread: check and decode what onnxruntime consumes, run it, encode, forward."""
        c, t0 = self.counters, time.perf_counter()
        received = {t.name: t for t in msg.tensors}
        if received.keys() != plan.receives_set:
            raise InputError(f"stage {plan.stage} expects tensors {sorted(plan.receives)}, "
                             f"got {sorted(received)}")
        for spec in engine.inputs:
            tensor = received[spec.name]
            check_tensor(spec, tensor.dtype, tensor.shape,
                         f"stage {plan.stage}: tensor {spec.name!r}", arrived=True)
        feeds = {spec.name: decode_tensor(received[spec.name]) for spec in engine.inputs}
        t1 = time.perf_counter()
        try:
            arrays = engine.run(plan.outputs, feeds)
        except Exception as err:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise NodeError(f"onnxruntime failed at stage {plan.stage}: {err}",
                            node=self.node_id) from None
        t2 = time.perf_counter()
        codec = parse_codec(plan.codec)
        tensors = [encode_tensor(name, a, codec) for name, a in zip(plan.outputs, arrays)]
        tensors += [received[name] for name in plan.forward]
        c.decode_s += t1 - t0
        c.busy_s += t2 - t1
        c.encode_s += time.perf_counter() - t2
        c.requests += 1
        last = plan.next_hop == "dispatcher"
        return (Result if last else Infer)(request_id=msg.request_id, tensors=tuple(tensors))

    async def _send_loop(self) -> None:
        while True:
            generation, msg = await self._send_q.get()
            if generation != self._generation:
                continue
            to_dispatcher = isinstance(msg, Result | Error)
            chan = self._control if to_dispatcher else self._downstream
            if chan is None or chan.closing:
                log.debug("dropping request %d: nowhere to send it", msg.request_id)
                continue
            try:
                await chan.send(msg)
            except OSError as err:
                if not to_dispatcher:
                    self._lose_downstream(chan, str(err) or type(err).__name__)
                continue
            if isinstance(msg, Infer | Result):
                for t in msg.tensors:
                    self.counters.bytes_out[t.codec] += t.nbytes
                    self.counters.raw_out += t.raw_nbytes


def run_node(config: NodeConfig, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Run a node until SIGINT/SIGTERM/SHUTDOWN (pins to `config.cpu` first); returns cleanly."""
    import signal

    if config.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {config.threads}")
    if config.cpu is not None:
        allowed = os.sched_getaffinity(0)
        if config.cpu not in allowed:
            raise UsageError(f"--cpu {config.cpu} is not available; this process may use "
                             f"cores {sorted(allowed)}")
        os.sched_setaffinity(0, {config.cpu})

    async def main() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        await node.serve(on_ready)

    asyncio.run(main())
