"""The wire protocol, h11 style: one table of messages shared by encoder and decoder tests; each
round-trips fed whole, byte by byte and with trailing bytes; random and mutated bytes give
ProtocolError and nothing else; a clean EOF is not an error, a truncated frame is.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defer.errors import ProtocolError
from defer.runtime import protocol as p


def _tensor(name: str, array: np.ndarray, codec: str = "raw") -> p.WireTensor:
    return p.WireTensor(name=name, dtype=array.dtype.name, shape=array.shape, codec=codec,
                        data=array.tobytes())


CASES: list[p.Message] = [
    p.Hello(node_id="127.0.0.1:7000", role="node", bundle_sha256="ab" * 32),
    p.Hello(role="dispatcher", challenge="c0" * 32, response=None, heartbeat_ms=500),
    p.Hello(role="upstream", node_id="n", challenge="0f" * 32, response="ee" * 32),
    p.Load(sha256="00" * 32, bundle=b"\x08\x07onnx-bytes" * 3),
    p.Configure(stage=1, n_stages=3, next_hop="127.0.0.1:7002", codec="zfp:0.01+lz4",
                receives=("r1",), forward=("r1",), outputs=("h2",)),
    p.Ack(request_id=4, what="configure"),
    p.Infer(request_id=7, tensors=(
        _tensor("x", np.arange(12, dtype=np.float32).reshape(1, 3, 4)),
        _tensor("idx", np.array([3, 1, 2], dtype=np.int64)),
        _tensor("flag", np.array(True)),
        _tensor("odd", np.zeros((0, 5), dtype=np.float16)))),
    p.Result(request_id=2**63 - 1, tensors=(_tensor("y", np.ones((2, 3), np.float64)),)),
    p.Error(request_id=9, reason="onnxruntime failed: bad shape", node="127.0.0.1:7001"),
    p.Stats(request_id=3),
    p.Stats(request_id=3, counters={"requests": 5, "bytes_in": {"raw": 10}, "busy_s": 0.5}),
    p.Ping(request_id=11),
    p.Pong(request_id=11),
    p.Shutdown(drain=False),
    p.Configure(stage=0, n_stages=2, next_hop="[::1]:7001", trace=True),
    p.Infer(request_id=8, tensors=(_tensor("h", np.ones((1, 4), np.float32)),),
            spans=(p.Span(0, 1.7e9, 1.7e9 + 0.001, 1.7e9 + 0.002, 1.7e9 + 0.04, 1.7e9 + 0.041,
                          0.0001, 0.037, 0.0009),)),
    p.Result(request_id=8, spans=tuple(p.Span(k, 5.0 + k, 5.1 + k, 5.2 + k, 5.3 + k, 5.4 + k,
                                              0.0, 0.1, 0.0) for k in range(3))),
    p.Result(request_id=9, spans=()),
    p.Hello(role="probe", node_id="doctor", challenge="aa" * 32),
    p.Profile(request_id=12, mode="kernels", models=(b"\x08\x07onnx" * 5,), runs=7, warmup=2,
              batch=4),
    p.Profile(request_id=13, mode="models", models=(b"TFL3" * 3, b"", b"x" * 9),
              levels=("basic",)),
    p.ProfileResult(request_id=12, engine="onnx", threads=1, cores=4, memory_free=1 << 30,
                    seconds=1.5, levels={"basic": {"kernels": {"conv1": 0.002, "fc/MatMul": 1e-6},
                                                   "reorder_seconds": 0.0, "reorder_bytes": 0,
                                                   "run_seconds": 0.003},
                                         "all": {"kernels": {"conv1_nchwc": 0.0015},
                                                 "reorder_seconds": 1e-4,
                                                 "reorder_bytes": 4096, "run_seconds": 0.002}}),
    p.ProfileResult(request_id=13, engine="tflite", threads=2, cores=1, memory_free=0,
                    seconds=0.25, model_seconds=(1e-3, 0.0, 2.5e-4), io_seconds_per_byte=1e-10),
    p.Echo(request_id=14, payload=bytes(1000), reply_size=0),
    p.Echo(request_id=15, reply_size=1 << 20),
    p.LinkTest(request_id=16, target="[::1]:7002", max_size=1 << 20, seconds=0.1),
    p.LinkResult(request_id=16, target="10.0.0.2:7000", samples=((0, 1e-4), (65536, 0.03))),
]
IDS = [f"{i}-{type(m).__name__}" for i, m in enumerate(CASES)]


def _decode_all(decoder: p.Decoder) -> list[p.Message]:
    return list(iter(decoder.next, None))


def _same(a: p.Message, b: p.Message) -> bool:
    # Payloads come back as memoryviews; dataclass equality compares their bytes.
    return a == b


@pytest.mark.parametrize("msg", CASES, ids=IDS)
def test_encoded_frame_follows_the_documented_layout(msg):
    frame = p.encode(msg)
    magic, version, mtype, flags, rid, meta_len, n_seg, payload_len = struct.unpack_from(
        "<4sBBHQIIQ", frame)
    assert (magic, version, mtype, flags, rid) == (b"DEFR", 1, msg.TYPE, 0, msg.request_id)
    assert meta_len % 8 == 0 and len(frame) == 32 + meta_len + payload_len
    meta = json.loads(frame[32: 32 + meta_len])
    assert len(meta["s"]) == n_seg


@pytest.mark.parametrize("msg", CASES, ids=IDS)
def test_round_trip_whole(msg):
    decoder = p.Decoder()
    decoder.feed(p.encode(msg))
    decoder.feed_eof()
    assert [_same(m, msg) for m in _decode_all(decoder)] == [True]
    assert decoder.eof


@pytest.mark.parametrize("msg", CASES, ids=IDS)
def test_round_trip_byte_by_byte(msg):
    decoder = p.Decoder()
    frame = p.encode(msg)
    got = []
    for i in range(len(frame)):
        decoder.feed(frame[i: i + 1])
        got += _decode_all(decoder)
        assert len(got) == (1 if i == len(frame) - 1 else 0)
    assert _same(got[0], msg)


@pytest.mark.parametrize("msg", CASES, ids=IDS)
def test_round_trip_with_trailing_bytes(msg):
    frame = p.encode(msg)
    decoder = p.Decoder()
    decoder.feed(frame + frame[:5])
    assert [_same(m, msg) for m in _decode_all(decoder)] == [True]
    decoder.feed(frame[5:])
    assert [_same(m, msg) for m in _decode_all(decoder)] == [True]


def test_every_message_back_to_back_in_one_feed():
    decoder = p.Decoder()
    decoder.feed(b"".join(p.encode(m) for m in CASES))
    decoder.feed_eof()
    assert _decode_all(decoder) == CASES


def test_tensor_payloads_are_aligned_views():
    decoder = p.Decoder()
    decoder.feed(p.encode(CASES[6]))
    msg = decoder.next()
    for tensor in msg.tensors:
        view = np.frombuffer(tensor.data, dtype=tensor.dtype)
        assert view.ctypes.data % 8 == 0 or view.size == 0


def test_clean_eof_is_not_an_error_but_truncation_is():
    decoder = p.Decoder()
    decoder.feed_eof()
    assert decoder.next() is None and decoder.eof
    frame = p.encode(CASES[0])
    for cut in (1, 31, 32, len(frame) - 1):
        decoder = p.Decoder()
        decoder.feed(frame[:cut])
        assert decoder.next() is None
        decoder.feed_eof()
        with pytest.raises(ProtocolError, match="closed inside"):
            decoder.next()


def test_version_is_checked_before_anything_else():
    frame = bytearray(p.encode(CASES[0]))
    frame[4] = 2
    frame[5] = 250  # an unknown type too: the version must be what is reported
    decoder = p.Decoder()
    decoder.feed(bytes(frame))
    with pytest.raises(ProtocolError, match="protocol version 2"):
        decoder.next()


def test_a_broken_decoder_stays_broken():
    decoder = p.Decoder()
    decoder.feed(b"XXXX" + bytes(28) + p.encode(CASES[0]))
    for _ in range(2):
        with pytest.raises(ProtocolError, match="magic"):
            decoder.next()


@pytest.mark.parametrize("limits, msg, match", [
    (p.Limits(metadata=64), CASES[4], "metadata"),
    (p.Limits(tensor=16), CASES[6], "tensor|segment"),
    (p.Limits(frame=100), CASES[3], "frame"),
    (p.Limits(segments=2), CASES[6], "segments"),
])
def test_limits_are_enforced_on_both_sides(limits, msg, match):
    with pytest.raises(ProtocolError, match=match):
        p.encode(msg, limits)
    decoder = p.Decoder(limits)
    decoder.feed(p.encode(msg))
    with pytest.raises(ProtocolError, match=match):
        decoder.next()


def _frame(mtype: int, meta: object, payload: bytes = b"", n_seg: int | None = None,
           raw_meta: bytes | None = None) -> bytes:
    body = raw_meta if raw_meta is not None else json.dumps(meta).encode()
    body += b" " * (-len(body) % 8)
    segs = n_seg if n_seg is not None else len(meta.get("s", [])) if isinstance(meta, dict) else 0
    return struct.pack("<4sBBHQIIQ", b"DEFR", 1, mtype, 0, 1, len(body), segs,
                       len(payload)) + body + payload


@pytest.mark.parametrize("frame, match", [
    (_frame(1, {"f": {}, "s": []}), "lacks field"),
    (_frame(1, {"f": {"version": "1", "node_id": "", "role": "node", "bundle_sha256": None,
                      "challenge": None, "response": None, "heartbeat_ms": 0}, "s": []}),
     "non-negative integer"),
    (_frame(1, {"f": {"version": 1, "node_id": "", "role": "admin", "bundle_sha256": None,
                      "challenge": None, "response": None, "heartbeat_ms": 0}, "s": []}),
     "role"),
    (_frame(1, {"f": {"version": 1, "node_id": "", "role": "node", "bundle_sha256": "AB" * 32,
                      "challenge": None, "response": None, "heartbeat_ms": 0}, "s": []}),
     "hex"),
    (_frame(1, {"f": {"version": 1, "node_id": "x" * 20000, "role": "node",
                      "bundle_sha256": None, "challenge": None, "response": None,
                      "heartbeat_ms": 0}, "s": []}), "characters"),
    (_frame(3, {"f": {"stage": 3, "n_stages": 3, "next_hop": "dispatcher", "codec": "raw",
                      "receives": [], "forward": [], "outputs": [], "trace": False}, "s": []}), "out of range"),
    (_frame(3, {"f": {"stage": 0, "n_stages": 3, "next_hop": "nowhere", "codec": "raw",
                      "receives": [], "forward": [], "outputs": [], "trace": False}, "s": []}), "host:port"),
    (_frame(3, {"f": {"stage": 0, "n_stages": 3, "next_hop": "h:1", "codec": "raw",
                      "receives": ["a", "a"], "forward": [], "outputs": [], "trace": False}, "s": []}),
     "twice"),
    (_frame(3, {"f": {"stage": 0, "n_stages": 3, "next_hop": "h:1", "codec": "",
                      "receives": [], "forward": [], "outputs": [], "trace": False}, "s": []}), "characters"),
    (_frame(3, {"f": {"stage": 0, "n_stages": 3, "next_hop": "h:1", "codec": "raw",
                      "receives": [], "forward": [], "outputs": [], "trace": 1}, "s": []}),
     "true or false"),
    (_frame(11, {"f": {"drain": 1}, "s": []}), "true or false"),
    (_frame(6, {"f": {"spans": {}}, "s": []}), "spans or null"),
    (_frame(6, {"f": {"spans": [[0, 1, 2, 3, 4, 5, 6, 7]]}, "s": []}), "list of 9"),
    (_frame(6, {"f": {"spans": [[-1, 1, 2, 3, 4, 5, 6, 7, 8]]}, "s": []}), "non-negative"),
    (_frame(6, {"f": {"spans": [[0, 1, 2, 3, 4, 5, 6, 7, "8"]]}, "s": []}), "seconds"),
    (_frame(6, {"f": {"spans": [[0, 1, 2, 3, 4, 5, 6, 7, 1e300]]}, "s": []}), "seconds"),
    (_frame(6, {"f": {"spans": [[0] * 9, 5]}, "s": []}), "list of 9"),
    (_frame(6, {"f": {}, "s": []}), "lacks field 'spans'"),
    (_frame(11, [], n_seg=0), "object"),
    (_frame(11, None, raw_meta=b"\xff\xfe"), "UTF-8 JSON"),
    (_frame(11, None, raw_meta=b"[" * 5000 + b"]" * 5000), "UTF-8 JSON|object"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "object", "shape": [1], "codec": "raw",
                               "inner": 0, "size": 8}]}, bytes(8)), "dtype"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "float32", "shape": [-1],
                               "codec": "raw", "inner": 0, "size": 8}]}, bytes(8)), "integer"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "float32", "shape": [2**31] * 3,
                               "codec": "raw", "inner": 0, "size": 8}]}, bytes(8)), "limit"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "float64", "shape": [2**25, 2],
                               "codec": "zfp", "inner": 0, "size": 8}]}, bytes(8)),
     "tensor limit"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "float32", "shape": [2], "codec": "raw",
                               "inner": 0, "size": 16}]}, bytes(8)), "overruns"),
    (_frame(5, {"f": {"spans": None}, "s": [{"size": 8}]}, bytes(16)), "lacks|match"),
    (_frame(5, {"f": {"spans": None}, "s": [{"name": "x", "dtype": "float32", "shape": [2], "codec": "raw",
                               "inner": 0, "size": 8}] * 2}, bytes(16)), "duplicate"),
    (_frame(2, {"f": {"sha256": "00" * 32}, "s": []}), "exactly one"),
    (_frame(9, {"f": {}, "s": [{"size": 0}]}), "no payload"),
    (_frame(1, {"f": {}, "s": []}, n_seg=3), "announces"),
    *[(_frame(12, {"f": {"mode": "kernels", "levels": ["basic"], "runs": 1, "warmup": 0,
                         "batch": 1, **bad}, "s": [{"size": 8}] * segments}, bytes(8 * segments)),
       match) for bad, segments, match in [
          ({}, 2, "exactly one model"), ({}, 0, "exactly one model"),
          ({"mode": "models"}, 0, "models"), ({"mode": "layers"}, 1, "mode"),
          ({"levels": []}, 1, "levels"), ({"levels": ["basic", "basic"]}, 1, "levels"),
          ({"levels": ["fast"]}, 1, "levels"), ({"runs": 0}, 1, "runs"),
          ({"batch": 10**6}, 1, "batch")]],
    *[(_frame(13, {"f": {"engine": "onnx", "threads": 1, "cores": 1, "memory_free": 0,
                         "seconds": 0.1}, "s": [{"size": len(report)}]},
              report + bytes(-len(report) % 8)), match) for report, match in [
          (b"\xff\xfe", "UTF-8 JSON"), (b"[1]", "object"), (b"[" * 5000, "UTF-8 JSON"),
          (b'{"levels": {"fast": {}}, "model_seconds": [], "io_seconds_per_byte": 0}', "levels"),
          (b'{"levels": {"basic": {}}, "model_seconds": [], "io_seconds_per_byte": 0}',
           "kernels"),
          (b'{"levels": {"basic": {"kernels": {"a": -1}, "reorder_seconds": 0, '
           b'"reorder_bytes": 0}}, "model_seconds": [], "io_seconds_per_byte": 0}', "finite"),
          (b'{"levels": {"basic": {"kernels": {"a": NaN}, "reorder_seconds": 0, '
           b'"reorder_bytes": 0}}, "model_seconds": [], "io_seconds_per_byte": 0}', "finite"),
          (b'{"levels": {"basic": {"kernels": {"": 1}, "reorder_seconds": 0, '
           b'"reorder_bytes": 0}}, "model_seconds": [], "io_seconds_per_byte": 0}',
           "characters"),
          (b'{"levels": {"all": {"kernels": {}, "reorder_seconds": 0, "reorder_bytes": 0, '
           b'"run_seconds": -1}}, "model_seconds": [], "io_seconds_per_byte": 0}', "run_seconds"),
          (b'{"levels": {}, "model_seconds": ["1"], "io_seconds_per_byte": 0}', "finite"),
          (b'{"levels": {}, "model_seconds": [], "io_seconds_per_byte": Infinity}', "finite"),
          (b'{"levels": {}, "model_seconds": {}, "io_seconds_per_byte": 0}', "list")]],
    (_frame(13, {"f": {"engine": "onnx", "threads": 1, "cores": 1, "memory_free": 0,
                       "seconds": 1e9}, "s": [{"size": 0}]}), "duration"),
    (_frame(14, {"f": {"reply_size": 2**40}, "s": [{"size": 0}]}), "reply_size"),
    (_frame(14, {"f": {"reply_size": 0}, "s": []}), "one payload"),
    (_frame(15, {"f": {"target": "dispatcher", "max_size": 1, "seconds": 0.1}, "s": []}),
     "host:port"),
    (_frame(15, {"f": {"target": "h:1", "max_size": 1, "seconds": -1}, "s": []}), "duration"),
    (_frame(16, {"f": {"target": "h:1", "samples": []}, "s": []}), "samples"),
    (_frame(16, {"f": {"target": "h:1", "samples": [[1, 2, 3]]}, "s": []}), "bytes, seconds"),
    (_frame(16, {"f": {"target": "h:1", "samples": [[-1, 0.1]]}, "s": []}), "samples"),
    (_frame(16, {"f": {"target": "h:1", "samples": [[1, 0.1]] * 300}, "s": []}), "samples"),
])
def test_malformed_frames_raise_protocol_error(frame, match):
    decoder = p.Decoder()
    decoder.feed(frame)
    with pytest.raises(ProtocolError, match=match):
        decoder.next()


def test_an_unauthenticated_peer_may_send_small_hellos_only():
    decoder = p.Decoder(p.HANDSHAKE_LIMITS)
    decoder.feed(p.encode(CASES[1]))
    assert decoder.next() == CASES[1]
    probes = [m for m in CASES if isinstance(m, p.Profile | p.Echo)]
    for msg in (CASES[3], CASES[6], *probes):  # payloads are refused outright
        decoder = p.Decoder(p.HANDSHAKE_LIMITS)
        decoder.feed(p.encode(msg))
        with pytest.raises(ProtocolError, match="segments|limit"):
            decoder.next()
    huge = struct.pack("<4sBBHQIIQ", b"DEFR", 1, 1, 0, 0, 8, 0, 2**40)
    decoder = p.Decoder(p.HANDSHAKE_LIMITS)
    decoder.feed(huge)
    with pytest.raises(ProtocolError, match="frame"):
        decoder.next()  # refused from the header alone, before any allocation


def _parse_everything(data: bytes, chunk: int) -> None:
    decoder = p.Decoder(p.Limits(metadata=4096, tensor=1 << 16, frame=1 << 18, segments=64))
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i: i + chunk])
            while decoder.next() is not None:
                pass
        decoder.feed_eof()
        while decoder.next() is not None:
            pass
    except ProtocolError:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 64))
def test_random_bytes_parse_or_raise_protocol_error(data, chunk):
    _parse_everything(data, chunk)


@FUZZ
@given(st.sampled_from(range(len(CASES))), st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 64))
def test_mutated_frames_parse_or_raise_protocol_error(index, mutations, chunk):
    frame = bytearray(p.encode(CASES[index]))
    for position, value in mutations:
        frame[position % len(frame)] = value
    _parse_everything(bytes(frame), chunk)


@FUZZ
@given(st.sampled_from(range(len(CASES))), st.integers(0, 200), st.binary(max_size=40))
def test_truncated_or_spliced_frames_parse_or_raise_protocol_error(index, cut, junk):
    frame = p.encode(CASES[index])
    _parse_everything(frame[: len(frame) - cut % len(frame)] + junk, 7)


# --- receiving in place: get_buffer()/buffer_updated(n), what a socket reader does ------------

def _receive(decoder: p.Decoder, data: bytes, piece: int) -> list[p.Message]:
    """Deliver `data` as `recv_into(decoder.get_buffer())` would, at most `piece` bytes a call."""
    got, i = [], 0
    while i < len(data):
        buffer = decoder.get_buffer()
        n = min(len(buffer), piece, len(data) - i)
        buffer[:n] = data[i: i + n]
        decoder.buffer_updated(n)
        i += n
        got += _decode_all(decoder)
    return got


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("msg", CASES, ids=IDS)
def test_round_trip_received_in_place(msg, piece):
    frame = p.encode(msg)
    decoder = p.Decoder()
    assert [_same(m, msg) for m in _receive(decoder, frame + frame + frame[:5], piece)] \
        == [True, True]
    assert [_same(m, msg) for m in _receive(decoder, frame[5:], piece)] == [True]
    decoder.feed_eof()
    assert decoder.next() is None and decoder.eof


def test_a_body_is_received_where_its_tensors_are_read_from():
    big = p.Infer(request_id=1, tensors=(_tensor("x", np.arange(300_000, dtype=np.float32)),))
    frame = p.encode(big)
    decoder = p.Decoder()
    buffer = decoder.get_buffer()
    buffer[:40] = frame[:40]  # the header and a little more: now the body exists
    decoder.buffer_updated(40)
    body = decoder.get_buffer()
    assert len(body) == len(frame) - 40  # exactly the rest of this frame, never the next one
    body[:] = frame[40:]
    decoder.buffer_updated(len(body))
    msg = decoder.next()
    assert _same(msg, big)
    assert np.shares_memory(np.frombuffer(msg.tensors[0].data, np.uint8), np.asarray(body))


def test_a_frame_buffer_is_reused_only_once_nothing_refers_to_it():
    x = np.arange(300_000, dtype=np.float32)
    frames = [p.encode(p.Infer(request_id=i, tensors=(_tensor("x", x * i),))) for i in (1, 2, 3)]
    decoder = p.Decoder()
    first = np.frombuffer(_receive(decoder, frames[0], 1 << 20)[0].tensors[0].data, np.float32)
    second = _receive(decoder, frames[1], 1 << 20)[0]
    assert np.array_equal(first, x) and not np.shares_memory(first, second.tensors[0].data)
    kept = first.ctypes.data
    del first
    third = _receive(decoder, frames[2], 1 << 20)[0]
    assert np.frombuffer(third.tensors[0].data, np.float32).ctypes.data == kept
    assert np.array_equal(np.frombuffer(second.tensors[0].data, np.float32), x * 2)


def test_a_bad_header_received_in_place_raises_from_next_not_from_get_buffer():
    decoder = p.Decoder()
    buffer = decoder.get_buffer()
    buffer[:32] = b"XXXX" + bytes(28)
    decoder.buffer_updated(32)
    decoder.get_buffer()  # parses that header: a socket reader's callback must not blow up
    with pytest.raises(ProtocolError, match="magic"):
        decoder.next()


def _receive_everything(data: bytes, piece: int) -> None:
    decoder = p.Decoder(p.Limits(metadata=4096, tensor=1 << 16, frame=1 << 18, segments=64))
    try:
        _receive(decoder, data, piece)
        decoder.feed_eof()
        while decoder.next() is not None:
            pass
    except ProtocolError:
        pass


@FUZZ
@given(st.sampled_from(range(len(CASES))), st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 64), st.binary(max_size=40))
def test_mutated_frames_received_in_place_parse_or_raise_protocol_error(index, mutations,
                                                                         piece, junk):
    frame = bytearray(p.encode(CASES[index]))
    for position, value in mutations:
        frame[position % len(frame)] = value
    _receive_everything(bytes(frame) + junk, piece)
