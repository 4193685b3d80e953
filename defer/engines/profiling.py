"""Time a model's kernels with the engine that runs it: the one method the compiler's local
profile and a node's PROFILE request (`defer profile`) share.

    profile_onnx(model, "basic", threads=1) -> KernelProfile
        onnxruntime's own profiler (`SessionOptions.enable_profiling`) at one optimisation
        level ("basic": kernel names are the ONNX node names; "all": what nodes deploy, fused
        kernels named after their output tensor), `warmup` runs, then `runs` timed runs.
        Also the layout reorders' seconds and bytes per run. Profiles are read one event at a
        time and reduced as they are read, so a 10k-op graph's trace is never held whole.
    time_models(models, feeds) -> ModelTimes
        Models with no per-op profiler (LiteRT) are timed as one-op models: each run alone, in
        the order given, fed by tensor name from `feeds` and what the models before it produced
        (inputs nobody provides get seeded random values). An op's cost is its invoke alone;
        handing tensors in and out is measured apart, as seconds per byte.
Both take each kernel's (model's) fastest run as its share and scale the shares to the wall
time the runs really took (KernelProfile says why), so a device capped to a share of a core is
profiled right.

Seconds per *kernel* (or per given model) is all this module knows: mapping kernels onto a
graph's ops, and pricing cuts, is the job of the compiler, a layer above that calls this one
(as the node's PROFILE answer does). onnxruntime is imported only by `profile_onnx`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from defer.engines import load_engine
from defer.tensors import TensorSpec, random_inputs

log = logging.getLogger(__name__)

LEVELS = ("basic", "all")  # onnxruntime graph optimisation levels a profile may run at


@dataclass
class KernelProfile:
    """What one onnxruntime profile says: seconds per kernel name, the layout reorders'
    seconds and output bytes per run (their ratio prices a cut's reorders), and the median
    wall time of one whole run (warm-up runs dropped).

    A kernel's seconds are its fastest run, scaled so that the kernels add up to the median
    whole run. The fastest run is its share (time that others' work or a pause added is never
    its own); the whole run is what a stage really takes. On an idle core the scaling adds the
    executor's few percent between kernels and the usual jitter; on a device capped to a share
    of a core (a cgroup quota) it is what makes the profile right at all: the quota's pauses
    land inside a few kernels of each run, the same few when runs line up with its period, so
    per-kernel medians both miss the pauses (0.2 core: they add up to a fifth of the wall time)
    and pile them on those few kernels."""

    kernels: dict[str, float]
    reorder_seconds: float = 0.0
    reorder_bytes: int = 0
    run_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "reorder_seconds": self.reorder_seconds,
                "reorder_bytes": self.reorder_bytes, "run_seconds": self.run_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KernelProfile:
        return cls({str(k): float(v) for k, v in d["kernels"].items()},
                   float(d.get("reorder_seconds", 0.0)), int(d.get("reorder_bytes", 0)),
                   float(d.get("run_seconds", 0.0)))

    def merged(self, other: KernelProfile) -> KernelProfile:
        """Both profiles as one (kernels of separately profiled chunks of one model)."""
        return KernelProfile({**self.kernels, **other.kernels},
                             self.reorder_seconds + other.reorder_seconds,
                             self.reorder_bytes + other.reorder_bytes,
                             self.run_seconds + other.run_seconds)


@dataclass
class ModelTimes:
    """Seconds of each model's run alone (its invoke, for LiteRT), and of handing one byte
    into or out of an engine (the median over the models)."""

    seconds: np.ndarray
    io_seconds_per_byte: float


def seeded_feeds(specs: Sequence[TensorSpec], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of these specs (dynamic dimensions set to `batch`)."""
    return random_inputs(list(specs), 1, seed, batch)[0]


def profile_onnx(model: bytes | bytearray | memoryview | str | Path, level: str = "basic",
                 threads: int = 1, runs: int = 10, warmup: int = 3,
                 feeds: Mapping[str, np.ndarray] | None = None, batch: int = 1,
                 on_run: Callable[[], None] | None = None) -> KernelProfile:
    """Profile an ONNX model (bytes or a file) under onnxruntime at `level` with `threads`
    intra-op threads, as nodes deploy it (`make_session`); `on_run` is called after each run."""
    import onnxruntime as ort

    from defer.engines.onnx import make_session, session_specs

    if level not in LEVELS:
        raise ValueError(f"profile level must be one of {LEVELS}, got {level!r}")
    source = bytes(model) if isinstance(model, bytearray | memoryview) else model
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory(prefix="defer-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        optimisation = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic"
                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        session = make_session(source, threads, optimisation, options)
        if feeds is None:
            feeds = seeded_feeds(session_specs(session.get_inputs()), batch)
        log.info("profiling at %s: %d warm-up + %d runs, %d thread(s)", level, warmup, runs,
                 threads)
        for _ in range(warmup + runs):
            session.run(None, dict(feeds))
            if on_run is not None:
                on_run()
        path = session.end_profiling()
        del session
        return _summarise(_events(path), warmup)


def _events(path: str) -> Iterator[dict]:
    """The profile's events one at a time: onnxruntime writes one JSON object per line, so a
    10k-op profile is never held in memory whole."""
    with open(path) as f:
        for line in f:
            line = line.strip().rstrip(",")
            if line in ("", "[", "]"):
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # not one event per line after all: read it whole
                f.seek(0)
                yield from json.load(f)
                return


def _summarise(events: Iterable[dict], warmup: int) -> KernelProfile:
    durations: dict[str, list[float]] = defaultdict(list)
    whole_runs: list[float] = []
    reorders: dict[str, int] = {}  # layout reorder kernel -> bytes it writes per run
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            whole_runs.append(event["dur"] * 1e-6)
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        name = name[: -len("_kernel_time")]
        durations[name].append(event["dur"] * 1e-6)
        args = event.get("args", {})
        if args.get("op_name", "").startswith("Reorder"):
            reorders[name] = int(args.get("output_size", 0))
    fastest = {name: min(d[warmup:] or d) for name, d in durations.items()}
    run = statistics.median(whole_runs[warmup:] or whole_runs) if whole_runs else 0.0
    scale = _wall_scale(run, sum(fastest.values()))
    kernels = {name: seconds * scale for name, seconds in fastest.items()}
    return KernelProfile(kernels, sum(kernels[name] for name in reorders),
                         sum(reorders.values()), run)


def _wall_scale(wall: float, summed: float) -> float:
    """wall / summed, the factor that makes per-kernel medians add up to a whole run's wall
    time (see KernelProfile); 1 when either is unknown."""
    return wall / summed if wall > 0 and summed > 0 else 1.0


def time_models(models: Sequence[bytes | bytearray | memoryview | str | Path],
                feeds: Mapping[str, np.ndarray] | None = None, runs: int = 10,
                warmup: int = 3, threads: int = 1, batch: int = 1,
                on_model: Callable[[], None] | None = None) -> ModelTimes:
    """Each model run alone, in order, on what the models before it produced (see above).

    Per model its fastest run; then all are scaled by the timed runs' total over the fastest
    runs' (x runs), for the reasons KernelProfile gives: the fastest run is a model's share,
    the total is what the runs really took (a quota's pauses land in a few runs only)."""
    values = dict(feeds or {})
    costs, io_rates = np.zeros(len(models)), []
    start, timed = time.perf_counter(), 0.0
    for k, model in enumerate(models):
        engine = load_engine(model, threads)
        missing = [spec for spec in engine.inputs if spec.name not in values]
        if missing:
            values.update(seeded_feeds(missing, batch))
        feed = {spec.name: values[spec.name] for spec in engine.inputs}
        names = [spec.name for spec in engine.outputs]
        run = partial(engine.run, names, feed)
        whole_run = min(time_calls(run, runs, warmup))
        if engine.format == "tflite":  # its invoke alone, the inputs set beforehand
            run()
            run = engine.interpreter.invoke  # type: ignore[attr-defined]
        invokes = time_calls(run, runs, 1)
        costs[k], timed = min(invokes), timed + sum(invokes)
        outputs = engine.run(names, feed)
        handed = sum(a.nbytes for a in feed.values()) + sum(np.asarray(a).nbytes
                                                            for a in outputs)
        if handed:
            io_rates.append(max(0.0, whole_run - costs[k]) / handed)
        values.update(zip(names, outputs))
        if on_model is not None:
            on_model()
    scale = _wall_scale(timed, runs * float(costs.sum()))
    times = ModelTimes(costs * scale, scale * float(np.median(io_rates)) if io_rates else 0.0)
    log.info("timed %d one-op models (%d runs each) in %.1f s: %.2f ms of invoke in all "
             "(fastest runs x %.2f), %.3f ns per byte handed in or out", len(models), runs,
             time.perf_counter() - start, 1e3 * times.seconds.sum(), scale,
             1e9 * times.io_seconds_per_byte)
    return times


def time_calls(call: Callable[[], object], runs: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each of `runs` calls of `call()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        tick = time.perf_counter()
        call()
        times.append(time.perf_counter() - tick)
    return times
