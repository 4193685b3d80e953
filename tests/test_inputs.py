"""Input and output streams of `defer dispatch`: samples are read one at a time from .npy,
.npz and compressed .npz files (single inputs or stacks, cycled to --count), each checked;
outputs stream to disk and come back stacked; random samples equal `random_inputs`."""

from __future__ import annotations

import numpy as np
import pytest

from defer.errors import InputError, UsageError
from defer.manifest import Manifest
from defer.runtime.inputs import InputFile, OutputWriter, random_stream
from defer.tensors import TensorSpec, random_inputs


def _manifest(*specs: TensorSpec) -> Manifest:
    return Manifest(model={"inputs": [s.to_dict() for s in specs], "outputs": []}, plan={},
                    stages=[])


X = TensorSpec("x", "float32", (1, 4))
B = TensorSpec("b", "int64", (None, 3))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_stacks_stream_in_order_and_cycle(tmp_path, save):
    xs = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 4)
    bs = np.arange(5 * 2 * 3).reshape(5, 2, 3)
    save(tmp_path / "in.npz", x=xs, b=bs)
    source = InputFile(tmp_path / "in.npz", _manifest(X, B))
    assert len(source) == 5
    got = list(source.samples(12))
    assert len(got) == 12
    for i, sample in enumerate(got):
        assert np.array_equal(sample["x"], xs[i % 5]) and np.array_equal(sample["b"], bs[i % 5])


def test_a_single_npy_input_is_one_sample(tmp_path):
    x = np.ones((1, 4), np.float32)
    np.save(tmp_path / "x.npy", x)
    source = InputFile(tmp_path / "x.npy", _manifest(X))
    assert len(source) == 1 and np.array_equal(next(source.samples())["x"], x)


@pytest.mark.parametrize("array, error, match", [
    (np.zeros((3, 1, 5), np.float32), InputError, r"has shape \[1, 5\]"),
    (np.zeros((3, 1, 4), np.float64), InputError, "float64, the model wants float32"),
    (np.zeros((3, 2, 1, 4), np.float32), InputError, "expected"),
])
def test_a_wrong_sample_names_the_input(tmp_path, array, error, match):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(error, match=match):
        next(InputFile(tmp_path / "x.npy", _manifest(X)).samples())


def test_missing_member_and_bad_suffix(tmp_path):
    np.savez(tmp_path / "in.npz", y=np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match="lacks input 'x'"):
        InputFile(tmp_path / "in.npz", _manifest(X))
    with pytest.raises(UsageError, match=".npy or .npz"):
        InputFile(tmp_path / "in.txt", _manifest(X))


def test_random_stream_is_random_inputs_one_at_a_time():
    lazy = list(random_stream([X, B], 3, seed=4))
    eager = random_inputs([X, B], 3, seed=4)
    for a, b in zip(lazy, eager):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_outputs_stream_to_an_npz(tmp_path):
    writer = OutputWriter(tmp_path / "y.npz", 4)
    for i in range(4):
        writer.append({"y": np.full((1, 2), i, np.float32), "n": np.array([i])})
    writer.close()
    with np.load(tmp_path / "y.npz") as out:
        assert out["y"].shape == (4, 1, 2) and list(out["n"][:, 0]) == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.npz"]  # no temp file left


def test_outputs_that_never_arrived_are_an_error(tmp_path):
    writer = OutputWriter(tmp_path / "y.npz", 3)
    writer.append({"y": np.zeros(2)})
    with pytest.raises(UsageError, match="only 1 of 3"):
        writer.close()
    assert not (tmp_path / "y.npz").exists()
