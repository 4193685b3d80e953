"""The messages: frozen dataclasses, a tagged union (`Message`), each naming its JSON metadata
fields (`WIRE`, with their checkers) and its payload segments. Tensor payloads travel as opaque
bytes; `_tensor` checks a descriptor, including the decoded size its shape implies."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple

from defer.codecs import WireTensor
from defer.runtime.protocol.fields import (
    MAX_DIMS,
    MAX_NAME,
    PROTOCOL_VERSION,
    Limits,
    _bad,
    _bool,
    _clock,
    _hex,
    _hop,
    _int,
    _name,
    _name_tuple,
    _opt_dict,
    _opt_hex,
    _role,
    _str,
)
from defer.tensors import DTYPES


class MsgType(IntEnum):
    HELLO = 1
    LOAD = 2
    CONFIGURE = 3
    ACK = 4
    INFER = 5
    RESULT = 6
    ERROR = 7
    STATS = 8
    PING = 9
    PONG = 10
    SHUTDOWN = 11
    PROFILE = 12  # the probe messages (profile, link measurement) live in probes.py
    PROFILE_RESULT = 13
    ECHO = 14
    LINK_TEST = 15
    LINK_RESULT = 16


# --- messages ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Base:
    TYPE: ClassVar[MsgType]
    WIRE: ClassVar[dict[str, Any]] = {}  # JSON metadata fields -> checker
    request_id: int = 0

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        return []

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> _Base:
        if segs:
            raise _bad(f"{cls.TYPE.name} carries no payload, got {len(segs)} segments")
        return cls(request_id=request_id, **values)


@dataclass(frozen=True, kw_only=True)
class Hello(_Base):
    """First message each way on every connection. `role`: dispatcher, upstream or node.

    `challenge` is a fresh nonce, `response` an HMAC proof over both nonces (see `auth`); the
    token itself never crosses the wire. `heartbeat_ms`: the sender promises to send something
    at least this often (0 = no promise), so its peer may call it dead after a few silent
    periods. `clock`: the sender's wall clock when it sent this (seconds since the epoch), so the
    peer can estimate the offset between their clocks (no synchronisation assumed). `info`: a
    node's facts in its final HELLO (defer version, cores, memory, engines; see node.py).
    """

    TYPE = MsgType.HELLO
    WIRE = {"version": _int, "node_id": _str, "role": _role, "bundle_sha256": _opt_hex,
            "challenge": _opt_hex, "response": _opt_hex, "heartbeat_ms": _int,
            "clock": _clock, "info": _opt_dict}
    version: int = PROTOCOL_VERSION
    node_id: str = ""
    role: str = "node"
    bundle_sha256: str | None = None
    challenge: str | None = None
    response: str | None = None
    heartbeat_ms: int = 0
    clock: float = field(default_factory=time.time)
    info: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Load(_Base):
    """The dispatcher pushes a stage bundle (ONNX bytes) to a node that serves none."""

    TYPE = MsgType.LOAD
    WIRE = {"sha256": _hex}
    sha256: str
    bundle: bytes | bytearray | memoryview = field(repr=False)

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        return [({"size": len(self.bundle)}, self.bundle)]

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> Load:
        if len(segs) != 1:
            raise _bad(f"LOAD carries exactly one segment, got {len(segs)}")
        return cls(request_id=request_id, bundle=segs[0][1], **values)


@dataclass(frozen=True, kw_only=True)
class Configure(_Base):
    """Wire a node into the chain: its stage, where to send (host:port or "dispatcher"), how.

    `trace`: the node appends its `Span` to every request it passes on (INFER/RESULT `spans`);
    off, a request carries no spans and the node takes no extra clock readings."""

    TYPE = MsgType.CONFIGURE
    WIRE = {"stage": _int, "n_stages": _int, "next_hop": _hop, "codec": _name,
            "receives": _name_tuple, "forward": _name_tuple, "outputs": _name_tuple,
            "trace": _bool}
    stage: int
    n_stages: int
    next_hop: str
    codec: str = "raw"
    receives: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    trace: bool = False

    @functools.cached_property
    def receives_set(self) -> frozenset[str]:
        """`receives` as a set, built once: a node compares every request against it."""
        return frozenset(self.receives)

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> Configure:
        if not values["stage"] < values["n_stages"] <= 4096:
            raise _bad(f"stage {values['stage']} of {values['n_stages']} is out of range")
        return super()._from_wire(request_id, values, segs, limits)  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class Ack(_Base):
    """A node confirms LOAD, CONFIGURE or SHUTDOWN (`what` names which)."""

    TYPE = MsgType.ACK
    WIRE = {"what": _name}
    what: str


class Span(NamedTuple):
    """What one stage did with one request, in the node's own wall clock (seconds since the
    epoch; the dispatcher converts with the offset it measured at HELLO): the frame began to
    arrive, was decoded into the compute queue, the engine thread took it, finished it (codecs
    included), and the result was handed to the socket; then the engine thread's split."""

    stage: int
    arrived: float
    queued: float
    started: float
    finished: float
    sent: float
    decode_s: float
    engine_s: float
    encode_s: float

    def shifted(self, seconds: float) -> Span:
        """The same span with every clock reading moved by `seconds` (another clock)."""
        return self._replace(**{name: getattr(self, name) + seconds for name in CLOCK_FIELDS})


