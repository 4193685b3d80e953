"""8-bit affine quantization of float tensors: the `q8` codecs' payload (see codecs.py).

Each channel c (the whole tensor when `axis` is None) keeps its range [lo, hi] widened to hold
zero, scale = (hi - lo) / 255 (a float32 rounded up) and an integer zero point zp in 0..255:

    q = clip(round(x / scale) + zp, 0, 255)  as uint8,      x' = (q - zp) * scale

so |x - x'| <= scale / 2 (float32 rounding aside) and 0 decodes to exactly 0 (ReLU zeros stay
zeros, which lz4 after it likes). Payload, little-endian, no padding:

    scales  float32 x C  |  zero points  uint8 x C  |  q  uint8 x count (row-major)

C = shape[axis] (1 per tensor). The codec spec and the tensor's shape say everything else, so
the payload needs no header and the wire protocol is unchanged.
"""

from __future__ import annotations

import math

import numpy as np

DTYPES = frozenset({"float16", "float32", "float64"})
_LEVELS = 255


def payload_size(shape: tuple[int, ...], axis: int | None) -> int | None:
    """Bytes of the payload of a tensor of this shape, None if `axis` is not one of it."""
    channels = _channels(shape, axis)
    return None if channels is None else 5 * channels + math.prod(shape)


def quantize(array: np.ndarray, axis: int | None) -> bytes | None:
    """The payload of `array` (float, native byte order); None if it holds inf or NaN."""
    x = array.astype(np.float32, copy=False)
    if axis is None:
        x = x.reshape(-1)  # one scale for all (and a 0-d tensor becomes an array)
    scale, zero = _parameters(x, axis)
    if scale is None:
        return None
    broadcast = _broadcast_shape(x.shape, axis)
    q = np.divide(x, scale.reshape(broadcast), dtype=np.float32)
    q += zero.reshape(broadcast)
    np.rint(q, out=q)
    np.clip(q, 0, _LEVELS, out=q)
    return b"".join((scale.astype("<f4").tobytes(), zero.astype(np.uint8).tobytes(),
                     q.astype(np.uint8).tobytes()))


def dequantize(data, shape: tuple[int, ...], axis: int | None, dtype: np.dtype) -> np.ndarray:
    """The tensor a payload holds; ValueError if the payload does not fit `shape`."""
    channels = _channels(shape, axis)
    if channels is None:
        raise ValueError(f"no axis {axis} in shape {list(shape)}")
    view = memoryview(data).cast("B")
    expected = 5 * channels + math.prod(shape)
    if view.nbytes != expected:
        raise ValueError(f"{view.nbytes} bytes, expected {expected}")
    scale = np.frombuffer(view, "<f4", channels).astype(np.float32)
    if not np.all(np.isfinite(scale) & (scale >= 0)):
        raise ValueError("a scale is negative or not finite")
    zero = np.frombuffer(view, np.uint8, channels, 4 * channels).astype(np.float32)
    q = np.frombuffer(view, np.uint8, offset=5 * channels).reshape(shape)
    broadcast = _broadcast_shape(shape, axis)
    out = q.astype(np.float32)
    out -= zero.reshape(broadcast)
    out *= scale.reshape(broadcast)
    return out.astype(dtype, copy=False)


def max_error(array: np.ndarray, axis: int | None) -> float:
    """The bound on |x - x'| for this tensor: the largest scale / 2 (inf if not finite)."""
    x = np.asarray(array, dtype=np.float32)
    scale, _ = _parameters(x.reshape(-1) if axis is None else x, axis)
    if scale is None:
        return math.inf
    return float(np.where(_all_zero(x, axis), 0.0, scale).max(initial=0.0)) / 2


def _all_zero(x: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.array([not np.any(x)])
    return ~np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).any(axis=1)


def _channels(shape: tuple[int, ...], axis: int | None) -> int | None:
    if axis is None:
        return 1
    if not -len(shape) <= axis < len(shape):
        return None
    return int(shape[axis])


def _broadcast_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return (1,) * len(shape)
    broadcast = [1] * len(shape)
    broadcast[axis] = shape[axis]
    return tuple(broadcast)


def _parameters(x: np.ndarray, axis: int | None):
    """(scale, zero point), (C,) float32 each (an all-zero channel gets scale 1: it decodes
    exactly whatever the scale); (None, None) if x holds inf or NaN."""
    if axis is None:
        lo, hi = np.array([x.min(initial=0.0)]), np.array([x.max(initial=0.0)])
    else:
        rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo, hi = rows.min(axis=1, initial=0.0), rows.max(axis=1, initial=0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None, None
    span = hi.astype(np.float64) - lo  # the range, widened to hold 0 (initial=0.0 above)
    scale = (span / _LEVELS).astype(np.float32)
    low = scale.astype(np.float64) * _LEVELS < span  # rounded down: one ulp up covers the range
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    scale[span == 0] = 1.0  # an all-zero channel: any scale decodes it exactly
    zero = np.clip(np.rint(-lo / scale), 0, _LEVELS).astype(np.float32)
    return scale, zero
