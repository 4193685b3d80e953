"""The probe messages: what `defer profile` and `defer doctor` ask a node over a connection
whose HELLO role is "probe" (one that never takes over the node's chain).

    PROFILE        -> PROFILE_RESULT   time a model's ops with the node's engine and threads
    ECHO           -> ECHO             a timed transfer: payload one way, `reply_size` back
    LINK_TEST      -> LINK_RESULT      the node times ECHOs to another node (its link there)

Sizes are bounded here, on top of the frame limits: a PROFILE carries 1..4096 models, an ECHO at
most MAX_TRANSFER bytes each way, a PROFILE_RESULT's report (JSON in one segment) at most
MAX_REPORT bytes, every number in it finite and every name 1..MAX_NAME characters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from defer.runtime.protocol.fields import (
    MAX_NAME,
    Limits,
    _address,
    _bad,
    _int,
    _name,
    _seconds,
)
from defer.runtime.protocol.messages import MsgType, _Base

PROFILE_MODES = ("kernels", "models")
PROFILE_LEVELS = ("basic", "all")  # defer.engines.profiling.LEVELS
MAX_TRANSFER = 64 << 20  # bytes an ECHO may carry, or ask for, each way
MAX_REPORT = 16 << 20  # bytes of a PROFILE_RESULT's JSON report
MAX_SAMPLES = 256  # timed transfers in one LINK_RESULT


def _bounded(v: Any, name: str, low: int, high: int) -> int:
    v = _int(v, name)
    if not low <= v <= high:
        raise _bad(f"field {name!r} must be {low}..{high}, got {v}")
    return v


def _mode(v: Any, name: str) -> str:
    if v not in PROFILE_MODES:
        raise _bad(f"field {name!r} must be one of {PROFILE_MODES}, got {v!r:.40}")
    return v


def _levels(v: Any, name: str) -> tuple[str, ...]:
    if type(v) is not list or not v or any(x not in PROFILE_LEVELS for x in v) \
            or len(set(v)) != len(v):
        raise _bad(f"field {name!r} must list some of {PROFILE_LEVELS}, each once")
    return tuple(v)


def _transfer(v: Any, name: str) -> int:
    return _bounded(v, name, 0, MAX_TRANSFER)


def _runs(v: Any, name: str) -> int:
    return _bounded(v, name, 1, 10_000)


def _warmup(v: Any, name: str) -> int:
    return _bounded(v, name, 0, 1000)


def _batch(v: Any, name: str) -> int:
    return _bounded(v, name, 1, 65_536)


@dataclass(frozen=True, kw_only=True)
class Profile(_Base):
    """Time `models` on the receiving node, with its own engine and thread count.

    mode "kernels": one ONNX model, profiled under onnxruntime's profiler at each of `levels`;
    mode "models": one-op models (any engine format) each timed alone, in order, fed what the
    ones before produced (defer.engines.profiling). `runs` after `warmup` runs, medians;
    generated inputs have their dynamic dimensions set to `batch`."""

    TYPE = MsgType.PROFILE
    WIRE = {"mode": _mode, "levels": _levels, "runs": _runs, "warmup": _warmup,
            "batch": _batch}
    mode: str
    models: tuple[bytes | bytearray | memoryview, ...] = field(repr=False)
    levels: tuple[str, ...] = PROFILE_LEVELS
    runs: int = 10
    warmup: int = 3
    batch: int = 1

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        return [({"size": len(m)}, m) for m in self.models]

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.models)

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> Profile:
        if not segs or (values["mode"] == "kernels" and len(segs) != 1):
            raise _bad(f"PROFILE {values['mode']} carries "
                       f"{'exactly one model' if values['mode'] == 'kernels' else 'models'}, "
                       f"got {len(segs)} segments")
        return cls(request_id=request_id, models=tuple(data for _, data in segs), **values)


@dataclass(frozen=True, kw_only=True)
class ProfileResult(_Base):
    """A node's answer to PROFILE, and its facts when it ran: `engine` format, `threads`,
    `cores`, `memory_free` (bytes; 0 = unknown), `seconds` the profile took.

    "kernels": `levels` maps each level to {"kernels": {name: seconds}, "reorder_seconds",
    "reorder_bytes", "run_seconds"} (defer.engines.profiling.KernelProfile); "models": `model_seconds` per
    model and `io_seconds_per_byte`. The report travels as one JSON segment."""

    TYPE = MsgType.PROFILE_RESULT
    WIRE = {"engine": _name, "threads": _int, "cores": _int, "memory_free": _int,
            "seconds": _seconds}
    engine: str
    threads: int
    cores: int
    memory_free: int
    seconds: float
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_seconds: tuple[float, ...] = ()
    io_seconds_per_byte: float = 0.0

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        report = json.dumps({"levels": self.levels, "model_seconds": list(self.model_seconds),
                             "io_seconds_per_byte": self.io_seconds_per_byte},
                            separators=(",", ":")).encode()
        return [({"size": len(report)}, report)]

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> ProfileResult:
        if len(segs) != 1 or len(segs[0][1]) > MAX_REPORT:
            raise _bad(f"PROFILE_RESULT carries one report of at most {MAX_REPORT} bytes")
        try:
            report = json.loads(segs[0][1].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise _bad(f"profile report is not UTF-8 JSON ({err})") from None
        if type(report) is not dict:
            raise _bad("profile report must be a JSON object")
        return cls(request_id=request_id, levels=_check_levels(report.get("levels")),
                   model_seconds=_check_seconds(report.get("model_seconds")),
                   io_seconds_per_byte=_finite(report.get("io_seconds_per_byte"),
                                               "io_seconds_per_byte"), **values)


def _finite(v: Any, name: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise _bad(f"profile report: {name} must be a finite number >= 0, got {v!r:.40}")
    return float(v)


def _check_levels(v: Any) -> dict[str, dict[str, Any]]:
    if type(v) is not dict or any(k not in PROFILE_LEVELS for k in v):
        raise _bad(f"profile report: levels must map some of {PROFILE_LEVELS} to profiles")
    levels = {}
    for level, d in v.items():
        if type(d) is not dict or type(d.get("kernels")) is not dict:
            raise _bad(f"profile report: level {level!r} lacks its kernels")
        kernels = {}
        for name, seconds in d["kernels"].items():
            if not 0 < len(name) <= MAX_NAME:
                raise _bad(f"profile report: a kernel name must have 1..{MAX_NAME} characters")
            kernels[name] = _finite(seconds, f"kernel {name[:60]!r}")
        levels[level] = {"kernels": kernels,
                         "reorder_seconds": _finite(d.get("reorder_seconds"), "reorder_seconds"),
                         "reorder_bytes": _int(d.get("reorder_bytes"), "reorder_bytes"),
                         "run_seconds": _finite(d.get("run_seconds", 0.0), "run_seconds")}
    return levels


def _check_seconds(v: Any) -> tuple[float, ...]:
    if type(v) is not list:
        raise _bad("profile report: model_seconds must be a list")
    return tuple(_finite(x, "model_seconds") for x in v)


@dataclass(frozen=True, kw_only=True)
class Echo(_Base):
    """A timed transfer: the receiver answers with an ECHO of the same request id carrying
    `reply_size` zero bytes (and asking for none). The payload's content is ignored."""

    TYPE = MsgType.ECHO
    WIRE = {"reply_size": _transfer}
    payload: bytes | bytearray | memoryview = field(default=b"", repr=False)
    reply_size: int = 0

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        return [({"size": len(self.payload)}, self.payload)]

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> Echo:
        if len(segs) != 1 or len(segs[0][1]) > MAX_TRANSFER:
            raise _bad(f"ECHO carries one payload of at most {MAX_TRANSFER} bytes")
        return cls(request_id=request_id, payload=segs[0][1], **values)


