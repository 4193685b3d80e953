"""`defer gateway --trace FILE`: the gateway's requests and every chain's spans as Chrome
trace-event JSON (Perfetto, chrome://tracing), in one file (`defer.runtime.trace.TraceFile`).

The gateway's own process (pid 1) shows each request as an async slice "chain K" per attempt
on a chain ("chain K failed" when the chain lost it and it was replayed elsewhere; args: the
gateway's request id and the chain's nodes) and chain state changes as instant events. Each
chain's Dispatcher traces its nodes (`tracer(index)`): chain K's processes, prefixed
"chain K  ", hold a process per node (receive, queue, compute, send) and per link, as
`defer.runtime.trace` describes; there a request is named by its chain's request id.
"""

from __future__ import annotations

import os
import time
from typing import Any

from defer.runtime.trace import ChainTracer, TraceFile
from defer.serving.pool import Chain, Observer

GATEWAY_PID = 1


class TraceWriter(TraceFile, Observer):
    """The gateway's trace file: pool events on the gateway's process, chains' spans below."""

    def __init__(self, path: Any) -> None:
        super().__init__(path)
        self.write(self.process(GATEWAY_PID, f"defer gateway (pid {os.getpid()})"))

    def tracer(self, index: int) -> ChainTracer:
        """The tracer for chain `index`'s Dispatcher."""
        return self.chain(index, f"chain {index}  ")

    def attempt(self, chain: Chain, started: float, ended: float, ok: bool,
                request_id: int) -> None:
        self.write(self.async_span(
            GATEWAY_PID, f"chain{chain.index}", f"chain {chain.index}" + ("" if ok else
                                                                           " failed"),
            self.perf_us(started), self.perf_us(ended),
            {"request": request_id, "nodes": chain.nodes}))

    def chain_state(self, chain: Chain, old: str, new: str) -> None:
        self.write(self.instant(GATEWAY_PID, f"chain {chain.index}: {old} -> {new}",
                                self.perf_us(time.perf_counter())))
