"""Tensor specs, the one dtype table and the one input check, shared by every layer.

A `TensorSpec` names a tensor, its numpy dtype and its shape; a dimension that is not a
non-negative int (None, a symbolic name, -1) is dynamic and matches any size. `check_tensor` is
the only rule for "does this tensor fit that spec": the dispatcher applies it to a caller's
arrays (`check_sample`), a node to what arrives on the wire. `DTYPES` lists the dtypes that may
cross a hop, with their item sizes; `random_inputs` makes seeded samples of a list of specs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defer.errors import InputError

# numpy dtype name -> bytes per element: everything a tensor may declare on the wire.
DTYPES: dict[str, int] = {
    "float16": 2, "float32": 4, "float64": 8, "bool": 1,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}

Sample = dict[str, np.ndarray]
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, numpy dtype name and shape; a dim that is not an int >= 0 is dynamic.

    `quant` holds (scale, zero_point) for a quantized integer tensor, else None.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    quant: tuple[float, int] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        quant = d.get("quant")
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]),
                   quant=(float(quant["scale"]), int(quant["zero_point"])) if quant else None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quant is not None:
            d["quant"] = {"scale": self.quant[0], "zero_point": self.quant[1]}
        return d

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension replaced by `batch`."""
        return tuple(d if _fixed(d) else batch for d in self.shape)

    def nbytes(self, batch: int = 1) -> int:
        """Bytes of one tensor of this spec, dynamic dims set to `batch`."""
        return math.prod(self.concrete_shape(batch)) * itemsize(self.dtype)

    def fits(self, dtype: str, shape: Sequence[int]) -> bool:
        """Whether a tensor of `dtype` and `shape` is what this spec takes."""
        return dtype == self.dtype and len(shape) == len(self.shape) and all(
            not _fixed(want) or want == got for want, got in zip(self.shape, shape))

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) if _fixed(d) else "?" for d in self.shape) + "]"


def _fixed(dim: Dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def itemsize(dtype: str) -> int:
    """Bytes per element of a numpy dtype name (4 for a name numpy does not know)."""
    size = DTYPES.get(dtype)
    if size is None:
        try:
            size = np.dtype(dtype).itemsize
        except TypeError:
            size = 4
    return size


def check_tensor(spec: TensorSpec, dtype: str, shape: Sequence[int], subject: str,
                 arrived: bool = False) -> None:
    """InputError naming `subject` and the fix when (dtype, shape) does not fit `spec`.

    `arrived`: phrase it as a tensor that came over the wire to a bundle (a node's check),
    not as a caller's input to the model (the dispatcher's check)."""
    verb, has, wants = (("arrived as", "arrived with", "the bundle takes") if arrived
                        else ("is", "has", "the model wants"))
    if dtype != spec.dtype:
        raise InputError(f"{subject} {verb} {dtype}, {wants} {spec.dtype}: pass "
                         f"x.astype({spec.dtype!r})")
    if not spec.fits(dtype, shape):
        raise InputError(f"{subject} {has} shape {list(shape)}, {wants} {spec.shape_text()} "
                         "(? = any size); reshape it")


def check_sample(specs: Sequence[TensorSpec], sample: Mapping[str, Any],
                 where: str = "input") -> Sample:
    """The sample as arrays, or InputError: exactly the names of `specs`, each fitting its spec."""
    missing = [s.name for s in specs if s.name not in sample]
    extra = sorted(set(sample) - {s.name for s in specs})
    if missing or extra:
        raise InputError(f"{where}s must be exactly {[s.name for s in specs]}; missing "
                         f"{missing}, unexpected {extra}")
    arrays = {}
    for spec in specs:
        array = np.asarray(sample[spec.name])
        check_tensor(spec, array.dtype.name, array.shape, f"{where} {spec.name!r}")
        arrays[spec.name] = array
    return arrays


def random_inputs(specs: Sequence[TensorSpec], count: int, seed: int = 0,
                  batch: int = 1) -> list[Sample]:
    """`count` seeded random samples of these specs, dynamic dims set to `batch`."""
    rng = np.random.default_rng(seed)
    return [{spec.name: random_tensor(spec, rng, batch) for spec in specs} for _ in range(count)]


def random_tensor(spec: TensorSpec, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    """One seeded random tensor: standard normal floats, 0/1 booleans, integers in 0..9."""
    shape = spec.concrete_shape(batch)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 10, shape).astype(dtype)
