"""A node's answers on a probe connection (HELLO role "probe"): profiling and link timing.

    PROFILE    time the models with this node's engine and thread count
               (defer.engines.profiling, the compiler's own method) in the engine thread, so
               it never runs beside an inference; refused above `max_model_size` (announced in
               HELLO info), so the asker sends smaller chunks instead.
    ECHO       answer at once with `reply_size` zero bytes: a timed transfer.
    LINK_TEST  open a probe connection to another node (this node's token and TLS settings)
               and time ECHOs there (`links.time_link`); answer with the samples.
    PING       PONG.  STATS: the node's counters.

A probe never touches the node's chain: a node can be profiled or checked while it serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from defer.engines import detect_format
from defer.engines.profiling import profile_onnx, time_models
from defer.errors import DeferError, ManifestError, ProtocolError, UsageError
from defer.runtime.channel import Channel
from defer.runtime.links import time_link
from defer.runtime.probe import ZERO_PAYLOAD, open_probe
from defer.runtime.protocol import (
    Echo,
    Error,
    LinkResult,
    LinkTest,
    Ping,
    Pong,
    Profile,
    ProfileResult,
    Stats,
)
from defer.runtime.stage import memory_available

log = logging.getLogger(__name__)

MAX_MODEL_CEILING = (1 << 30) - (16 << 20)  # what one frame (1 GiB) can carry, with room
MIN_DEFAULT_MODEL = 64 << 20


def default_max_model_size() -> int:
    """A quarter of the memory available now (profiling holds the model, two sessions and
    their traces), at least 64 MiB and at most what one frame can carry."""
    available = memory_available() or 4 * MIN_DEFAULT_MODEL
    return max(MIN_DEFAULT_MODEL, min(MAX_MODEL_CEILING, available // 4))


@dataclass
class ProbeService:
    """What a node needs to answer probes; `node_id` and `stats` are read when asked."""

    node_id: Callable[[], str]
    stats: Callable[[], dict[str, Any]]
    executor: Executor  # the engine thread
    threads: int
    max_model_size: int
    token: str | None
    client_tls: ssl.SSLContext | None
    timeout: float

    async def serve(self, chan: Channel) -> None:
        """Answer one probe connection's requests, one at a time, until it closes."""
        while (msg := await chan.recv()) is not None:
            rid = msg.request_id
            match msg:
                case Echo():
                    await chan.send(Echo(request_id=rid, payload=ZERO_PAYLOAD[:msg.reply_size]))
                case Ping():
                    chan.write(Pong(request_id=rid))
                case Stats():
                    chan.write(Stats(request_id=rid, counters=self.stats()))
                case Profile():
                    await self._answer(chan, rid, self._profile(msg))
                case LinkTest():
                    await self._answer(chan, rid, self._link_test(msg))
                case _:
                    raise ProtocolError(f"unexpected {msg.TYPE.name} on a probe connection")

    async def _answer(self, chan: Channel, rid: int, work) -> None:
        try:
            reply = await work
        except (DeferError, TimeoutError, OSError) as err:
            code = err.exit_code if isinstance(err, DeferError) else 1
            reply = Error(reason=str(err) or type(err).__name__, node=self.node_id(), code=code)
        await chan.send(dataclasses.replace(reply, request_id=rid))

    async def _profile(self, msg: Profile) -> ProfileResult:
        if msg.size > self.max_model_size:
            raise UsageError(f"a model of {msg.size / 2**20:.1f} MiB is over this node's "
                             f"--max-model-size of {self.max_model_size / 2**20:.1f} MiB; send "
                             "it in smaller chunks")
        log.info("profiling %d model(s), %.1f MiB, mode %s, %d runs", len(msg.models),
                 msg.size / 2**20, msg.mode, msg.runs)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        measured = await loop.run_in_executor(self.executor, _run_profile, msg, self.threads)
        took = time.perf_counter() - start
        log.info("profiled in %.2f s", took)
        return ProfileResult(threads=self.threads, cores=len(os.sched_getaffinity(0)),
                             memory_free=memory_available() or 0, seconds=took, **measured)

    async def _link_test(self, msg: LinkTest) -> LinkResult:
        async with open_probe(msg.target, self.token, self.client_tls, self.timeout,
                              node_id=self.node_id()) as probe:
            samples = await time_link(lambda n: probe.transfer(up=n, timeout=self.timeout),
                                      msg.max_size, msg.seconds)
        return LinkResult(target=msg.target, samples=tuple(samples))


def _run_profile(msg: Profile, threads: int) -> dict[str, Any]:
    """In the engine thread: the measured fields of the PROFILE_RESULT."""
    try:
        if msg.mode == "kernels":
            return {"engine": "onnx", "levels": {
                level: profile_onnx(msg.models[0], level, threads, msg.runs, msg.warmup,
                                    batch=msg.batch).to_dict() for level in msg.levels}}
        times = time_models(msg.models, None, msg.runs, msg.warmup, threads, msg.batch)
        return {"engine": detect_format(msg.models[0]),
                "model_seconds": tuple(float(s) for s in times.seconds),
                "io_seconds_per_byte": times.io_seconds_per_byte}
    except DeferError:
        raise
    except Exception as err:  # noqa: BLE001 - engines' errors share no base class
        raise ManifestError(f"cannot profile the model: {' '.join(str(err).split())[:500]}") \
            from None
