"""Traces: where each request's time went on every stage and link, as Chrome trace-event JSON.

With a tracer, a Dispatcher switches tracing on in every node's CONFIGURE; each node then
appends a `Span` to every request it passes on (`protocol.Span`: the frame began to arrive,
was queued, computed, handed to the socket; in the node's own clock). For each RESULT the
dispatcher converts every span to its own clock with the offset it measured at that node's
HELLO (no clock synchronisation assumed; an estimate good to about half a round trip) and
hands a `RequestTrace` to the tracer. `TraceFile.chain()` is such a tracer: it writes

    one process per node, "stage K  HOST:PORT", with threads receive, compute and send
        (complete events, one per request; compute's args split decode / engine / encode)
        and the requests waiting in its compute queue (async events "queue", they overlap);
    one process per link, "link A -> B": from the sender handing a request to its socket to
        the receiver seeing it arrive (async events: transfers overlap when the reader lags);
    the dispatcher's process: each request from its send to its RESULT (async events).

Every slice is named "req N", so a request keeps one colour across tracks; gaps on a compute
thread are pipeline bubbles and a stage whose compute thread never rests is the slow one.
The file is the format's JSON array form, written as events happen (one request's events in
one write) and closed with `]`; Perfetto and chrome://tracing also open a file cut short by a
crash. Times are microseconds since the file was opened.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from defer.runtime.protocol import Span

PHASE_THREADS = {"receive": 1, "compute": 2, "send": 3}  # a stage process's thread ids
PIDS_PER_CHAIN = 10_000  # chain K's processes are numbered from (K + 1) x this


@dataclass(frozen=True)
class RequestTrace:
    """One answered request, every time in the dispatcher's wall clock (seconds since the
    epoch): sent to stage 0 (the last time, if replayed), its RESULT began to arrive and was
    decoded; one span per stage, converted from the node's clock."""

    request_id: int
    nodes: tuple[str, ...]
    sent: float
    arrived: float
    received: float
    spans: tuple[Span, ...]