@dataclass(frozen=True, kw_only=True)
class LinkTest(_Base):
    """Ask a node to measure its link to `target` (another node's host:port): it connects
    there as a probe (with its own token) and times ECHOs of up to `max_size` bytes, growing
    them until one takes `seconds`. Answered by LINK_RESULT."""

    TYPE = MsgType.LINK_TEST
    WIRE = {"target": _address, "max_size": _transfer, "seconds": _seconds}
    target: str
    max_size: int = 16 << 20
    seconds: float = 0.2


def _samples(v: Any, name: str) -> tuple[tuple[int, float], ...]:
    if type(v) is not list or not 0 < len(v) <= MAX_SAMPLES:
        raise _bad(f"field {name!r} must list 1..{MAX_SAMPLES} [bytes, seconds] samples")
    out = []
    for pair in v:
        if type(pair) is not list or len(pair) != 2:
            raise _bad(f"field {name!r}: each sample is [bytes, seconds]")
        out.append((_transfer(pair[0], name), _seconds(pair[1], name)))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class LinkResult(_Base):
    """The node's timed transfers to `target`: (payload bytes, round-trip seconds) each, the
    payload going from the node to `target` (0 bytes: a plain round trip)."""

    TYPE = MsgType.LINK_RESULT
    WIRE = {"target": _address, "samples": _samples}
    target: str
    samples: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:  # JSON gives lists; compare as tuples either way
        object.__setattr__(self, "samples", tuple((int(b), float(s)) for b, s in self.samples))


Probe = Profile | ProfileResult | Echo | LinkTest | LinkResult
PROBES: tuple[type[_Base], ...] = (Profile, ProfileResult, Echo, LinkTest, LinkResult)
