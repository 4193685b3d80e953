"""One edge node (`defer serve`): an asyncio server that runs one stage bundle.

Connections and lifecycle live here; the work itself is `pipeline.py` (queues, one engine thread,
backpressure) running `stage.run_stage`. The dispatcher's control connection brings
HELLO/LOAD/CONFIGURE/STATS/PING/SHUTDOWN, and the inputs when this is stage 0; the previous
node's data connection brings INFER otherwise; a probe connection (`defer profile`, `defer
doctor`, another node timing its link here) is answered by `probing.ProbeService`. Forwarded
tensors are passed on as received bytes.
Hardening: a peer must complete HELLO (with the token proof when the node has a token) before
anything else is read, and until then it may send only small frames; a malformed frame, a failed
proof or an internal error closes only that connection, with a logged reason; received tensors
are checked against the bundle's inputs before the engine sees them. Every connection runs
`Channel.keepalive`. A CONFIGURE starts a new wiring: work queued under the old one is dropped
(the dispatcher replays what has no result). When the next hop is lost, the node tells the
dispatcher once (ERROR, request id 0, naming the lost node) and drops what it cannot send; it
never fails requests for a transport fault, since the dispatcher may replay them. The newest
dispatcher wins: a second dispatcher's HELLO ends the first one's session (use a token).
Once listening, `defer serve` prints READY_PREFIX + HOST:PORT on stdout.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defer import __version__
from defer.address import format_address
from defer.codecs import parse_codec
from defer.engines import available_engines, load_engine
from defer.errors import (
    AuthError,
    DeferError,
    ManifestError,
    ProtocolError,
    StartupError,
    UsageError,
)
from defer.manifest import sha256_bytes
from defer.runtime.channel import STREAM_LIMIT, Channel, client_tls, server_tls
from defer.runtime.http import NodeHTTP
from defer.runtime.options import NodeConfig
from defer.runtime.pipeline import Pipeline
from defer.runtime.probing import ProbeService, default_max_model_size
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
from defer.runtime.stage import StageCounters, memory_available

log = logging.getLogger(__name__)

READY_PREFIX = "defer node listening on "  # + HOST:PORT: the line `defer serve` prints when ready


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config = config.checked()
        self.node_id = format_address(config.host, config.port)
        self.counters = StageCounters()
        self.pipeline = Pipeline(self.node_id, config.queue_size, self.counters)
        self._sha: str | None = None
        self._control: Channel | None = None
        self._downstream: Channel | None = None
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._connections = 0
        self._server_tls = server_tls(config.tls_cert, config.tls_key) \
            if config.tls_cert is not None else None
        self._client_tls = client_tls(config.tls_ca) if config.tls_ca is not None else None
        self.probes = ProbeService(
            lambda: self.node_id, self.stats, self.pipeline.executor, config.threads,
            config.max_model_size or default_max_model_size(), config.token, self._client_tls,
            config.connect_timeout)

    # --- lifecycle --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting, drain in-flight requests, exit. Safe from a signal handler."""
        self._stop.set()

    async def serve(self, on_ready: Callable[[str, str | None], None] | None = None) -> None:
        """Serve until request_stop() or SHUTDOWN; once listening, calls
        on_ready(address, http address or None)."""
        try:
            if self.config.bundle is not None:
                await self._load_file(self.config.bundle)
            server = await self._listen()  # outside the group: a StartupError stays itself
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                workers = [self._spawn(self.pipeline.compute_loop()),
                           self._spawn(self.pipeline.send_loop(self._route,
                                                               self._lose_downstream))]
                await server.start_serving()
                host, port = server.sockets[0].getsockname()[:2]
                self.node_id = self.pipeline.node_id = format_address(host, port)
                http = self._start_http()
                log.info("node %s listening (bundle %s, %s, %s%s)", self.node_id,
                         self._sha or "none yet", "TLS" if self._server_tls else "plain TCP",
                         "token required" if self.config.token else "no token",
                         f", http {format_address(*http.address)}" if http else "")
                if on_ready is not None:
                    on_ready(self.node_id, format_address(*http.address) if http else None)
                try:
                    await self._stop.wait()
                finally:
                    if http is not None:
                        http.stop()
                server.close()
                await self._drain(workers)
        finally:
            self.pipeline.close()

    def _start_http(self) -> NodeHTTP | None:
        if self.config.http_port is None:
            return None
        http = NodeHTTP(self.config.host, self.config.http_port, self._snapshot)
        http.start()
        return http

    def _snapshot(self) -> dict[str, Any]:
        return {**self.stats(), "ready": self.pipeline.engine is not None, "bundle": self._sha}

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

    async def _drain(self, workers: list[asyncio.Task]) -> None:
        left = await self.pipeline.drain(self.config.drain_timeout)
        for chan in (self._control, self._downstream):
            if chan is not None:
                await chan.close()
        busy = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                and not t.done()]
        for task in busy:
            task.cancel()
        log.info("node %s stopped: %d requests served, %d left undrained, %d tasks cancelled",
                 self.node_id, self.counters.requests, left, len(busy) - len(workers))

    def _spawn(self, coro) -> asyncio.Task:
        assert self._tg is not None
        return self._tg.create_task(coro)

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
                                      self.config.connect_timeout, self.config.heartbeat,
                                      info=self.facts())
            if hello.role == "dispatcher" and self._control is not None:
                self._replace_dispatcher(chan)
            self._spawn(chan.keepalive(self.config.heartbeat))
            chan.timing = self.pipeline.tracing  # an upstream connects once we are configured
            if hello.role == "dispatcher":
                await self._control_loop(chan)
            elif hello.role == "probe":
                await self.probes.serve(chan)
            else:
                await self._data_loop(chan)
            if chan.dead_reason:
                log.warning("dropped connection from %s: %s", chan.peer, chan.dead_reason)
                if chan.dead_reason.startswith("silent"):
                    self.counters.heartbeats_missed += 1
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
            await self.pipeline.put(msg, chan.frame_began)

    async def _control_loop(self, chan: Channel) -> None:
        self._control = chan
        self.pipeline.rewire()
        log.info("dispatcher %s connected", chan.peer)
        while (msg := await chan.recv()) is not None:
            match msg:
                case Infer():
                    await self.pipeline.put(msg, chan.frame_began)
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
            code = err.exit_code if isinstance(err, DeferError) else 1
            await chan.send(Error(request_id=msg.request_id, reason=reason, node=self.node_id,
                                  code=code))
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
        self._control = None
        self.pipeline.rewire()
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
        engine = await loop.run_in_executor(self.pipeline.executor, load_engine, bytes(data),
                                            self.config.threads)
        self.pipeline.rewire()
        self.pipeline.engine, self._sha = engine, sha
        log.info("loaded bundle %s (%d bytes, %s)", sha[:12], len(data), engine.format)

    async def _on_load(self, msg: Load) -> str:
        sha = sha256_bytes(msg.bundle)
        if sha != msg.sha256:
            raise ManifestError(f"pushed bundle hashes to {sha}, not the announced {msg.sha256}")
        await self._install(msg.bundle, sha)
        return "load"

    async def _on_configure(self, msg: Configure) -> str:
        engine = self.pipeline.engine
        if engine is None:
            raise ManifestError(f"node {self.node_id} has no bundle; push one with LOAD or "
                                "start it with `defer serve BUNDLE`")
        parse_codec(msg.codec)
        inputs = {i.name for i in engine.inputs}
        outputs = {o.name for o in engine.outputs}
        for what, names, pool in (("consumes", inputs, msg.receives),
                                  ("forwards", msg.forward, msg.receives),
                                  ("sends", msg.outputs, outputs)):
            missing = set(names) - set(pool)
            if missing:
                raise ManifestError(f"stage {msg.stage}: bundle {what} {sorted(missing)} that "
                                    "the plan does not provide; manifest and bundle disagree")
        self.pipeline.rewire()  # queued work is dropped: the dispatcher replays it
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
        self.pipeline.rewire(msg)
        if self._control is not None:
            self._control.timing = msg.trace
        log.info("configured as stage %d/%d, next hop %s, codec %s", msg.stage, msg.n_stages,
                 msg.next_hop, msg.codec)
        return "configure"

    def stats(self) -> dict[str, Any]:
        plan = self.pipeline.plan
        return self.counters.snapshot(node=self.node_id, stage=plan.stage if plan else None,
                                      connections=self._connections, **self.pipeline.depths())

    def facts(self) -> dict[str, Any]:
        """What this node tells a peer in its HELLO: enough to check it can serve a stage."""
        return {"defer": __version__, "cores": len(os.sched_getaffinity(0)),
                "threads": self.config.threads, "memory_available": memory_available(),
                "engines": available_engines(),
                "engine": self.pipeline.engine.format if self.pipeline.engine else None,
                "max_model_size": self.probes.max_model_size, "hop_cost": self.config.hop_cost}

    def _route(self, msg: Message) -> Channel | None:
        """Where a result goes: RESULT and ERROR to the dispatcher, INFER to the next hop."""
        return self._control if isinstance(msg, Result | Error) else self._downstream


def run_node(config: NodeConfig, on_ready: Callable[[str, str | None], None] | None = None,
             ) -> None:
    """Run a node until SIGINT/SIGTERM/SHUTDOWN (pins to `config.cpu` first); returns cleanly."""
    import signal

    config = config.checked()
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
