"""Run one stage on one request, in memory: `run_stage(plan, engine, msg) -> (message, times)`.

It checks what arrived against the plan (exactly the tensors the stage receives) and against
the bundle's inputs (dtype, shape: `defer.tensors.check_tensor`), decodes only what the engine
consumes, runs the engine, encodes its outputs with the hop's codec and passes forwarded tensors
on as the received bytes, untouched. The last stage answers with RESULT, the others with INFER
for the next hop. A pure function of its arguments: the node runs it in its engine thread and
adds the returned times to its counters (`StageCounters`), which STATS reports.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from defer.codecs import decode_tensor, encode_tensor, parse_codec
from defer.engines import Engine
from defer.errors import InputError, NodeError
from defer.runtime.protocol import Configure, Infer, Result
from defer.tensors import check_tensor


@dataclass
class StageTimes:
    decode_s: float = 0.0
    compute_s: float = 0.0
    encode_s: float = 0.0
    began: float = 0.0  # wall clock when the stage took the request (tracing only, else 0)


def run_stage(plan: Configure, engine: Engine, msg: Infer,
              node: str = "") -> tuple[Infer | Result, StageTimes]:
    """The message this stage sends for request `msg` (carrying on its spans), and where its
    time went."""
    began = time.time() if plan.trace else 0.0
    t0 = time.perf_counter()
    received = {t.name: t for t in msg.tensors}
    if received.keys() != plan.receives_set:
        raise InputError(f"stage {plan.stage} expects tensors {sorted(plan.receives)}, "
                         f"got {sorted(received)}")
    for spec in engine.inputs:
        tensor = received[spec.name]
        check_tensor(spec, tensor.dtype, tensor.shape, f"stage {plan.stage}: tensor "
                     f"{spec.name!r}", arrived=True)
    feeds = {spec.name: decode_tensor(received[spec.name]) for spec in engine.inputs}
    t1 = time.perf_counter()
    try:
        arrays = engine.run(plan.outputs, feeds)
    except Exception as err:  # noqa: BLE001 - engines' errors share no base class
        raise NodeError(f"{engine.format} engine failed at stage {plan.stage}: {err}",
                        node=node) from None
    t2 = time.perf_counter()
    codec = parse_codec(plan.codec)
    tensors = [encode_tensor(name, a, codec) for name, a in zip(plan.outputs, arrays)]
    tensors += [received[name] for name in plan.forward]
    times = StageTimes(t1 - t0, t2 - t1, time.perf_counter() - t2, began)
    last = plan.next_hop == "dispatcher"
    return (Result if last else Infer)(request_id=msg.request_id, tensors=tuple(tensors),
                                       spans=msg.spans), times


COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)  # seconds: upper bounds of the compute-time histogram


@dataclass
class StageCounters:
    """What STATS reports. The loop and the engine thread each write their own fields."""

    requests: int = 0
    errors: int = 0
    busy_s: float = 0.0  # engine time
    decode_s: float = 0.0
    encode_s: float = 0.0
    bytes_in: Counter = field(default_factory=Counter)  # by codec
    bytes_out: Counter = field(default_factory=Counter)
    raw_out: int = 0  # what bytes_out would be with the raw codec
    queue_max: int = 0
    refused: int = 0  # connections closed for a bad HELLO, token, frame or over the limit
    heartbeats_missed: int = 0  # peers dropped for silence
    compute_counts: list[int] = field(default_factory=lambda: [0] * (len(COMPUTE_BUCKETS) + 1))
    started: float = field(default_factory=time.monotonic)

    def add(self, times: StageTimes) -> None:
        self.decode_s += times.decode_s
        self.busy_s += times.compute_s
        self.encode_s += times.encode_s
        self.requests += 1
        self.compute_counts[bisect.bisect_left(COMPUTE_BUCKETS, times.compute_s)] += 1

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """The STATS counters as JSON-ready values (cumulative; the dispatcher takes deltas)."""
        return {
            "requests": self.requests, "errors": self.errors, "busy_s": self.busy_s,
            "decode_s": self.decode_s, "encode_s": self.encode_s, "cpu_s": time.process_time(),
            "wall_s": time.monotonic() - self.started, "bytes_in": dict(self.bytes_in),
            "bytes_out": dict(self.bytes_out), "raw_out": self.raw_out,
            "queue_max": self.queue_max, "refused": self.refused,
            "heartbeats_missed": self.heartbeats_missed,
            "compute_histogram": [list(COMPUTE_BUCKETS), list(self.compute_counts)], **extra,
        }


def memory_available() -> int | None:
    """Bytes of memory available to new work on this machine (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
