# Inputs and outputs for a run: seeded random inputs shaped by the manifest, .npy/.npz files
# read as one input or a stack of inputs, stacked outputs written to .npz, and `check_sample`,
# which holds one input against the manifest (names, dtypes, shapes) before anything is sent.
from __future__ import annotations

from pathlib import Path

import numpy as np

from defer.errors import InputError, UsageError
from defer.manifest import Manifest
from defer.tensors import Sample, TensorSpec


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
