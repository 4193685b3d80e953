"""Per-tensor activation codecs, shared by the runtime (which applies them on every hop) and the
compiler (which prices them).

`encode_tensor(name, array, codec) -> WireTensor` and `decode_tensor(WireTensor) -> ndarray`;
each tensor carries its codec, dtype and shape, so a receiver needs no configuration. Specs:
raw | lz4 | zfp | zfp:<tol> | q8 | q8c | q8c:<axis>, each of the last five optionally +lz4.
`zfp` is reversible (lossless), `zfp:<tol>` fixed accuracy (|error| <= tol). zfp sees the tensor
flattened to 1-D and only takes float32/64 and int32/64: other dtypes fall back to lz4, integer
tensors never go lossy, empty tensors go raw. raw is zero-copy both ways.

`q8` is 8-bit affine quantization (see q8.py): a quarter of float32's bytes at a small fraction
of zfp's CPU. Per tensor (`q8`) or per channel (`q8c`: axis 1, the C of ONNX's NCHW; `q8c:<axis>`
another axis, e.g. `q8c:-1` for TFLite's NHWC). Its scales and zero points travel in the payload,
so the protocol is unchanged. Error: |x - decoded| <= scale / 2 (plus float32 rounding), where
scale = (max(hi, 0) - min(lo, 0)) / 255 over the tensor (per channel: over the channel); zero
is exact. Only float16/32/64 are quantized; other dtypes, and float tensors holding inf or NaN,
fall back to lz4 (recorded on the wire, like zfp's fall-backs).

Bad payloads raise CodecError; a bad spec raises UsageError. `CODEC_HELP` is the one
description of the specs that every --codec option shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import lz4.block
import numpy as np
import zfpy

from defer import q8
from defer.errors import CodecError, UsageError
from defer.tensors import DTYPES

ZFP_DTYPES = frozenset({"float32", "float64", "int32", "int64"})
CODEC_HELP = ("raw, lz4, zfp (lossless), zfp:<tol> (|error| <= tol), q8 (8-bit affine per "
              "tensor, |error| <= range/510), q8c[:<axis>] (per channel, axis 1 by default); "
              "zfp, zfp:<tol> and q8* take +lz4")


@dataclass(frozen=True)
class WireTensor:
    """One encoded tensor: what it is (name, dtype, shape), how it is encoded, and the bytes.

    `inner` is the size of an intermediate stream for two-step codecs (zfp+lz4), else 0.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes | bytearray | memoryview = field(repr=False)
    inner: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data) if not isinstance(self.data, memoryview) else self.data.nbytes

    @property
    def raw_nbytes(self) -> int:
        """Bytes the tensor takes decoded (what the raw codec would send)."""
        return math.prod(self.shape) * DTYPES[self.dtype]



@dataclass(frozen=True)
class Codec:
    """A parsed codec spec: an optional first stage (zfp, tolerance None = reversible; or q8,
    `axis` None = per tensor, else per channel along it), then optional lz4."""

    zfp: bool = False
    tolerance: float | None = None
    lz4: bool = False
    q8: bool = False
    axis: int | None = None

    @property
    def spec(self) -> str:
        plus = "+lz4" if self.lz4 else ""
        if self.q8:
            return ("q8" if self.axis is None else "q8c" if self.axis == 1
                    else f"q8c:{self.axis}") + plus
        if not self.zfp:
            return "lz4" if self.lz4 else "raw"
        zfp = "zfp" if self.tolerance is None else f"zfp:{self.tolerance:g}"
        return zfp + plus

    @property
    def lossless(self) -> bool:
        return self.tolerance is None and not self.q8


