"""Run one bundle: the small interface every engine offers, and `load_engine` to pick one.

An engine holds one loaded model and runs it on one thread pool of its own:

    engine = load_engine(path_or_bytes, threads=1)      # format from the file, or given
    engine.inputs, engine.outputs                        # list[TensorSpec], dynamic dims None
    engine.run(["y"], {"x": array}) -> [array]          # outputs in the order asked

`onnx` (onnxruntime, `defer.engines.onnx`) ships with the runtime; `tflite` (LiteRT) comes with
the `[tflite]` extra. Backends are imported only when a bundle of their format is loaded, so a
node that serves TFLite bundles never imports onnxruntime, and the reverse. A model that will
not load raises ManifestError; a missing backend MissingDependencyError naming the extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from defer.errors import ManifestError, MissingDependencyError
from defer.tensors import TensorSpec

FORMATS = ("onnx", "tflite")
_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


class Engine(Protocol):
    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; the arrays of `outputs`, in that order."""
        ...


def available_engines() -> list[str]:
    """The formats this machine can run, without importing their backends."""
    import importlib.util

    backends = {"onnx": "onnxruntime", "tflite": "ai_edge_litert"}
    return [fmt for fmt, module in backends.items() if importlib.util.find_spec(module)]


def detect_format(model: bytes | bytearray | memoryview | str | Path) -> str:
    """"tflite" for a TFLite flatbuffer (identifier TFL3), else "onnx"; a path by its suffix."""
    if isinstance(model, str | Path):
        suffix = Path(model).suffix.lower()
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
        with open(model, "rb") as f:
            model = f.read(8)
    return "tflite" if bytes(model[4:8]) == b"TFL3" else "onnx"


def load_engine(model: bytes | bytearray | memoryview | str | Path, threads: int = 1,
                format: str | None = None) -> Engine:
    """Load a bundle (bytes or a file) into the engine of its format."""
    fmt = format or detect_format(model)
    if fmt == "onnx":
        from defer.engines.onnx import OnnxEngine

        return OnnxEngine(model, threads)
    if fmt == "tflite":
        try:
            from defer.engines.litert import LiteRTEngine
        except ImportError as err:
            raise MissingDependencyError(
                f"this bundle is TFLite, which needs LiteRT ({err}); install it with: "
                "pip install 'defer-edge[tflite]'") from None
        return LiteRTEngine(model, threads)
    raise ManifestError(f"unknown bundle format {fmt!r}; defer runs {', '.join(FORMATS)}")
