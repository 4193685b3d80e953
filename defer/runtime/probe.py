"""The asking side of a probe connection (`defer profile`, `defer doctor`, and a node timing
its link to another node): connect, HELLO with role "probe" (token proof, TLS if given), then
one request at a time. A probe never takes over the node's chain.

    async with open_probe("10.0.0.2:7000", token, tls, timeout=5) as probe:
        probe.hello, probe.info                  # the node's HELLO and its facts
        await probe.ping()                       # seconds of a PING/PONG round trip
        await probe.transfer(up=1 << 20)         # seconds of one timed ECHO
        await probe.ask(Profile(...), timeout)   # the reply; refusals raise, naming the node

The node's heartbeats are watched while we wait (`Channel.keepalive`), so a node that dies or
hangs mid-request is named within seconds, not at the end of a long timeout. A probed node
may stay silent for PATIENCE seconds (or 3 of its heartbeats, if longer): a slow device's loop
stalls while it takes in and copies a 100 MB model (at 0.05 of a core, 2-4 s with the GIL
held), which is not death; one that dies closes its connection and is named at once. Every
failure is a NodeError (AuthError, DeferTimeoutError) or a ManifestError naming the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from defer.errors import (
    DeferTimeoutError,
    ManifestError,
    NodeError,
    ProtocolError,
    UsageError,
)
from defer.runtime.channel import Channel
from defer.runtime.protocol import MAX_TRANSFER, Echo, Error, Hello, Message, Ping, Pong

ZERO_PAYLOAD = memoryview(bytes(MAX_TRANSFER))  # the payload of every timed transfer
PATIENCE = 20.0  # seconds of a probed node's silence before it is taken for dead


class Probe:
    """One open probe connection to the node at `address`."""

    def __init__(self, chan: Channel, address: str, hello: Hello) -> None:
        self.channel, self.address, self.hello = chan, address, hello
        self._ids = itertools.count(1)

    @property
    def info(self) -> dict[str, Any]:
        """The node's facts from its HELLO (defer version, cores, memory, engines...)."""
        return self.channel.peer_info

    async def ask(self, msg: Message, timeout: float) -> Message:
        """Send `msg`, return the node's reply to it. ERROR replies raise (ManifestError for
        the node's exit code 2, else NodeError); so do silence, a closed connection and a
        malformed frame, each naming the node."""
        msg = dataclasses.replace(msg, request_id=next(self._ids))
        try:
            self.channel.write(msg)
            reply = await asyncio.wait_for(self._reply_to(msg.request_id), timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"node {self.address} did not answer {msg.TYPE.name} "
                                    f"within {timeout:g} s", node=self.address) from None
        except ProtocolError as err:
            self.channel.abort(str(err))
            raise NodeError(f"node {self.address} sent a malformed reply to {msg.TYPE.name}: "
                            f"{err}", node=self.address) from None
        except OSError as err:
            raise NodeError(f"node {self.address}: connection lost during {msg.TYPE.name} "
                            f"({self.channel.dead_reason or err})", node=self.address) from None
        if isinstance(reply, Error):
            error = f"node {self.address} refused {msg.TYPE.name}: {reply.reason}"
            if reply.code == UsageError.exit_code:
                raise ManifestError(error)
            raise NodeError(error, node=self.address)
        return reply

    async def _reply_to(self, request_id: int) -> Message:
        while True:
            msg = await self.channel.recv()
            if msg is None:
                reason = self.channel.dead_reason or "it closed the connection"
                raise ConnectionResetError(reason)
            if msg.request_id == request_id:
                return msg
            if isinstance(msg, Error) and msg.request_id == 0:
                raise ConnectionResetError(msg.reason)

    async def ping(self, timeout: float = 5.0) -> float:
        """Seconds of one PING/PONG round trip (no clocks compared)."""
        start = time.perf_counter()
        reply = await self.ask(Ping(), timeout)
        if not isinstance(reply, Pong):
            raise NodeError(f"node {self.address} answered PING with {reply.TYPE.name}",
                            node=self.address)
        return time.perf_counter() - start

    async def transfer(self, up: int = 0, down: int = 0, timeout: float = 60.0) -> float:
        """Seconds of one ECHO: `up` bytes to the node, `down` bytes back."""
        start = time.perf_counter()
        reply = await self.ask(Echo(payload=ZERO_PAYLOAD[:up], reply_size=down), timeout)
        if not isinstance(reply, Echo) or len(reply.payload) != down:
            raise NodeError(f"node {self.address} answered ECHO wrongly ({reply.TYPE.name})",
                            node=self.address)
        return time.perf_counter() - start


@contextlib.asynccontextmanager
async def open_probe(address: str, token: str | None, tls: ssl.SSLContext | None,
                     timeout: float, node_id: str = "probe") -> AsyncIterator[Probe]:
    """A probe connection to `address`, closed on exit (see the module docstring)."""
    chan = await Channel.connect(address, timeout, tls)
    try:
        try:
            hello = await asyncio.wait_for(chan.handshake("probe", token, timeout,
                                                          node_id=node_id), timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"node {address} did not finish HELLO within {timeout:g} s",
                                    node=address) from None
        except ProtocolError as err:
            raise NodeError(f"node {address}: {err}", node=address) from None
        except OSError as err:
            raise NodeError(f"node {address} is not reachable ({err}); is `defer serve` "
                            "running there?", node=address) from None
        async with asyncio.TaskGroup() as tg:
            # the node's heartbeats, waited for PATIENCE at least; we promise none
            watch = tg.create_task(chan.keepalive(0.0, patience=PATIENCE))
            try:
                yield Probe(chan, address, hello)
            finally:
                watch.cancel()
    finally:
        await chan.close()
