"""The defer wire protocol, sans-IO: `encode(msg) -> bytes` and an incremental `Decoder`.

`feed(bytes)`, `feed_eof()`, `next() -> Message | None`. No sockets, no threads, no pickle.
Messages are frozen dataclasses (a tagged union, `Message`). Every size is bounded by `Limits`;
a malformed, oversized or truncated frame raises ProtocolError and nothing else. A clean EOF
between frames is not an error. Every metadata field is type- and range-checked on decode
(roles, hashes, nonces, addresses, names, sizes). Tensor payloads travel as opaque bytes:
`defer.codecs` gives them meaning, this module only checks that their declared sizes are sane,
including the decoded size a shape implies (<= Limits.tensor), so no codec can be made to
allocate more than that. HANDSHAKE_LIMITS bound what an unauthenticated peer may send.
This is the one module to change for the wire format; the frame layout is written out below.
"""
from __future__ import annotations

import functools
import json
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from defer.address import parse_address
from defer.codecs import WireTensor
from defer.errors import ProtocolError, UsageError

# numpy dtype names a tensor may declare; anything else is a protocol error (never np.dtype(str)).
from defer.tensors import DTYPES

MAGIC = b"DEFR"
PROTOCOL_VERSION = 1
ALIGN = 8  # metadata and every payload segment are padded to this, so tensors land aligned

MAX_DIMS = 16
MAX_NAME = 1024


@dataclass(frozen=True)
class Limits:
    """Upper bounds the decoder enforces (and the encoder respects) on every frame."""

    metadata: int = 64 * 1024
    tensor: int = 256 * 1024 * 1024
    frame: int = 1024 * 1024 * 1024
    segments: int = 4096


DEFAULT_LIMITS = Limits()
# Before a peer has authenticated it may send HELLO frames only: a few kilobytes, no payload.
HANDSHAKE_LIMITS = Limits(metadata=4096, tensor=0, frame=4096, segments=0)
ROLES = frozenset({"dispatcher", "upstream", "node"})
MAX_TEXT = 16 * 1024  # reasons, node ids and other free text


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


# --- field checkers: each returns the value (normalised) or raises ProtocolError -------------

def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed frame: {what}")


def _int(v: Any, name: str) -> int:
    if type(v) is not int or not 0 <= v < 2**63:
        raise _bad(f"field {name!r} must be a non-negative integer, got {v!r:.60}")
    return v


def _str(v: Any, name: str) -> str:
    if type(v) is not str:
        raise _bad(f"field {name!r} must be a string, got {type(v).__name__}")
    if len(v) > MAX_TEXT:
        raise _bad(f"field {name!r} has {len(v)} characters, over {MAX_TEXT}")
    return v


def _name(v: Any, name: str) -> str:
    v = _str(v, name)
    if not v or len(v) > MAX_NAME:
        raise _bad(f"field {name!r} must have 1..{MAX_NAME} characters")
    return v


def _hex(v: Any, name: str, length: int = 64) -> str:
    v = _str(v, name)
    if len(v) != length or v.strip("0123456789abcdef"):
        raise _bad(f"field {name!r} must be {length} lowercase hex digits")
    return v


def _opt_hex(v: Any, name: str) -> str | None:
    return None if v is None else _hex(v, name)


def _role(v: Any, name: str) -> str:
    if v not in ROLES:
        raise _bad(f"field {name!r} must be one of {sorted(ROLES)}, got {v!r:.40}")
    return v


def _hop(v: Any, name: str) -> str:
    v = _name(v, name)
    if v != "dispatcher":
        try:
            parse_address(v)
        except UsageError:
            raise _bad(f"field {name!r} must be host:port or 'dispatcher', got {v!r:.60}") from None
    return v


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise _bad(f"field {name!r} must be true or false")
    return v


def _name_tuple(v: Any, name: str) -> tuple[str, ...]:
    if type(v) is not list or len(v) > 4096:
        raise _bad(f"field {name!r} must be a list of at most 4096 tensor names")
    names = tuple(_name(x, name) for x in v)
    if len(set(names)) != len(names):
        raise _bad(f"field {name!r} lists a name twice")
    return names


