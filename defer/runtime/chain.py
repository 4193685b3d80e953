"""Chain wiring, on the dispatcher's loop thread: connect to each node (HELLO + token proof),
make sure it serves its stage's bundle (check the hash, or push it with LOAD), CONFIGURE it
with its next hop, and ask control questions (STATS, PING, SHUTDOWN) with one typed
request/reply helper, `ask`.

A node's refusal maps to the error of its kind: the ERROR reply carries the exit code of the
node's error, so a bad or mismatched bundle is a ManifestError (exit 2) and an unreachable next
hop a NodeError (exit 1), both naming the node. Each connection gets a reader task (replies to
`ask` are routed here; everything else goes to the listener) and a heartbeat task; when a
connection ends, the listener hears `on_lost(stage, error)` once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from defer.errors import (
    AuthError,
    DeferError,
    DeferTimeoutError,
    ManifestError,
    NodeError,
    ProtocolError,
)
from defer.manifest import Manifest, sha256_bytes
from defer.runtime.channel import Channel
from defer.runtime.loop_thread import LoopThread
from defer.runtime.protocol import Ack, Configure, Error, Load, Message, Pong, Stats

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # connect + HELLO on loopback or a LAN; LOAD gets the full timeout


class Listener(Protocol):
    def on_message(self, stage: int, msg: Message) -> None: ...

    def on_lost(self, stage: int, error: NodeError) -> None: ...


@dataclasses.dataclass
class Link:
    """One live connection to the node serving `stage`."""

    stage: int
    address: str
    channel: Channel


class Chain:
    """The connections to the nodes of one chain, in stage order, and how to (re)wire them."""

    def __init__(self, manifest: Manifest, hop_codecs: list[str], *, loop: LoopThread,
                 listener: Listener, ids: Iterator[int], timeout: float, heartbeat: float,
                 token: str | None, tls: ssl.SSLContext | None, trace: bool = False) -> None:
        self.manifest, self.hop_codecs = manifest, hop_codecs
        self.loop, self.listener, self.ids = loop, listener, ids
        self.timeout, self.heartbeat, self.token, self.tls = timeout, heartbeat, token, tls
        self.trace = trace  # nodes add their spans to every request (traces)
        self.links: list[Link | None] = [None] * len(manifest.stages)
        self.addresses: list[str] = [""] * len(manifest.stages)
        self._replies: dict[int, tuple[Channel, asyncio.Future]] = {}

    # --- wiring -----------------------------------------------------------------------------

    async def wire(self, addresses: list[str], on_node: Callable[[], Any] = lambda: None,
                   ) -> None:
        """Open every node (push bundles where needed; `on_node()` after each), then configure
        from the last stage back, so each node's next hop is up when it connects to it."""
        for index, address in enumerate(addresses):
            self._install(index, await self.open(index, address, push=False))
            on_node()
        for index in reversed(range(len(addresses))):
            await self.configure(index)

    async def replace(self, stage: int, candidates: list[str], spares: list[str]) -> str:
        """Wire a new node (a candidate, else the next spare, consumed) in as `stage` and rewire
        its predecessor; its address. NodeError listing every attempt if none works."""
        reasons = []
        while candidates or spares:
            address = candidates.pop(0) if candidates else spares.pop(0)
            try:
                link = await self.open(stage, address, push=True)
            except DeferError as err:
                reasons.append(f"{address}: {err}")
                continue
            try:
                await self.configure(stage, link)
            except DeferError as err:
                link.channel.abort(str(err))
                reasons.append(f"{address}: {err}")
                continue
            self._install(stage, link)
            before = self.links[stage - 1] if stage > 0 else None
            if before is not None and not before.channel.closing:
                try:
                    await self.configure(stage - 1)
                except DeferError as err:  # the predecessor is broken too: lose it as well
                    before.channel.abort(f"could not rewire it: {err}")
            return address
        tried = "; ".join(reasons) if reasons else "no spare is left"
        raise NodeError(f"no node could take over stage {stage} ({tried})")

    async def open(self, index: int, address: str, push: bool) -> Link:
        """Connect, HELLO, start reading and heartbeats, make sure the node serves stage
        `index`: push the bundle if it serves none (or, with `push`, another one)."""
        handshake = min(self.timeout, HANDSHAKE_TIMEOUT)
        chan = await Channel.connect(address, handshake, self.tls)
        chan.timing = self.trace
        link = Link(index, address, chan)
        try:
            try:
                hello = await self._guard(address, chan.handshake(
                    "dispatcher", self.token, handshake, self.heartbeat, node_id="dispatcher"))
            except NodeError as err:
                if isinstance(err, DeferTimeoutError | AuthError):
                    raise
                raise NodeError(f"node {address} is not reachable ({err}); is `defer serve` "
                                "running there?", node=address) from None
            self.loop.spawn(self._read(link))
            self.loop.spawn(chan.keepalive(self.heartbeat))
            stage = self.manifest.stages[index]
            if hello.bundle_sha256 is None or (push and hello.bundle_sha256 != stage.sha256):
                await self._push_bundle(link)
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
        return link

    async def _push_bundle(self, link: Link) -> None:
        path = self.manifest.bundle_path(link.stage)
        want = self.manifest.stages[link.stage].sha256
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ManifestError(f"cannot read {path} to push to node {link.address}: "
                                f"{err}") from None
        sha = sha256_bytes(data)
        if sha != want:
            raise ManifestError(f"{path} hashes to {sha[:12]}, not the {want[:12]} its "
                                "manifest lists: the bundle is corrupt or from another "
                                "compile; recompile")
        log.info("pushing %s (%d bytes) to node %s", path.name, len(data), link.address)
        await self.ask(link, Load(sha256=sha, bundle=data))

    async def configure(self, index: int, link: Link | None = None) -> None:
        """Tell the node of stage `index` (or `link`, about to serve it) its place, next hop,
        codec, tensors and whether to trace."""
        stage, n = self.manifest.stages[index], len(self.links)
        await self.ask(link or self.links[index], Configure(
            stage=index, n_stages=n,
            next_hop=self.addresses[index + 1] if index + 1 < n else "dispatcher",
            codec=self.hop_codecs[index + 1], receives=tuple(stage.receives),
            forward=tuple(t.name for t in stage.forward),
            outputs=tuple(t.name for t in stage.outputs), trace=self.trace))

    def _install(self, index: int, link: Link) -> None:
        self.links[index] = link
        self.addresses[index] = link.address

    # --- control ----------------------------------------------------------------------------

    async def ask(self, link: Link, msg: Message, timeout: float | None = None) -> Message:
        """Send a control message and wait for its reply (ACK, STATS, PONG). A refusal raises
        the error of its kind, naming the node; so do a timeout and a lost connection."""
        rid = next(self.ids)
        msg = dataclasses.replace(msg, request_id=rid)
        future = asyncio.get_running_loop().create_future()
        self._replies[rid] = (link.channel, future)
        try:
            link.channel.write(msg)
            reply = await self._guard(link.address, future, timeout)
        except OSError as err:
            raise NodeError(f"node {link.address}: connection lost ({err})",
                            node=link.address) from None
        finally:
            self._replies.pop(rid, None)
        if isinstance(reply, Error):
            kind = ManifestError if reply.code == ManifestError.exit_code else NodeError
            error = f"node {link.address} refused {msg.TYPE.name}: {reply.reason}"
            raise kind(error) if kind is ManifestError else NodeError(error, node=link.address)
        return reply

    async def counters(self) -> list[dict]:
        """Every chain node's STATS counters, in stage order."""
        return [(await self.ask(link, Stats())).counters or {} for link in self.links]

    def live(self) -> list[Link]:
        return [link for link in self.links if link is not None and not link.channel.closing]

    async def close(self) -> None:
        await asyncio.gather(*(link.channel.close() for link in self.links if link))

    async def _guard(self, address: str, awaitable, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise DeferTimeoutError(f"node {address} did not answer within {timeout:g} s",
                                    node=address) from None
        except OSError as err:
            raise NodeError(f"node {address}: connection lost ({err})", node=address) from None

    # --- reading ----------------------------------------------------------------------------

    async def _read(self, link: Link) -> None:
        chan = link.channel
        try:
            while (msg := await chan.recv()) is not None:
                entry = self._replies.get(msg.request_id) if msg.request_id else None
                if entry is not None and isinstance(msg, Ack | Stats | Pong | Error):
                    if not entry[1].done():
                        entry[1].set_result(msg)
                else:
                    self.listener.on_message(link.stage, msg)
            reason = chan.dead_reason or "closed the connection"
        except (ProtocolError, OSError) as err:
            reason = chan.dead_reason or str(err) or type(err).__name__
        except Exception as err:  # a bug here must not take the loop thread down silently
            log.exception("reading from node %s", link.address)
            reason = f"internal error reading from it: {err!r}"
        chan.abort(reason)
        error = NodeError(f"node {link.address} is lost: {reason}", node=link.address)
        for owner, future in list(self._replies.values()):
            if owner is chan and not future.done():
                future.set_exception(error)
        if self.links[link.stage] is link:
            self.listener.on_lost(link.stage, error)

    def abort(self, stage: int, reason: str) -> None:
        link = self.links[stage]
        if link is not None:
            link.channel.abort(reason)
