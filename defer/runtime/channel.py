"""An asyncio stream carrying defer frames: `recv() -> Message | None` (None = clean EOF) and
`send(msg)`. The only place node and dispatcher touch sockets; framing lives in `protocol`, the
proofs in `auth`. Each send writes one whole frame synchronously, so concurrent senders never
interleave frames. Reading goes straight into each frame's body buffer (`_Receiver`).

Also here, because both ends need them:
- the HELLO exchange with optional token authentication (`handshake` on the connecting side,
  `accept` on the node); an unauthenticated peer is held to HANDSHAKE_LIMITS;
- TLS contexts (`server_tls`, `client_tls`);
- `keepalive`: heartbeats and failure detection. It sends a heartbeat PING only when nothing
  else was sent for one interval, and it aborts the connection (recording `dead_reason`) when
  the peer stayed silent for DEAD_AFTER of its announced intervals while we waited to read. It
  reads counters the channel keeps anyway: no work per request.
- with `timing` on (traces), `frame_began`: when the frame `recv` just returned began to
  arrive (wall clock): the first wake-up for it, or, if its bytes were already waiting (the
  reader was busy), when `recv` was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from defer.address import parse_address
from defer.errors import AuthError, NodeError, ProtocolError, UsageError
from defer.runtime import auth
from defer.runtime.protocol import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Decoder,
    Error,
    Hello,
    Limits,
    Message,
    MsgType,
    Ping,
    encode_parts,
)

STREAM_LIMIT = 4 << 20  # asyncio pauses reading at 2x this; tensors are megabytes, not lines
READ_AHEAD = 256 * 1024  # stop reading once this much is received but not yet taken as frames
DIRECT_WRITE = 64 * 1024  # frame parts this big go to the socket as they are, never joined
# Ask the kernel for a send buffer that takes a multi-megabyte tensor in one send() (Linux's
# autotuning stops at tcp_wmem's 4 MB): measured on loopback, a node sending 1-4 MB frames spent
# 20-35% less CPU per frame (fewer partial sends, each copying the rest into asyncio's buffer
# and waking the loop again). Capped by net.core.wmem_max.
SEND_BUFFER = 4 << 20
DEAD_AFTER = 3  # a peer silent for this many of its heartbeat intervals is dead


def server_tls(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A node's TLS context (TLS 1.2+); UsageError names the file that will not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load TLS certificate {cert} / key {key}: {err}") from None
    return context


def client_tls(ca: str | Path) -> ssl.SSLContext:
    """Verify nodes against the CA (or self-signed certificate) in `ca`, host name included."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load TLS CA file {ca}: {err}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Receiver(asyncio.BufferedProtocol):
    """Reads a stream's transport in place of its StreamReader: the socket is read straight
    into the decoder's buffers (a frame's body, once its header is in), so a tensor is not
    copied between the kernel and the decoded frame. Writing, its flow control and closing
    stay with the stream's own protocol, so the StreamWriter works as before."""

    def __init__(self, decoder: Decoder, stream: asyncio.BaseProtocol):
        self.decoder, self.stream = decoder, stream
        self.transport: asyncio.BaseTransport | None = None
        self.received = 0
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._paused = False

    def take_over(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_protocol(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        self.decoder.buffer_updated(nbytes)
        if self.decoder.buffered >= READ_AHEAD and not self._paused:
            self._paused = True  # the reader is behind: let TCP push back on the sender
            self.transport.pause_reading()
        if self.decoder.ready:
            self._wake()

    def eof_received(self) -> bool | None:
        self.decoder.feed_eof()
        self._wake()
        return self.stream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.decoder.feed_eof()
        else:
            self.error = exc
        self._wake()
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()

    async def wait(self) -> None:
        """Until more bytes, EOF or an error arrive."""
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Channel:
    """One connection: a decoder on the read side, whole frames on the write side.

    It takes the stream's transport over for reading (`_Receiver`): use `recv`, never
    `reader`, once the channel exists.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                 limits: Limits = DEFAULT_LIMITS):
        self.reader, self.writer, self.peer = reader, writer, peer
        self.decoder = Decoder(limits)
        self.bytes_out = 0
        self.waiting = False  # True while recv() waits on the socket
        self.peer_heartbeat = 0.0  # seconds the peer promised between frames (0 = none)
        self.clock_offset = 0.0  # the peer's wall clock minus ours, estimated at HELLO
        self.peer_info: dict[str, Any] = {}  # the node's facts from its HELLO
        self.dead_reason: str | None = None  # why keepalive or an owner aborted it
        self.timing = False  # record frame_began (traces)
        self.frame_began = 0.0
        self._seen = 0  # bytes received when recv last took a frame
        self._receiver = _Receiver(self.decoder, writer.transport.get_protocol())
        # Bytes the StreamReader got before the take-over (none when built in the server's
        # connection callback: nothing is read before it returns).
        early = getattr(reader, "_buffer", None)
        if early:
            self._receiver.received += len(early)
            self.decoder.feed(bytes(early))
            early.clear()
        if reader.at_eof():
            self.decoder.feed_eof()
        self._receiver.take_over(writer.transport)
        _widen_send_buffer(writer.get_extra_info("socket"))

    @property
    def bytes_in(self) -> int:
        return self._receiver.received

    @classmethod
    async def connect(cls, address: str, timeout: float,
                      tls: ssl.SSLContext | None = None) -> Channel:
        """Open a connection; NodeError names the address if nothing answers in time."""
        host, port = parse_address(address)
        extra = {"ssl": tls, "server_hostname": host, "ssl_handshake_timeout": timeout} \
            if tls is not None else {}
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=STREAM_LIMIT, **extra), timeout)
        except TimeoutError:  # before OSError, its base class
            raise NodeError(f"node {address} is not reachable (timed out); is `defer serve` "
                            "running there?", node=address) from None
        except OSError as err:
            if tls is None or isinstance(err, ConnectionRefusedError | socket.gaierror):
                raise NodeError(f"node {address} is not reachable ({err}); is `defer serve` "
                                "running there?", node=address) from None
            reason = getattr(err, "reason", None) or str(err) or type(err).__name__
            raise NodeError(f"node {address}: TLS handshake failed ({reason}); does it serve "
                            "TLS, and does --tls-ca hold the CA that signed its certificate?",
                            node=address) from None
        return cls(reader, writer, address)

    async def recv(self) -> Message | None:
        """The next message, or None at a clean EOF. ProtocolError on a malformed frame.
        Heartbeats (PING with request id 0) are consumed here and never returned."""
        began = time.time() if self.timing and self._receiver.received != self._seen else 0.0
        while True:
            msg = self.decoder.next()
            if msg is not None:
                self._seen = self._receiver.received
                if msg.TYPE is MsgType.PING and msg.request_id == 0:
                    began = 0.0
                    continue
                if self.timing:
                    self.frame_began = began or time.time()
                return msg
            if self.decoder.eof:
                return None
            if self._receiver.error is not None:
                raise self._receiver.error
            self.waiting = True
            try:
                await self._receiver.wait()
            finally:
                self.waiting = False
            if self.timing and not began:
                began = time.time()

    def write(self, msg: Message) -> None:
        """Queue one whole frame without waiting for the socket. ConnectionResetError once
        the connection is closing."""
        if self.writer.is_closing():
            raise ConnectionResetError(f"connection to {self.peer} is closed")
        small: list[bytes | memoryview] = []
        for part in encode_parts(msg):
            size = part.nbytes if isinstance(part, memoryview) else len(part)
            self.bytes_out += size
            if size < DIRECT_WRITE:
                small.append(part)
                continue
            if small:  # header, metadata, small tensors: one write
                self.writer.write(b"".join(small))
                small = []
            self.writer.write(part)  # a tensor: no join, the socket takes it from its array
        if small:
            self.writer.write(b"".join(small))

    async def send(self, msg: Message) -> None:
        self.write(msg)
        await self.writer.drain()

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    def abort(self, reason: str) -> None:
        """Drop the connection now, buffered data included (the peer may never read it)."""
        if self.dead_reason is None:
            self.dead_reason = reason
        self.writer.transport.abort()

    async def close(self, timeout: float = 1.0) -> None:
        """Close, flushing what is buffered for up to `timeout` s, then abort (a hung peer
        must not hold us)."""
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except TimeoutError:
            self.writer.transport.abort()
        except OSError:
            pass

    # --- HELLO and authentication -----------------------------------------------------------

    async def handshake(self, role: str, token: str | None, timeout: float,
                        heartbeat: float = 0.0, node_id: str = "") -> Hello:
        """The connecting side: send HELLO, prove the token if the node asks, return the node's
        final HELLO. AuthError when either side cannot prove the token."""
        nonce, beat = auth.new_nonce(), round(heartbeat * 1000)
        sent = time.time()
        await self.send(Hello(role=role, node_id=node_id, challenge=nonce, heartbeat_ms=beat))
        reply = await self._hello_reply(timeout, "HELLO")
        if reply.challenge is None and token is not None:
            raise AuthError(f"node {self.peer} does not authenticate (started without a "
                            "token), so it may not be the node you meant; start it with --token "
                            "or DEFER_TOKEN", node=self.peer)
        if reply.challenge is not None:
            if token is None:
                raise AuthError(f"node {self.peer} requires a token; pass --token or set "
                                "DEFER_TOKEN", node=self.peer)
            if not auth.check(token, "node", role, nonce, reply.challenge, reply.response):
                raise AuthError(f"node {self.peer} could not prove it holds our token; the "
                                "tokens differ", node=self.peer)
            answer = auth.proof(token, "client", role, nonce, reply.challenge)
            sent = time.time()
            await self.send(Hello(role=role, node_id=node_id, response=answer,
                                  heartbeat_ms=beat))
            reply = await self._hello_reply(timeout, "authentication")
        self.peer_heartbeat = reply.heartbeat_ms / 1000
        # the peer's clock minus ours, assuming its HELLO left half way through the round trip
        self.clock_offset = reply.clock - (sent + time.time()) / 2
        self.peer_info = reply.info or {}
        return reply

    async def _hello_reply(self, timeout: float, during: str) -> Hello:
        msg = await asyncio.wait_for(self.recv(), timeout)
        if isinstance(msg, Error):
            raise AuthError(f"node {self.peer} refused us: {msg.reason}", node=self.peer)
        if msg is None:
            raise NodeError(f"node {self.peer} closed the connection during {during}; if it "
                            "serves TLS, pass --tls-ca", node=self.peer)
        check_hello(msg, self.peer)
        return msg  # type: ignore[return-value]

    async def accept(self, node_id: str, token: str | None, bundle_sha256: str | None,
                     timeout: float, heartbeat: float = 0.0,
                     info: dict[str, Any] | None = None) -> Hello:
        """The node's side: take the peer's HELLO, demand the token proof if we have a token,
        answer with our HELLO, lift the handshake limits. AuthError (after telling the peer)
        if it cannot prove the token; ProtocolError for anything but HELLO."""
        hello = await asyncio.wait_for(self.recv(), timeout)
        check_hello(hello, self.peer)
        beat = round(heartbeat * 1000)
        if token is not None:
            if hello.challenge is None:
                await self._refuse(node_id, "authentication required: this node has a token")
            nonce = auth.new_nonce()
            await self.send(Hello(node_id=node_id, challenge=nonce, heartbeat_ms=beat,
                                  response=auth.proof(token, "node", hello.role,
                                                      hello.challenge, nonce)))
            answer = await asyncio.wait_for(self.recv(), timeout)
            if not (isinstance(answer, Hello) and answer.role == hello.role and auth.check(
                    token, "client", hello.role, hello.challenge, nonce, answer.response)):
                await self._refuse(node_id, "authentication failed: wrong or missing token")
        await self.send(Hello(node_id=node_id, bundle_sha256=bundle_sha256, heartbeat_ms=beat,
                              info=info))
        self.peer_heartbeat = hello.heartbeat_ms / 1000
        self.decoder.limits = DEFAULT_LIMITS
        return hello

    async def _refuse(self, node_id: str, reason: str) -> None:
        with contextlib.suppress(OSError):
            await self.send(Error(reason=reason, node=node_id))
        raise AuthError(f"{self.peer}: {reason}")

    # --- failure detection ------------------------------------------------------------------

    async def keepalive(self, interval: float, patience: float = 0.0) -> None:
        """Run until the connection closes: heartbeat every `interval` s of our silence, abort
        once the peer is silent for DEAD_AFTER x its own interval (or `patience` s, if longer)
        while we wait to read. A peer that promises no heartbeats is never taken for dead."""
        periods = [t for t in (interval, self.peer_heartbeat) if t > 0]
        if not periods:
            return
        tick = min(periods) / 2
        dead_after = max(DEAD_AFTER * self.peer_heartbeat, patience) if self.peer_heartbeat else 0
        loop = asyncio.get_running_loop()
        heard = sent = last_tick = loop.time()
        seen_in, seen_out = self.bytes_in, self.bytes_out
        while not self.closing:
            await asyncio.sleep(tick)
            now = loop.time()
            if self.bytes_in != seen_in or not self.waiting or now - last_tick > 2 * tick:
                # new bytes, a busy reader, or our own loop stalled: no verdict on the peer
                seen_in, heard = self.bytes_in, now
            elif dead_after and now - heard > dead_after:
                self.abort(f"silent for {now - heard:.1f} s (no heartbeat; hung or cut off)")
                return
            last_tick = now
            if self.bytes_out != seen_out:
                seen_out, sent = self.bytes_out, now
            elif interval and now - sent >= interval and not self.closing:
                self.write(Ping())
                seen_out, sent = self.bytes_out, now


def _widen_send_buffer(sock) -> None:
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # Linux doubles it (bookkeeping) and keeps it fixed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def check_hello(msg: Message | None, peer: str) -> None:
    """The first message on a connection must be a HELLO of our protocol version."""
    if not isinstance(msg, Hello):
        got = "end of stream" if msg is None else type(msg).__name__.upper()
        raise ProtocolError(f"{peer}: expected HELLO, got {got}")
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks protocol version {msg.version}, this defer speaks "
                            f"{PROTOCOL_VERSION}; run the same defer version on every machine")

