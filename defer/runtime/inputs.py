# Inputs and outputs for a run: seeded random inputs shaped by the manifest, .npy/.npz files
# read as one input or a stack of inputs, stacked outputs written to .npz, and `check_sample`,
# which holds one input against the manifest (names, dtypes, shapes) before anything is sent.
from __future__ import annotations

from pathlib import Path

import numpy as np

from defer.errors import InputError, UsageError
from defer.manifest import Manifest, TensorSpec

Sample = dict[str, np.ndarray]


def random_inputs(model: Manifest | list[TensorSpec], count: int, seed: int = 0,
                  batch: int = 1) -> list[Sample]:
    """`count` seeded random inputs of a manifest's (or these specs') shapes, dynamic dims set
    to `batch`."""
    specs = model.inputs if isinstance(model, Manifest) else model
    rng = np.random.default_rng(seed)
    return [{spec.name: _random(spec, rng, batch) for spec in specs} for _ in range(count)]


def check_sample(specs: list[TensorSpec], sample: dict[str, np.ndarray]) -> Sample:
    """The sample as arrays, or InputError naming the input and the fix: the names must be
    exactly the model's inputs, each dtype exact, each shape equal except dynamic dims."""
    missing = [s.name for s in specs if s.name not in sample]
    extra = sorted(set(sample) - {s.name for s in specs})
    if missing or extra:
        raise InputError(f"inputs must be exactly {[s.name for s in specs]}; missing "
                         f"{missing}, unexpected {extra}")
    arrays = {}
    for spec in specs:
        array = np.asarray(sample[spec.name])
        if array.dtype.name != spec.dtype:
            raise InputError(f"input {spec.name!r} is {array.dtype.name}, the model wants "
                             f"{spec.dtype}: pass x.astype({spec.dtype!r})")
        fits = len(array.shape) == len(spec.shape) and all(
            not isinstance(want, int) or want < 0 or want == got
            for want, got in zip(spec.shape, array.shape))
        if not fits:
            raise InputError(f"input {spec.name!r} has shape {tuple(array.shape)}, the model "
                             f"wants {tuple(spec.shape)} (None/str = any size); reshape it")
        arrays[spec.name] = array
    return arrays


def _random(spec: TensorSpec, rng: np.random.Generator, batch: int) -> np.ndarray:
    shape = spec.concrete_shape(batch)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 10, shape).astype(dtype)


def load_inputs(path: str | Path, manifest: Manifest) -> list[Sample]:
    """Read x.npy (single-input models) or x.npz (one array per input name).

    Each array is either one input of the model's shape or a stack of them along a new first
    axis.
    """
    path = Path(path)
    specs = manifest.inputs
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise UsageError(f"{path}: the model takes {len(specs)} inputs "
                                 f"{[s.name for s in specs]}; pass an .npz with one per name")
            arrays = {specs[0].name: np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        else:
            raise UsageError(f"{path}: inputs must be .npy or .npz")
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read inputs from {path}: {err}") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{path} lacks inputs {missing}; it has {sorted(arrays)}")
    stacks = {s.name: _as_stack(arrays[s.name], s, path) for s in specs}
    counts = {len(v) for v in stacks.values()}
    if len(counts) != 1:
        raise InputError(f"{path}: inputs hold different numbers of samples {sorted(counts)}")
    return [{name: stack[i] for name, stack in stacks.items()} for i in range(counts.pop())]


def _as_stack(array: np.ndarray, spec: TensorSpec, path: Path) -> np.ndarray:
    if array.ndim == len(spec.shape):
        return array[None]
    if array.ndim == len(spec.shape) + 1:
        return array
    raise InputError(f"{path}: {spec.name!r} has shape {array.shape}; expected {spec.shape} "
                     f"or a stack (N, {', '.join(map(str, spec.shape))})")


def save_outputs(path: str | Path, outputs: list[Sample]) -> None:
    """Write outputs as .npz, each name stacked along a new first axis."""
    if not outputs:
        raise UsageError("no outputs to save")
    np.savez(Path(path), **{name: np.stack([o[name] for o in outputs]) for name in outputs[0]})
