"""Checks a list of Chrome trace events against the trace-event format (the JSON array form):
the fields each phase needs, async begin/end pairs, and complete events that only nest on a
thread (what Perfetto requires). Returns the events by phase for further checks."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASES = {"X", "b", "e", "i", "M"}
METADATA = {"process_name", "process_sort_index", "thread_name", "thread_sort_index",
            "trace_end"}


def load_trace(path: Path) -> list[dict[str, Any]]:
    """A trace file, closed (a JSON array) or still open (no `]` yet, trailing comma)."""
    text = path.read_text().rstrip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    events = json.loads(text)
    assert isinstance(events, list)
    return events


def check_trace_events(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_phase: dict[str, list[dict[str, Any]]] = defaultdict(list)
    begins: dict[tuple, dict] = {}
    ends: dict[tuple, dict] = {}
    for event in events:
        assert isinstance(event, dict) and event.get("ph") in PHASES, event
        assert isinstance(event["name"], str) and event["name"], event
        assert type(event["pid"]) is int and type(event["tid"]) is int, event
        assert isinstance(event.get("args", {}), dict), event
        ph = event["ph"]
        by_phase[ph].append(event)
        if ph == "M":
            assert event["name"] in METADATA, event
            continue
        assert isinstance(event["ts"], int | float) and event["ts"] >= 0, event
        if ph == "X":
            assert isinstance(event["dur"], int | float) and event["dur"] >= 0, event
        elif ph in "be":
            assert isinstance(event["cat"], str) and event["cat"], event
            key = (event["cat"], event["id"])
            table = begins if ph == "b" else ends
            assert key not in table, f"two {ph!r} events for {key}"
            table[key] = event
        elif ph == "i":
            assert event.get("s", "t") in ("g", "p", "t"), event
    assert begins.keys() == ends.keys(), "async begin and end events do not pair up"
    for key, begin in begins.items():
        end = ends[key]
        assert (end["name"], end["pid"]) == (begin["name"], begin["pid"]), key
        assert end["ts"] >= begin["ts"], key
    _check_nesting(by_phase["X"])
    return by_phase


def _check_nesting(complete: list[dict[str, Any]]) -> None:
    """Complete events on one thread may nest, never overlap partly."""
    threads: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for event in complete:
        threads[event["pid"], event["tid"]].append((event["ts"], event["ts"] + event["dur"]))
    for thread, slices in threads.items():
        stack: list[float] = []
        for start, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start + 1e-6:
                stack.pop()
            assert not stack or end <= stack[-1] + 0.2, \
                f"slices overlap on thread {thread}: one ends at {stack[-1]}, the next " \
                f"starts at {start} and ends at {end}"
            stack.append(end)