CLOCK_FIELDS = ("arrived", "queued", "started", "finished", "sent")
MAX_SPANS = 4096  # a span per stage: no chain is longer (Configure's n_stages bound)


def _spans(v: Any, name: str) -> tuple[Span, ...] | None:
    if v is None:
        return None
    if type(v) is not list or len(v) > MAX_SPANS:
        raise _bad(f"field {name!r} must be a list of at most {MAX_SPANS} spans or null")
    spans = []
    for item in v:
        if type(item) is not list or len(item) != len(Span._fields):
            raise _bad(f"field {name!r}: a span is a list of {len(Span._fields)} numbers")
        stage = _int(item[0], name)
        for x in item[1:]:
            if type(x) not in (int, float) or not 0 <= x < 1e11:
                raise _bad(f"field {name!r}: span times must be seconds >= 0, got {x!r:.40}")
        spans.append(Span(stage, *map(float, item[1:])))
    return tuple(spans)


@dataclass(frozen=True, kw_only=True)
class _TensorMessage(_Base):
    """Tensors for one request, and (with tracing on) a `Span` per stage it went through."""

    WIRE = {"spans": _spans}
    tensors: tuple[WireTensor, ...] = ()
    spans: tuple[Span, ...] | None = None

    def _segments(self) -> list[tuple[dict[str, Any], Any]]:
        return [({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "codec": t.codec,
                  "inner": t.inner, "size": t.nbytes}, t.data) for t in self.tensors]

    @classmethod
    def _from_wire(cls, request_id: int, values: dict[str, Any], segs: list,
                   limits: Limits) -> _Base:
        tensors = tuple(_tensor(desc, data, limits) for desc, data in segs)
        if len({t.name for t in tensors}) != len(tensors):
            raise _bad("duplicate tensor names")
        return cls(request_id=request_id, tensors=tensors, **values)


@dataclass(frozen=True, kw_only=True)
class Infer(_TensorMessage):
    """Tensors entering a stage for request `request_id`."""

    TYPE = MsgType.INFER


@dataclass(frozen=True, kw_only=True)
class Result(_TensorMessage):
    """The model outputs for `request_id`, sent by the last stage to the dispatcher."""

    TYPE = MsgType.RESULT


@dataclass(frozen=True, kw_only=True)
class Error(_Base):
    """A request (or, with request_id 0, the connection) failed at `node`, for `reason`.

    `code` is the exit code of the error's kind (defer.errors): 2 = the request or bundle is
    wrong (the receiver raises a UsageError subclass), 1 = a runtime failure (NodeError)."""

    TYPE = MsgType.ERROR
    WIRE = {"reason": _str, "node": _str, "code": _int}
    reason: str
    node: str = ""
    code: int = 1


@dataclass(frozen=True, kw_only=True)
class Stats(_Base):
    """Without counters: a request for them. With counters: a node's reply (JSON object)."""

    TYPE = MsgType.STATS
    WIRE = {"counters": _opt_dict}
    counters: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Ping(_Base):
    """With a request id: answer with PONG. With request id 0: a heartbeat, never answered."""

    TYPE = MsgType.PING


@dataclass(frozen=True, kw_only=True)
class Pong(_Base):
    TYPE = MsgType.PONG


@dataclass(frozen=True, kw_only=True)
class Shutdown(_Base):
    """Ask a node to stop: drain in-flight requests first when `drain`."""

    TYPE = MsgType.SHUTDOWN
    WIRE = {"drain": _bool}
    drain: bool = True


Message = Hello | Load | Configure | Ack | Infer | Result | Error | Stats | Ping | Pong | Shutdown
_BY_TYPE: dict[int, type[_Base]] = {
    cls.TYPE: cls
    for cls in (Hello, Load, Configure, Ack, Infer, Result, Error, Stats, Ping, Pong, Shutdown)
}


def _tensor(desc: dict[str, Any], data: memoryview, limits: Limits) -> WireTensor:
    for key in ("name", "dtype", "shape", "codec", "inner"):
        if key not in desc:
            raise _bad(f"tensor descriptor lacks {key!r}")
    name, dtype, codec = _str(desc["name"], "name"), _str(desc["dtype"], "dtype"), desc["codec"]
    if not name or len(name) > MAX_NAME:
        raise _bad(f"tensor name must have 1..{MAX_NAME} characters")
    if dtype not in DTYPES:
        raise _bad(f"tensor {name!r}: unsupported dtype {dtype!r:.40}")
    shape = desc["shape"]
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise _bad(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} dims")
    count = 1
    for dim in shape:
        count *= _int(dim, "shape")
        if count * DTYPES[dtype] > limits.tensor:
            raise _bad(f"tensor {name!r}: shape {shape!r:.80} decodes to more than the "
                       f"{limits.tensor}-byte tensor limit")
    return WireTensor(name=name, dtype=dtype, shape=tuple(shape), codec=_name(codec, "codec"),
                      data=data, inner=_int(desc["inner"], "inner"))