@lru_cache(maxsize=64)
def parse_codec(spec: str) -> Codec:
    """Parse a codec spec such as "zfp:1e-2+lz4"; UsageError names the accepted forms."""
    text = spec.strip().lower()
    base, plus, rest = text.partition("+")
    if plus and rest != "lz4":
        raise UsageError(f"unknown codec {spec!r}; use one of: {CODEC_HELP}")
    if base in ("raw", "lz4") and not plus:
        return Codec(lz4=base == "lz4")
    name, colon, tol = base.partition(":")
    if name in ("q8", "q8c"):
        return Codec(lz4=bool(plus), q8=True, axis=_q8_axis(spec, name, colon, tol))
    if name != "zfp" or (colon and not tol):
        raise UsageError(f"unknown codec {spec!r}; use one of: {CODEC_HELP}")
    tolerance = None
    if colon:
        try:
            tolerance = float(tol)
        except ValueError:
            raise UsageError(f"codec {spec!r}: tolerance {tol!r} is not a number") from None
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise UsageError(f"codec {spec!r}: tolerance must be a positive number")
    return Codec(zfp=True, tolerance=tolerance, lz4=bool(plus))


def _q8_axis(spec: str, name: str, colon: str, axis: str) -> int | None:
    if name == "q8":
        if colon:
            raise UsageError(f"codec {spec!r}: q8 takes no argument; per channel is q8c:<axis>")
        return None
    if not colon:
        return 1
    try:
        return int(axis)
    except ValueError:
        raise UsageError(f"codec {spec!r}: axis {axis!r} is not an integer (q8c:1 is the C "
                         "of NCHW, q8c:-1 the C of NHWC)") from None


def effective_codec(codec: Codec, dtype: str, shape: tuple[int, ...]) -> Codec:
    """The codec applied to a tensor of this dtype and shape (before looking at its values)."""
    if math.prod(shape) == 0:
        return Codec()
    if codec.q8:
        if dtype not in q8.DTYPES:
            return Codec(lz4=True)
        if codec.axis is not None and (len(shape) < 2 or not -len(shape) <= codec.axis
                                       < len(shape)):
            return Codec(lz4=codec.lz4, q8=True)  # no channels along that axis: per tensor
        return codec
    if codec.zfp and dtype not in ZFP_DTYPES:
        return Codec(lz4=True)
    if codec.zfp and dtype.startswith("int") and codec.tolerance is not None:
        return Codec(zfp=True, lz4=codec.lz4)  # integers are indices/counts: never lossy
    return codec


