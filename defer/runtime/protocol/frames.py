"""Frames: the binary header, `encode_parts`/`encode`, and the incremental `Decoder`. The frame
layout is written out below; the decoder receives straight into each frame's body buffer."""

from __future__ import annotations

import json
import struct
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np

from defer.errors import ProtocolError
from defer.runtime.protocol.fields import (
    ALIGN,
    DEFAULT_LIMITS,
    MAGIC,
    PROTOCOL_VERSION,
    Limits,
    _bad,
    _int,
)
from defer.runtime.protocol.messages import _BY_TYPE as _CORE_TYPES
from defer.runtime.protocol.messages import Message, MsgType
from defer.runtime.protocol.probes import PROBES

_BY_TYPE = {**_CORE_TYPES, **{cls.TYPE: cls for cls in PROBES}}

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
