"""A node that answers PROFILE wrongly, for tests of `defer profile`'s error handling.

    python tests/fake_node.py MODE python -m defer serve --host H --port P ...

It is started by `defer.local.start_node(command_prefix=(python, this file, MODE))`, so the
`defer serve` command line follows MODE: only --host and --port are read from it, the token
from DEFER_TOKEN. It completes HELLO like a node (token proof included), prints the ready line,
and answers every PROFILE by MODE:
    garbage    a PROFILE_RESULT frame whose report segment is not JSON (a malformed frame)
    foreign    a well-formed PROFILE_RESULT of kernels that are no op of the model
    stall      as foreign, after its loop is blocked (no heartbeats) for twice the silence that
               its heartbeat alone would allow (DEAD_AFTER x HEARTBEAT): a slow device
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time

from defer import __version__
from defer.address import format_address
from defer.runtime.channel import DEAD_AFTER, Channel
from defer.runtime.node import READY_PREFIX
from defer.runtime.protocol import (
    HANDSHAKE_LIMITS,
    Ping,
    Pong,
    Profile,
    ProfileResult,
    Stats,
)

HEARTBEAT = 0.2  # seconds between the heartbeats it promises
STALL = 2 * DEAD_AFTER * HEARTBEAT  # past what the heartbeat alone allows, within PATIENCE


def _garbage(request_id: int) -> bytes:
    meta = json.dumps({"f": {"engine": "onnx", "threads": 1, "cores": 1, "memory_free": 0,
                             "seconds": 0.1}, "s": [{"size": 8}]}).encode()
    meta += b" " * (-len(meta) % 8)
    return struct.pack("<4sBBHQIIQ", b"DEFR", 1, 13, 0, request_id, len(meta), 1, 8) + meta \
        + b"\xff" * 8


async def _serve(chan: Channel, mode: str, node_id: str) -> None:
    await chan.accept(node_id, os.environ.get("DEFER_TOKEN"), None, 10.0, HEARTBEAT, info={
        "defer": __version__, "cores": 1, "threads": 1, "memory_available": 1 << 30,
        "engines": ["onnx", "tflite"], "engine": None, "max_model_size": 1 << 30})
    while (msg := await chan.recv()) is not None:
        if isinstance(msg, Ping):
            await chan.send(Pong(request_id=msg.request_id))
        elif isinstance(msg, Stats):  # no CPU clock: `defer profile` measures no hop cost
            await chan.send(Stats(request_id=msg.request_id, counters={}))
        elif isinstance(msg, Profile) and mode == "garbage":
            chan.writer.write(_garbage(msg.request_id))
        elif isinstance(msg, Profile):
            if mode == "stall":
                time.sleep(STALL)  # blocks the loop, as a slow device's GIL-held copy does
            level = {"kernels": {"not_an_op": 1e-3, "nor_this": 2e-3}, "reorder_seconds": 0.0,
                     "reorder_bytes": 0}
            await chan.send(ProfileResult(request_id=msg.request_id, engine="onnx", threads=1,
                                          cores=1, memory_free=1 << 30, seconds=0.01,
                                          levels={"basic": level, "all": level}))


async def main(mode: str, argv: list[str]) -> None:
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    tasks = set()

    def connected(reader, writer) -> None:
        chan = Channel(reader, writer, "peer", HANDSHAKE_LIMITS)
        task = asyncio.get_running_loop().create_task(_serve(chan, mode, node_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(connected, host, port)
    node_id = format_address(*server.sockets[0].getsockname()[:2])
    print(f"{READY_PREFIX}{node_id}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