def encode_tensor(name: str, array: np.ndarray, codec: str | Codec = "raw") -> WireTensor:
    """Encode one tensor. raw returns a view of `array` (do not mutate it until sent)."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    array = np.asarray(array)
    dtype = array.dtype.name
    if dtype not in DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {dtype} cannot be sent; "
                         f"use one of {', '.join(DTYPES)}")
    flat = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).reshape(-1)
    used = effective_codec(codec, dtype, array.shape)
    data = q8.quantize(flat.reshape(array.shape), used.axis) if used.q8 else None
    if used.q8 and data is None:  # inf or NaN: no range to quantize over
        used = Codec(lz4=True)
    inner = 0
    if used.zfp:
        data = _zfp_compress(flat, used.tolerance)
    elif not used.q8:
        data = memoryview(flat.view(np.uint8))
    if used.lz4:
        inner = len(data) if used.zfp or used.q8 else 0
        data = lz4.block.compress(data, store_size=False)
    return WireTensor(name=name, dtype=dtype, shape=tuple(array.shape), codec=used.spec,
                      data=data, inner=inner)


def decode_tensor(tensor: WireTensor) -> np.ndarray:
    """Decode one tensor; raw is a zero-copy view of the received buffer."""
    try:
        codec = parse_codec(tensor.codec)
    except UsageError as err:
        raise CodecError(f"tensor {tensor.name!r}: {err}") from None
    dtype = np.dtype(tensor.dtype)  # protocol.DTYPES already vetted the name
    count = math.prod(tensor.shape)
    raw_size = count * dtype.itemsize
    data = tensor.data
    if codec.q8:
        size = q8.payload_size(tensor.shape, codec.axis)
        if size is None:
            raise CodecError(f"tensor {tensor.name!r}: {tensor.codec} needs a float tensor "
                             f"with that axis, got {tensor.dtype}{list(tensor.shape)}")
        if codec.lz4:
            if tensor.inner != size:
                raise CodecError(f"tensor {tensor.name!r}: q8 stream size {tensor.inner}, "
                                 f"expected {size}")
            data = _lz4_decompress(tensor, data, size)
        try:
            flat = q8.dequantize(data, tensor.shape, codec.axis, dtype)
        except ValueError as err:
            raise CodecError(f"tensor {tensor.name!r}: corrupt q8 payload ({err})") from None
        return flat
    if codec.zfp:
        if codec.lz4:
            if not 0 < tensor.inner <= 2 * raw_size + 4096:
                raise CodecError(f"tensor {tensor.name!r}: implausible zfp stream size "
                                 f"{tensor.inner} for {raw_size} raw bytes")
            data = _lz4_decompress(tensor, data, tensor.inner)
        flat = _zfp_decompress(tensor, data, count, raw_size)
    elif codec.lz4:
        flat = np.frombuffer(_lz4_decompress(tensor, data, raw_size), dtype=dtype)
    else:
        if len(data) != raw_size:
            raise CodecError(f"tensor {tensor.name!r}: {len(data)} bytes, expected {raw_size} "
                             f"for {tensor.dtype}{list(tensor.shape)}")
        flat = np.frombuffer(data, dtype=dtype)
    return flat.reshape(tensor.shape)


def _zfp_compress(flat: np.ndarray, tolerance: float | None) -> bytes:
    if tolerance is None:
        return zfpy.compress_numpy(flat)
    return zfpy.compress_numpy(flat, tolerance=tolerance)


def _lz4_decompress(tensor: WireTensor, data, size: int) -> bytes:
    try:
        return lz4.block.decompress(data, uncompressed_size=size)
    except lz4.block.LZ4BlockError as err:
        raise CodecError(f"tensor {tensor.name!r}: corrupt lz4 payload ({err})") from None


def _zfp_decompress(tensor: WireTensor, data, count: int, raw_size: int) -> np.ndarray:
    if tensor.dtype not in ZFP_DTYPES:
        raise CodecError(f"tensor {tensor.name!r}: zfp cannot carry {tensor.dtype}")
    # zfp's bit reader does not bounds-check: give a truncated stream zeros, not foreign memory.
    padded = bytearray(max(len(data) + 64, raw_size + raw_size // 2 + 1024))
    padded[: len(data)] = data
    try:
        header = zfpy.header(padded)
    except (ValueError, IndexError, TypeError) as err:
        raise CodecError(f"tensor {tensor.name!r}: corrupt zfp header ({err})") from None
    if (np.dtype(header["type"]).name != tensor.dtype or header["nx"] != count
            or header["ny"] or header["nz"] or header["nw"]):
        raise CodecError(f"tensor {tensor.name!r}: zfp stream holds {header['nx']} "
                         f"{np.dtype(header['type']).name}, expected {count} {tensor.dtype}")
    try:
        return zfpy.decompress_numpy(padded)
    except (ValueError, RuntimeError, TypeError) as err:
        raise CodecError(f"tensor {tensor.name!r}: corrupt zfp payload ({err})") from None


def max_abs_error(codec: str | Codec) -> float:
    """The error bound a codec promises per element whatever the data (0.0 for lossless codecs;
    inf for q8, whose bound scales with each tensor's range: see `error_bound`)."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    if codec.q8:
        return math.inf
    return 0.0 if codec.tolerance is None else codec.tolerance


def error_bound(codec: str | Codec, array: np.ndarray) -> float:
    """The largest error `codec` allows on this tensor (q8: the largest scale / 2, float
    rounding aside; fall-backs counted: an integer tensor is carried exactly)."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    array = np.asarray(array)
    used = effective_codec(codec, array.dtype.name, array.shape)
    if used.q8:
        return q8.max_error(array, used.axis)
    return max_abs_error(used)
