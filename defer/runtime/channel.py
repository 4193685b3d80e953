# An asyncio stream carrying defer frames: `recv() -> Message | None` (None = clean EOF) and
# `send(msg)`. The only place node and dispatcher touch sockets; framing lives in `protocol`.
# Each send writes one whole frame synchronously, so concurrent senders never interleave frames.
from __future__ import annotations

import asyncio
import contextlib

from defer.errors import NodeError, ProtocolError, UsageError
from defer.runtime.protocol import PROTOCOL_VERSION, Decoder, Hello, Message, encode_parts

READ_CHUNK = 1 << 20
STREAM_LIMIT = 4 << 20  # asyncio pauses reading at 2x this; tensors are megabytes, not lines


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") -> (host, port); UsageError shows the expected form."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad node address {address!r}; expected host:port, "
                         "e.g. 127.0.0.1:7000")
    return host, int(port)


class Channel:
    """One connection: a decoder on the read side, whole frames on the write side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str):
        self.reader, self.writer, self.peer = reader, writer, peer
        self.decoder = Decoder()
        self.bytes_in = 0
        self.bytes_out = 0

    @classmethod
    async def connect(cls, address: str, timeout: float) -> Channel:
        """Open a connection; NodeError names the address if nothing answers in time."""
        host, port = parse_address(address)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=STREAM_LIMIT), timeout)
        except (TimeoutError, OSError) as err:
            reason = "timed out" if isinstance(err, asyncio.TimeoutError) else str(err)
            raise NodeError(f"node {address} is not reachable ({reason}); is `defer serve` "
                            "running there?", node=address) from None
        return cls(reader, writer, address)

    async def recv(self) -> Message | None:
        """The next message, or None at a clean EOF. ProtocolError on a malformed frame."""
        while True:
            msg = self.decoder.next()
            if msg is not None or self.decoder.eof:
                return msg
            data = await self.reader.read(READ_CHUNK)
            if data:
                self.bytes_in += len(data)
                self.decoder.feed(data)
            else:
                self.decoder.feed_eof()

    def write(self, msg: Message) -> None:
        """Queue one whole frame without waiting for the socket."""
        parts = encode_parts(msg)
        self.bytes_out += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        self.writer.writelines(parts)

    async def send(self, msg: Message) -> None:
        self.write(msg)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def handshake(self, hello: Hello, timeout: float) -> Hello:
        """Send our HELLO, return the peer's; a version mismatch is a ProtocolError."""
        await self.send(hello)
        reply = await asyncio.wait_for(self.recv(), timeout)
        check_hello(reply, self.peer)
        return reply  # type: ignore[return-value]


def check_hello(msg: Message | None, peer: str) -> None:
    """The first message on a connection must be a HELLO of our protocol version."""
    if not isinstance(msg, Hello):
        got = "end of stream" if msg is None else type(msg).__name__.upper()
        raise ProtocolError(f"{peer}: expected HELLO, got {got}")
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks protocol version {msg.version}, this defer speaks "
                            f"{PROTOCOL_VERSION}; run the same defer version on every machine")
