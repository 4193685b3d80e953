"""`--trace FILE`: the gateway's requests as Chrome trace-event JSON (Perfetto, chrome://tracing).

The file is the trace-event format's JSON array form, written as events happen (one line each)
and closed with `]` on a clean shutdown; both viewers also open a file cut short by a crash.
Each request is an async slice ("b"/"e" events sharing the request's id) named "request" on the
gateway's track; each attempt on a chain is a slice named "chain K" ("failed" when the chain
lost it and it was replayed); each batch is a slice "batch" with its size. Times are
microseconds since the gateway started, on its own clock. Spans of the nodes themselves
(receive, queue, compute, send per stage) need the nodes to report them: not part of this file
yet.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from defer.serving.pool import Chain, Observer

GATEWAY_PID = 1


class TraceWriter(Observer):
    """Append trace events to a file; `close` ends the JSON array."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # line-buffered: every event is on disk at once, for a live or crashed gateway too
        self._file: TextIO | None = open(self.path, "w", buffering=1)  # noqa: SIM115
        self._zero = time.perf_counter()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._file.write("[\n")
        self._event({"ph": "M", "name": "process_name", "pid": GATEWAY_PID, "tid": 0,
                     "args": {"name": f"defer gateway (pid {os.getpid()})"}})

    def _event(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(event, separators=(",", ":")) + ",\n")

    def span(self, name: str, category: str, started: float, ended: float,
             args: dict[str, Any] | None = None) -> None:
        """One async slice from `started` to `ended` (time.perf_counter seconds)."""
        span_id = next(self._ids)
        common = {"name": name, "cat": category, "id": span_id, "pid": GATEWAY_PID, "tid": 0}
        self._event({**common, "ph": "b", "ts": self._us(started), "args": args or {}})
        self._event({**common, "ph": "e", "ts": self._us(ended)})

    def _us(self, seconds: float) -> float:
        return round((seconds - self._zero) * 1e6, 1)

    def attempt(self, chain: Chain, started: float, ended: float, ok: bool,
                request_id: int) -> None:
        self.span(f"chain {chain.index}" + ("" if ok else " failed"), f"chain{chain.index}",
                  started, ended, {"request": request_id, "nodes": chain.nodes})

    def chain_state(self, chain: Chain, old: str, new: str) -> None:
        self._event({"ph": "i", "s": "p", "name": f"chain {chain.index}: {old} -> {new}",
                     "pid": GATEWAY_PID, "tid": 0, "ts": self._us(time.perf_counter())})

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(json.dumps({"ph": "M", "name": "trace_end", "pid": GATEWAY_PID,
                                         "tid": 0, "args": {}}) + "\n]\n")
            self._file.close()
            self._file = None
