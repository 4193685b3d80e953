"""The onnxruntime engine: the session every node deploys (ORT_ENABLE_ALL, sequential, one
inter-op thread, `threads` intra-op threads) and its input/output specs.

The compiler times and verifies bundles with the same `make_session`, so a plan is costed on
exactly what the nodes run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from defer.errors import ManifestError
from defer.tensors import TensorSpec

# onnxruntime's type strings -> numpy dtype names
_ORT_DTYPES = {f"tensor({k})": v for k, v in {
    "float": "float32", "double": "float64", "float16": "float16", "bool": "bool",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64"}.items()}


def make_session(model: bytes | str | Path, threads: int = 1,
                 level: ort.GraphOptimizationLevel | None = None,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """The deploy session: `level` (default ORT_ENABLE_ALL), `threads` intra-op threads."""
    opts = options or ort.SessionOptions()
    opts.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


def session_specs(args) -> list[TensorSpec]:
    """Specs of a session's `get_inputs()` or `get_outputs()`."""
    return [_spec(arg) for arg in args]


class OnnxEngine:
    """One onnxruntime session behind the `Engine` interface."""

    format = "onnx"

    def __init__(self, model: bytes | bytearray | memoryview | str | Path, threads: int = 1):
        source = bytes(model) if isinstance(model, bytearray | memoryview) else model
        try:
            self.session = make_session(source, threads)
        except Exception as err:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise ManifestError(f"onnxruntime cannot load the bundle: {err}") from None
        self.inputs = session_specs(self.session.get_inputs())
        self.outputs = session_specs(self.session.get_outputs())

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(outputs), dict(feeds))