def _opt_dict(v: Any, name: str) -> dict[str, Any] | None:
    if v is not None and type(v) is not dict:
        raise _bad(f"field {name!r} must be an object or null")
    return v


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
    periods.
    """

    TYPE = MsgType.HELLO
    WIRE = {"version": _int, "node_id": _str, "role": _role, "bundle_sha256": _opt_hex,
            "challenge": _opt_hex, "response": _opt_hex, "heartbeat_ms": _int}
    version: int = PROTOCOL_VERSION
    node_id: str = ""
    role: str = "node"
    bundle_sha256: str | None = None
    challenge: str | None = None
    response: str | None = None
    heartbeat_ms: int = 0


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
    """Wire a node into the chain: its stage, where to send (host:port or "dispatcher"), how."""

    TYPE = MsgType.CONFIGURE
    WIRE = {"stage": _int, "n_stages": _int, "next_hop": _hop, "codec": _name,
            "receives": _name_tuple, "forward": _name_tuple, "outputs": _name_tuple}
    stage: int
    n_stages: int
    next_hop: str
    codec: str = "raw"
    receives: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

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


@dataclass(frozen=True, kw_only=True)
class _TensorMessage(_Base):
    tensors: tuple[WireTensor, ...] = ()

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
    """A request (or, with request_id 0, the connection) failed at `node`, for `reason`."""

    TYPE = MsgType.ERROR
    WIRE = {"reason": _str, "node": _str}
    reason: str
    node: str = ""


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


# --- frame layout -----------------------------------------------------------------------------
#
# A frame (all integers little-endian):
#
#   offset size  field
#   0      4     magic            b"DEFR"
#   4      1     version          PROTOCOL_VERSION (checked before anything else)
#   5      1     type             MsgType
#   6      2     flags            0 (reserved: e.g. an authenticated-frame bit)
#   8      8     request id       u64; 0 for control messages
#   16     4     metadata length  u32, a multiple of 8, <= Limits.metadata
#   20     4     segment count    u32, <= Limits.segments; must match metadata["s"]
#   24     8     payload length   u64, sum of the padded segment sizes
#   32     M     metadata         UTF-8 JSON object {"f": {fields}, "s": [segment descriptors]},
#                                 padded with spaces to a multiple of 8
#   32+M   P     payload          segments back to back, each padded with zeros to a multiple
#                                 of 8; a descriptor's "size" is its unpadded length
#
# Tensor descriptors are {"name", "dtype", "shape", "codec", "inner", "size"}; unknown keys are
# ignored (so later versions may add some), unknown types and flags are rejected.

_HEADER = struct.Struct("<4sBBHQIIQ")
HEADER_SIZE = _HEADER.size  # 32


def _pad(n: int) -> int:
    return -n % ALIGN


def encode_parts(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """The frame as a list of buffers (tensor payloads are not copied): write them in order."""
    wire = {name: getattr(msg, name) for name in msg.WIRE}
    segments = msg._segments()
    if len(segments) > limits.segments:
        raise ProtocolError(f"{len(segments)} segments, over the limit of {limits.segments}")
    for desc, _ in segments:
        if desc["size"] > limits.tensor and "dtype" in desc:
            raise ProtocolError(f"tensor {desc['name']!r} has {desc['size']} bytes, "
                                f"over the {limits.tensor}-byte limit")
    meta = json.dumps({"f": wire, "s": [d for d, _ in segments]}, separators=(",", ":"))
    meta_bytes = meta.encode()
    meta_bytes += b" " * _pad(len(meta_bytes))
    if len(meta_bytes) > limits.metadata:
        raise ProtocolError(f"{msg.TYPE.name} metadata has {len(meta_bytes)} bytes, "
                            f"over the {limits.metadata}-byte limit")
    payload_len = sum(d["size"] + _pad(d["size"]) for d, _ in segments)
    if HEADER_SIZE + len(meta_bytes) + payload_len > limits.frame:
        raise ProtocolError(f"{msg.TYPE.name} frame is over the {limits.frame}-byte limit")
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, 0, msg.request_id,
                          len(meta_bytes), len(segments), payload_len)
    parts: list[bytes | memoryview] = [header, meta_bytes]
    for desc, data in segments:
        parts.append(data)
        if _pad(desc["size"]):
            parts.append(bytes(_pad(desc["size"])))
    return parts


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """One complete frame for `msg`."""
    return b"".join(encode_parts(msg, limits))


@dataclass(frozen=True)
class _Header:
    type: MsgType
    request_id: int
    meta_len: int
    n_segments: int
    payload_len: int


def _parse_header(raw: bytes, limits: Limits) -> _Header:
    magic, version, mtype, flags, request_id, meta_len, n_seg, payload_len = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"not a defer frame (magic {magic!r}); is the peer a defer node?")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {version}, this defer speaks "
                            f"{PROTOCOL_VERSION}; run the same defer version on every machine")
    if mtype not in _BY_TYPE:
        raise ProtocolError(f"unknown message type {mtype}")
    if flags:
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if meta_len > limits.metadata or meta_len % ALIGN:
        raise ProtocolError(f"metadata length {meta_len} is not a multiple of {ALIGN} "
                            f"up to {limits.metadata}")
    if n_seg > limits.segments:
        raise ProtocolError(f"{n_seg} segments, over the limit of {limits.segments}")
    if HEADER_SIZE + meta_len + payload_len > limits.frame:
        raise ProtocolError(f"frame of {HEADER_SIZE + meta_len + payload_len} bytes is over "
                            f"the {limits.frame}-byte limit")
    return _Header(MsgType(mtype), request_id, meta_len, n_seg, payload_len)


def _parse_body(header: _Header, body: np.ndarray, limits: Limits) -> Message:
    view = memoryview(body)
    try:
        meta = json.loads(view[: header.meta_len].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _bad(f"metadata is not UTF-8 JSON ({err})") from None
    if type(meta) is not dict or type(meta.get("f")) is not dict or type(meta.get("s")) is not list:
        raise _bad('metadata must be an object with "f" (object) and "s" (list)')
    descs = meta["s"]
    if len(descs) != header.n_segments:
        raise _bad(f"header announces {header.n_segments} segments, metadata lists {len(descs)}")
    segs, offset = [], header.meta_len
    for desc in descs:
        if type(desc) is not dict:
            raise _bad("segment descriptor must be an object")
        size = _int(desc.get("size"), "size")
        limit = limits.tensor if "dtype" in desc else limits.frame
        if size > limit or offset + size + _pad(size) > len(body):
            raise _bad(f"segment of {size} bytes overruns the frame or the size limit")
        segs.append((desc, view[offset: offset + size]))
        offset += size + _pad(size)
    if offset != len(body):
        raise _bad(f"payload length {header.payload_len} does not match its segments")
    cls = _BY_TYPE[header.type]
    values = {}
    for name, check in cls.WIRE.items():
        if name not in meta["f"]:
            raise _bad(f"{cls.TYPE.name} lacks field {name!r}")
        values[name] = check(meta["f"][name], name)
    return cls._from_wire(header.request_id, values, segs, limits)


class _BufferPool:
    """Frame bodies, reused once nothing refers to them any more (every tensor view of the
    frame is gone), so megabyte frames do not fault fresh pages in for every frame. Buffers
    are uninitialised: a body is parsed only once it is fully written."""

    KEEP = 4  # buffers remembered per connection
    SMALL = 64 * 1024  # smaller bodies are simply allocated

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []

    def get(self, size: int) -> np.ndarray:
        if size < self.SMALL:
            return np.empty(size, np.uint8)
        for i in range(len(self._buffers)):
            buffer = self._buffers[i]
            # Referenced only by this list, `buffer` and getrefcount's argument: free.
            if size <= buffer.size <= 2 * size and sys.getrefcount(buffer) == 3:
                self._buffers.append(self._buffers.pop(i))  # most recently used last
                return buffer[:size]
        buffer = np.empty(size, np.uint8)
        self._buffers.append(buffer)
        if len(self._buffers) > self.KEEP:
            self._buffers.pop(0)
        return buffer[:size]


class Decoder:
    """Incremental frame decoder: `feed` bytes as they arrive, call `next` until it returns None.

    After `feed_eof`, `next` returns None at a clean frame boundary and raises ProtocolError
    for a truncated frame. Once it has raised, the decoder stays broken: close the connection.
    Decoded payloads are views into one buffer per frame (no copy per tensor).

    A socket reader may skip `feed` and its copies: `get_buffer()` names where the next bytes
    should go (`recv_into` it), `buffer_updated(n)` says how many went there. Inside a frame's
    body that is the body itself, so payloads land where the tensors will be read from.
    """

    SCRATCH = 256 * 1024  # bytes read at once while between frames (headers, small frames)

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._header: _Header | None = None
        self._body: np.ndarray | bytearray = bytearray()
        self._filled = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._scratch: bytearray | None = None
        self._buffers = _BufferPool()
        self._direct = False  # the last get_buffer() handed out the body itself

    @property
    def eof(self) -> bool:
        """True once feed_eof was called and every complete frame has been taken."""
        return self._eof and self._header is None and self._buffered == 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a frame body (a bound for read-ahead)."""
        return self._buffered

    @property
    def ready(self) -> bool:
        """Whether `next` may have a message (or an error) to give after the latest bytes."""
        if self._error is not None or self._eof:
            return True
        if self._header is None:
            return self._buffered >= HEADER_SIZE
        return self._filled + self._buffered >= len(self._body)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise ProtocolError("data fed after EOF")
        if data:
            view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
            self._chunks.append(view)
            self._buffered += view.nbytes

    def feed_eof(self) -> None:
        self._eof = True

    def get_buffer(self) -> memoryview:
        """A writable buffer for the next received bytes; then call `buffer_updated(n)`."""
        if self._header is None and self._error is None:
            try:  # start the next frame now, so its body can be received in place
                self._start_frame()
            except ProtocolError as err:
                self._error = err  # raised by next(), where the caller expects it
        if self._header is not None and not self._chunks and self._filled < len(self._body):
            self._direct = True
            return memoryview(self._body)[self._filled:]
        self._direct = False
        if self._scratch is None:
            self._scratch = bytearray(self.SCRATCH)
        return memoryview(self._scratch)

    def buffer_updated(self, n: int) -> None:
        """`n` bytes were written into the buffer the last `get_buffer` returned."""
        if self._direct:
            self._filled += n
        else:
            self.feed(memoryview(self._scratch)[:n].tobytes())

    def next(self) -> Message | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as err:
            self._error = err
            raise

    def _next(self) -> Message | None:
        if self._header is None:
            self._start_frame()
            if self._header is None:
                if self._eof and self._buffered:
                    raise ProtocolError(f"connection closed inside a frame header "
                                        f"({self._buffered} of {HEADER_SIZE} bytes)")
                return None
        self._fill()
        if self._filled < len(self._body):
            if self._eof:
                raise ProtocolError(f"connection closed inside a frame "
                                    f"({self._filled} of {len(self._body)} body bytes)")
            return None
        header, body = self._header, self._body
        self._header, self._body = None, bytearray()
        return _parse_body(header, body, self.limits)

    def _start_frame(self) -> None:
        """Parse the next header once it is all here and allocate the frame's body."""
        if self._buffered < HEADER_SIZE:
            return
        header = _parse_header(self._take(HEADER_SIZE), self.limits)
        self._header = header
        self._body = self._buffers.get(header.meta_len + header.payload_len)
        self._filled = 0
        self._fill()

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._chunks.popleft()
            need = n - len(out)
            out += chunk[:need]
            if chunk.nbytes > need:
                self._chunks.appendleft(chunk[need:])
        self._buffered -= n
        return bytes(out)

    def _fill(self) -> None:
        body = memoryview(self._body)
        while self._chunks and self._filled < len(body):
            chunk = self._chunks.popleft()
            n = min(chunk.nbytes, len(body) - self._filled)
            body[self._filled: self._filled + n] = chunk[:n]
            self._filled += n
            self._buffered -= n
            if n < chunk.nbytes:
                self._chunks.appendleft(chunk[n:])
