"""What `defer profile` sends each node, and how it turns the answers into op costs.

It runs where the model is, so it uses the compiler: the model is loaded and analysed exactly
as `defer compile` does, which fixes the op names cluster.json's `op_costs` are keyed by.

- ONNX (and Keras, through the compiler's loader): the normalised model goes whole in one
  PROFILE "kernels" request (onnxruntime's profiler at ORT_ENABLE_BASIC and _ALL); above the
  node's `max_model_size` it goes as contiguous chunks (`stage_model`, the exporter's own
  cut), each under the limit, whose kernels are merged. The compiler's own mapping
  (`costs_from_profile`) turns kernels into per-op seconds.
- TFLite: one-op models (`one_op_models`, what `time_ops` times), in PROFILE "models"
  requests of at most `max_model_size` bytes and 4096 models each; the compiler reads the
  answer back as `OpTimes(op names, seconds, io_seconds_per_byte).costs(info)`.

A reply that does not fit the model (kernels that name none of its ops, a count that differs
from the models sent) raises BadProfile: the node is named by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defer.engines.profiling import KernelProfile
from defer.runtime.protocol import Limits, Profile, ProfileResult

MIN_MATCHED = 0.5  # of the ops: fewer matched kernels and a profile is not of this model
MAX_MODELS = Limits().segments


class BadProfile(ValueError):
    """A node's profile does not describe the model it was sent."""


class TooSmall(ValueError):
    """Even one op is over a node's max_model_size."""


@dataclass
class Work:
    """One model, ready to profile: its identity and ops, and how to ask and read back."""

    format: str
    model: dict[str, Any]  # name, sha256, format, n_ops (cluster.json's "model")
    op_names: list[str]
    runs: int = 10
    warmup: int = 3
    _state: Any = field(default=None, repr=False)  # the compiler's GraphInfo
    _models: list[bytes] | None = field(default=None, repr=False)  # TFLite one-op models
    _requests: dict[int, list[Profile]] = field(default_factory=dict, repr=False)

    def requests(self, max_size: int) -> list[Profile]:
        """The PROFILE requests for a node that accepts models up to `max_size` bytes."""
        if max_size not in self._requests:
            build = _onnx_requests if self.format == "onnx" else _tflite_requests
            self._requests[max_size] = build(self, max_size)
        return self._requests[max_size]

    def read(self, results: list[ProfileResult]) -> tuple[dict[str, float], dict[str, Any]]:
        """(op costs by op name, measured extras for cluster.json) from `requests`' replies."""
        if self.format == "onnx":
            return _onnx_costs(self, results)
        return _tflite_costs(self, results)


def prepare(model: str | Path, runs: int = 10, warmup: int = 3, batch: int = 1) -> Work:
    """Load and analyse `model` as `defer compile` would (a `.tflite` stays TFLite)."""
    from defer.compiler import load_model
    from defer.compiler.frontend import front_end

    loaded = load_model(model)
    info = front_end(loaded.format).analyse(loaded.model, batch, "file")
    return Work(loaded.format, {"name": loaded.name, "sha256": loaded.sha256,
                                "format": loaded.format, "n_ops": info.n_ops},
                [op.name for op in info.ops], runs, warmup, info)


# --- ONNX -------------------------------------------------------------------------------------

def _onnx_requests(work: Work, max_size: int) -> list[Profile]:
    from defer.compiler.export import EXTERNAL_ABOVE

    info = work._state
    whole = info.model.ByteSize()
    if whole <= max_size and whole < EXTERNAL_ABOVE:
        models = [info.model.SerializeToString()]
    else:
        models = _chunks(info, 0, info.n_ops, max_size)
    return [Profile(mode="kernels", models=(m,), runs=work.runs, warmup=work.warmup,
                    batch=info.batch) for m in models]


def _chunks(info, a: int, b: int, max_size: int) -> list[bytes]:
    """Serialized sub-models of ops [a, b), each at most `max_size` bytes: halves by weight."""
    from defer.compiler.export import EXTERNAL_ABOVE, stage_model

    model, _ = stage_model(info, a, b, 0)
    size = model.ByteSize()
    if size <= max_size and size < EXTERNAL_ABOVE:
        return [model.SerializeToString()]
    if b - a == 1:
        raise TooSmall(f"op {info.ops[a].name!r} alone is {size / 2**20:.1f} MiB")
    weights = np.cumsum([sum(info.constant_bytes[w] for w in op.weights) + 1
                         for op in info.ops[a:b]])
    middle = a + int(np.clip(np.searchsorted(weights, weights[-1] / 2), 1, b - a - 1))
    return _chunks(info, a, middle, max_size) + _chunks(info, middle, b, max_size)


def _onnx_costs(work: Work, results: list[ProfileResult]) -> tuple[dict[str, float], dict]:
    from defer.compiler.profile import Profile as Measured
    from defer.compiler.profile import costs_from_profile

    info = work._state
    levels = {}
    for level in ("basic", "all"):
        parts = [KernelProfile.from_dict(r.levels[level]) for r in results if level in r.levels]
        if len(parts) != len(results):
            raise BadProfile(f"the profile lacks level {level!r}")
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merged(part)
        levels[level] = merged
    known = {op.name for op in [*info.ops, *info.const_ops]}
    matched = known.intersection(levels["basic"].kernels)
    if len(matched) < MIN_MATCHED * info.n_ops:
        raise BadProfile(f"its kernels name {len(matched)} of the model's {info.n_ops} ops; "
                         "it did not profile this model")
    costs = costs_from_profile(info, Measured(levels["basic"], levels["all"]))
    op_costs = {op.name: float(c) for op, c in zip(info.ops, costs.node)}
    return op_costs, {"profile": {k: v.to_dict() for k, v in levels.items()},
                      "profile_chunks": len(results)}


# --- TFLite -----------------------------------------------------------------------------------

def _tflite_requests(work: Work, max_size: int) -> list[Profile]:
    from defer.compiler.tflite.costs import one_op_models
    from defer.compiler.tflite.slicer import stage_operators

    info = work._state
    if work._models is None:
        groups = [stage_operators(info, k, k + 1) for k in range(info.n_ops)]
        work._models = one_op_models(info.model, groups)
    requests, batch, size = [], [], 0
    for k, model in enumerate(work._models):
        if len(model) > max_size:
            raise TooSmall(f"op {info.ops[k].name!r} alone is {len(model) / 2**20:.1f} MiB")
        if batch and (size + len(model) > max_size or len(batch) == MAX_MODELS):
            requests.append(batch)
            batch, size = [], 0
        batch.append(model)
        size += len(model)
    requests.append(batch)
    return [Profile(mode="models", models=tuple(models), runs=work.runs, warmup=work.warmup,
                    batch=info.batch) for models in requests]


def _tflite_costs(work: Work, results: list[ProfileResult]) -> tuple[dict[str, float], dict]:
    seconds = [s for r in results for s in r.model_seconds]
    if len(seconds) != len(work.op_names):
        raise BadProfile(f"it timed {len(seconds)} one-op models of the "
                         f"{len(work.op_names)} sent")
    rate = float(np.median([r.io_seconds_per_byte for r in results]))
    return dict(zip(work.op_names, seconds)), {"io_seconds_per_byte": rate,
                                               "profile_chunks": len(results)}