class TraceFile:
    """A Chrome trace-event JSON file, written as events come (thread-safe); `close` ends it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # line-buffered: every write is on disk at once, for a live or crashed process too
        self._file: TextIO | None = open(self.path, "w", buffering=1)  # noqa: SIM115
        self._zero_wall, self._zero_perf = time.time(), time.perf_counter()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._track_end: dict[tuple[int, int], float] = {}
        self._file.write("[\n")

    # --- clocks -------------------------------------------------------------------------------

    def wall_us(self, seconds: float) -> float:
        """Microseconds since the file opened, for a wall-clock time (time.time())."""
        return round((seconds - self._zero_wall) * 1e6, 1)

    def perf_us(self, seconds: float) -> float:
        """Microseconds since the file opened, for a time.perf_counter() reading."""
        return round((seconds - self._zero_perf) * 1e6, 1)

    # --- events -------------------------------------------------------------------------------

    def write(self, events: list[dict[str, Any]]) -> None:
        """Append events (one write, so one request's events land together)."""
        text = "".join(json.dumps(e, separators=(",", ":")) + ",\n" for e in events)
        with self._lock:
            if self._file is not None:
                self._file.write(text)

    def process(self, pid: int, name: str, threads: dict[int, str] | None = None,
                ) -> list[dict[str, Any]]:
        """Metadata events naming a process (sorted by pid) and its threads."""
        events = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                   "args": {"name": name}},
                  {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                   "args": {"sort_index": pid}}]
        for tid, thread in (threads or {}).items():
            events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                        "args": {"name": thread}},
                       {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                        "args": {"sort_index": tid}}]
        return events

    def complete(self, pid: int, tid: int, name: str, start: float, end: float,
                 args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A slice on one thread (µs). Slices on a thread must not overlap, so one that would
        start before the thread's previous slice ended (clock estimates) starts at its end."""
        with self._lock:
            start = max(start, self._track_end.get((pid, tid), start))
            end = max(end, start)
            self._track_end[pid, tid] = end
        return [{"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": start,
                 "dur": round(end - start, 1), "args": args or {}}]

    def async_span(self, pid: int, category: str, name: str, start: float, end: float,
                   args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A slice that may overlap others of its process (a "b"/"e" pair, µs)."""
        common = {"name": name, "cat": category, "id": next(self._ids), "pid": pid, "tid": 0}
        return [{**common, "ph": "b", "ts": start, "args": args or {}},
                {**common, "ph": "e", "ts": max(end, start)}]

    def instant(self, pid: int, name: str, ts: float) -> list[dict[str, Any]]:
        return [{"ph": "i", "s": "p", "name": name, "pid": pid, "tid": 0, "ts": ts}]

    def chain(self, index: int = 0, label: str = "") -> ChainTracer:
        """A tracer for one chain's Dispatcher (`Dispatcher(..., tracer=...)`)."""
        return ChainTracer(self, index, label)

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(json.dumps({"ph": "M", "name": "trace_end", "pid": 0, "tid": 0,
                                         "args": {}}) + "\n]\n")
            self._file.close()
            self._file = None


class ChainTracer:
    """Writes one chain's RequestTraces: a process per node and per link, in chain order."""

    def __init__(self, file: TraceFile, index: int, label: str) -> None:
        self.file, self.label = file, label
        self.base = (index + 1) * PIDS_PER_CHAIN
        self._nodes: tuple[str, ...] = ()

    def dispatcher_pid(self) -> int:
        return self.base

    def link_pid(self, k: int) -> int:
        """The link into stage k (k = n: from the last stage back to the dispatcher)."""
        return self.base + 1 + 2 * k

    def stage_pid(self, k: int) -> int:
        return self.base + 2 + 2 * k

    def _names(self, nodes: tuple[str, ...]) -> list[dict[str, Any]]:
        """Name every process (again after a failover put another node in)."""
        n, file = len(nodes), self.file
        ends = ["dispatcher", *(f"stage {k}" for k in range(n)), "dispatcher"]
        events = file.process(self.dispatcher_pid(), f"{self.label}dispatcher")
        for k in range(n + 1):
            events += file.process(self.link_pid(k), f"{self.label}link {ends[k]} -> "
                                                     f"{ends[k + 1]}")
        for k, node in enumerate(nodes):
            events += file.process(self.stage_pid(k), f"{self.label}stage {k}  {node}",
                                   {tid: name for name, tid in PHASE_THREADS.items()})
        return events

    def __call__(self, trace: RequestTrace) -> None:
        events = []
        if trace.nodes != self._nodes:
            self._nodes = trace.nodes
            events += self._names(trace.nodes)
        events += self.events(trace)
        self.file.write(events)

    def events(self, trace: RequestTrace) -> list[dict[str, Any]]:
        file, name, rid = self.file, f"req {trace.request_id}", trace.request_id
        us = file.wall_us
        events = file.async_span(self.dispatcher_pid(), "request", name, us(trace.sent),
                                 us(trace.received), {"request": rid})
        left = trace.sent  # when the request left the previous hop
        for span in trace.spans:
            k, pid, args = span.stage, self.stage_pid(span.stage), {"request": rid}
            events += file.async_span(self.link_pid(k), "link", name, us(left),
                                      us(span.arrived), args)
            events += file.complete(pid, PHASE_THREADS["receive"], name, us(span.arrived),
                                    us(span.queued), args)
            events += file.async_span(pid, "queue", name, us(span.queued), us(span.started),
                                      args)
            events += file.complete(pid, PHASE_THREADS["compute"], name, us(span.started),
                                    us(span.finished), {
                                        **args, "decode_ms": round(span.decode_s * 1e3, 3),
                                        "engine_ms": round(span.engine_s * 1e3, 3),
                                        "encode_ms": round(span.encode_s * 1e3, 3)})
            events += file.complete(pid, PHASE_THREADS["send"], name, us(span.finished),
                                    us(span.sent), args)
            left = span.sent
        if trace.spans:
            events += file.async_span(self.link_pid(len(trace.spans)), "link", name, us(left),
                                      us(trace.arrived), {"request": rid})
        return events
