"""Streams of inputs and outputs for `defer dispatch`, in memory bounded by one sample.

Inputs: `InputFile(path, manifest)` reads x.npy (single-input models) or x.npz (one array per
input name); each array is one input of the model's shape or a stack of them along a new first
axis. Samples are read one at a time from the file (an .npz member is streamed, decompressed on
the fly), never the whole stack; every sample is checked against the manifest before it is
sent. `random_stream` yields seeded random samples on demand. Outputs: `OutputWriter` appends
each result to one .npy per output name on disk and zips them into the .npz at the end, so
`--count 100000` needs no more memory than `--count 1`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from defer.errors import InputError, UsageError
from defer.manifest import Manifest
from defer.tensors import Sample, TensorSpec, check_sample, random_tensor


@dataclass
class _Member:
    """One array in an input file: where to open it, its header and the sample layout."""

    spec: TensorSpec
    dtype: np.dtype
    shape: tuple[int, ...]  # per sample
    count: int
    offset: int  # bytes of header before the data


class InputFile:
    """The samples of an .npy/.npz input file, read lazily; `len()` is the sample count."""

    def __init__(self, path: str | Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.specs = manifest.inputs
        if self.path.suffix not in (".npy", ".npz"):
            raise UsageError(f"{self.path}: inputs must be .npy or .npz")
        if self.path.suffix == ".npy" and len(self.specs) != 1:
            raise UsageError(f"{self.path}: the model takes {len(self.specs)} inputs "
                             f"{[s.name for s in self.specs]}; pass an .npz with one per name")
        try:
            self.members = {spec.name: self._member(spec) for spec in self.specs}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UsageError(f"cannot read inputs from {self.path}: {err}") from None
        counts = {m.count for m in self.members.values()}
        if len(counts) != 1:
            raise InputError(f"{self.path}: inputs hold different numbers of samples "
                             f"{sorted(counts)}")
        self.count = counts.pop()

    def __len__(self) -> int:
        return self.count

    def samples(self, count: int | None = None) -> Iterator[Sample]:
        """`count` samples (default: each once), cycling through the file, each checked."""
        total = self.count if count is None else count
        produced = 0
        while produced < total and self.count:
            with contextlib.ExitStack() as stack:
                readers = {name: self._open(stack, m) for name, m in self.members.items()}
                for _ in range(min(self.count, total - produced)):
                    sample = {name: read() for name, read in readers.items()}
                    yield check_sample(self.specs, sample, where=f"{self.path}: input")
                    produced += 1

    def _member(self, spec: TensorSpec) -> _Member:
        with contextlib.ExitStack() as stack:
            f = self._file(stack, spec.name)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject:
            raise UsageError(f"{self.path}: {spec.name!r} holds Python objects; save plain "
                             "numeric arrays")
        if len(shape) == len(spec.shape):
            sample_shape, count = tuple(shape), 1
        elif len(shape) == len(spec.shape) + 1:
            sample_shape, count = tuple(shape[1:]), shape[0]
        else:
            raise InputError(f"{self.path}: {spec.name!r} has shape {shape}; expected "
                             f"{spec.shape} or a stack (N, {', '.join(map(str, spec.shape))})")
        if fortran and count > 1 and len(shape) > 1:
            raise UsageError(f"{self.path}: {spec.name!r} is stored in Fortran order; save it "
                             "with np.ascontiguousarray")
        return _Member(spec, dtype, sample_shape, count, offset)

    def _file(self, stack: contextlib.ExitStack, name: str) -> IO[bytes]:
        if self.path.suffix == ".npy":
            return stack.enter_context(open(self.path, "rb"))
        archive = stack.enter_context(zipfile.ZipFile(self.path))
        member = f"{name}.npy"
        if member not in archive.namelist():
            have = sorted(n.removesuffix(".npy") for n in archive.namelist())
            raise InputError(f"{self.path} lacks input {name!r}; it has {have}")
        return stack.enter_context(archive.open(member))

    def _open(self, stack: contextlib.ExitStack, member: _Member):
        f = self._file(stack, member.spec.name)
        f.read(member.offset)
        size = math.prod(member.shape) * member.dtype.itemsize

        def read() -> np.ndarray:
            data = f.read(size)
            if len(data) != size:
                raise InputError(f"{self.path}: {member.spec.name!r} ends early")
            return np.frombuffer(data, member.dtype).reshape(member.shape)

        return read


def random_stream(specs: list[TensorSpec], count: int, seed: int = 0,
                  batch: int = 1) -> Iterator[Sample]:
    """`count` seeded random samples, made one at a time (the same values as
    `defer.tensors.random_inputs(specs, count, seed)`)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {spec.name: random_tensor(spec, rng, batch) for spec in specs}


class OutputWriter:
    """Append results to `<path>.npz` (one array per output name, stacked along a new first
    axis) without holding them: each name streams into its own .npy on disk; `close` zips."""

    def __init__(self, path: str | Path, count: int) -> None:
        self.path, self.count = Path(path), count
        self._dir = tempfile.TemporaryDirectory(prefix=".defer-out-", dir=self.path.parent)
        self._arrays: dict[str, np.memmap] = {}
        self._written = 0

    def append(self, outputs: Sample) -> None:
        if not self._arrays:
            for name, value in outputs.items():
                self._arrays[name] = np.lib.format.open_memmap(
                    os.path.join(self._dir.name, f"{name}.npy"), mode="w+",
                    dtype=value.dtype, shape=(self.count, *value.shape))
        for name, value in outputs.items():
            self._arrays[name][self._written] = value
        self._written += 1

    def close(self) -> None:
        """Write the .npz (atomically: a temp file moved into place) and clean up."""
        if not self._written:
            self._dir.cleanup()
            raise UsageError("no outputs to save")
        try:
            if self._written < self.count:
                raise UsageError(f"only {self._written} of {self.count} outputs arrived")
            partial = Path(self._dir.name) / "out.npz"
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, array in self._arrays.items():
                    array.flush()
                    archive.write(array.filename, f"{name}.npy")
            del self._arrays
            os.replace(partial, self.path)
        finally:
            self._dir.cleanup()
