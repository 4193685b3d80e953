"""TFLite figures: `python -m benchmarks.tflite [--models resnet50 mobilenetv2] [--rounds R]`.

For each example model converted to .tflite (fp32, fp16, int8: int8 calibrated on seeded
uniform [0, 1) samples, which is enough for speed and size, not accuracy):
- exactness: the largest difference between the chain of two slices and the whole .tflite,
  over every single cut (0.0 expected);
- speed of reading the model and of slicing it into 4 stages;
- cost accuracy: a stage's predicted time from one-op timing (`time_ops`: the ops' invoke
  seconds plus the I/O rate times the bytes crossing its two cuts) and from the FLOP estimate
  (scaled to the whole model's measured time), for a 2- and a 4-stage cut balanced on the
  timed costs, against each stage measured alone on real activations; the timing and the
  stage measurement alternate `rounds` times and their medians are compared;
- size and one-core time of the whole model in TFLite and ONNX (fp32, fp16, int8).
One LiteRT/onnxruntime thread, this process pinned to one core. Run it under
`flock /tmp/defer-heavy.lock` on a shared machine; it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table
from defer.compiler.tflite.costs import median_seconds

MODES = ("fp32", "fp16", "int8")


def _balanced(costs: np.ndarray, n_stages: int) -> list[int]:
    total = np.concatenate([[0.0], np.cumsum(costs)])
    inner = [int(np.searchsorted(total, total[-1] * i / n_stages)) for i in range(1, n_stages)]
    return sorted({0, *inner, len(costs)})


def exactness(graph, feeds) -> float:
    from defer.engines.litert import LiteRTEngine

    whole = LiteRTEngine(graph.data).run(graph.output_names, feeds)
    worst = 0.0
    for k in range(1, graph.n_ops):
        values = dict(feeds)
        for a, b in ((0, k), (k, graph.n_ops)):
            engine = LiteRTEngine(graph.slice(a, b))
            names = [s.name for s in engine.outputs]
            values.update(zip(names, engine.run(names, {s.name: values[s.name]
                                                        for s in engine.inputs})))
        worst = max(worst, *(float(np.max(np.abs(values[n].astype(np.float64) - w)))
                             for n, w in zip(graph.output_names, whole)))
    return worst


def cost_accuracy(graph, feeds, rounds: int) -> dict:
    """Predicted vs measured stage seconds for 2 and 4 stages (medians over `rounds`)."""
    from defer.engines.litert import LiteRTEngine

    whole = LiteRTEngine(graph.data)
    timed_rounds, io_rounds, measured_rounds, whole_rounds = [], [], {}, []
    bounds = None
    for _ in range(rounds):
        times = graph.time_ops(feeds)
        timed_rounds.append(times.seconds)
        io_rounds.append(times.io_seconds_per_byte)
        whole_rounds.append(median_seconds(whole, graph.output_names, feeds))
        if bounds is None:
            bounds = {n: _balanced(times.seconds, n) for n in (2, 4)}
        for n, cut in bounds.items():
            measured_rounds.setdefault(n, []).append(_stage_seconds(graph, cut, feeds))
    timed = np.median(timed_rounds, axis=0)
    io_rate = statistics.median(io_rounds)
    estimate = graph.estimate_costs()
    whole_seconds = statistics.median(whole_rounds)
    estimate = estimate / estimate.sum() * whole_seconds
    result = {"whole_ms": 1e3 * whole_seconds, "sum_of_ops_ms": 1e3 * timed.sum(),
              "io_ns_per_byte": 1e9 * io_rate}
    for n, cut in bounds.items():
        measured = np.median(measured_rounds[n], axis=0)
        pairs = list(zip(cut[:-1], cut[1:]))
        predicted = np.array([timed[a:b].sum() + io_rate * (graph.crossing_bytes(a) +
                                                            graph.crossing_bytes(b))
                              for a, b in pairs])
        estimated = np.array([estimate[a:b].sum() for a, b in pairs])
        result[f"{n}_stages"] = {
            "bounds": cut, "measured_ms": (1e3 * measured).round(3).tolist(),
            "timed_ms": (1e3 * predicted).round(3).tolist(),
            "timed_error": (predicted / measured - 1).round(3).tolist(),
            "estimate_error": (estimated / measured - 1).round(3).tolist()}
    return result


def _stage_seconds(graph, bounds: list[int], feeds) -> list[float]:
    from defer.engines.litert import LiteRTEngine

    values, seconds = dict(feeds), []
    for a, b in zip(bounds[:-1], bounds[1:]):
        engine = LiteRTEngine(graph.slice(a, b))
        names = [s.name for s in engine.outputs]
        feed = {s.name: values[s.name] for s in engine.inputs}
        seconds.append(median_seconds(engine, names, feed))
        values.update(zip(names, engine.run(names, feed)))
    return seconds


def formats(name: str, tflite: dict[str, bytes], samples) -> dict:
    """Size and one-core time of the whole model, TFLite and ONNX, per quantization."""
    import onnx

    from defer.compiler.quantize import quantize_onnx
    from defer.engines import load_engine
    from defer.examples import example_onnx

    floating = onnx.load(str(example_onnx(name)))
    onnx_models = {"fp32": floating, **{m: quantize_onnx(floating, m, samples)
                                        for m in ("fp16", "int8")}}
    result = {}
    for mode in MODES:
        for fmt, data in (("tflite", tflite[mode]), ("onnx", onnx_models[mode].SerializeToString())):
            engine = load_engine(data, format=fmt)
            names = [s.name for s in engine.outputs]
            result[f"{fmt} {mode}"] = {"bytes": len(data),
                                       "ms": 1e3 * median_seconds(engine, names, samples[0])}
    return result


def measure(name: str, rounds: int) -> dict:
    from defer.compiler.tflite import read_tflite, to_tflite
    from defer.examples import example_model
    from defer.tensors import TensorSpec

    path = example_model(name)
    rng = np.random.default_rng(0)
    spec = TensorSpec("input", "float32", (None, 224, 224, 3))
    samples = [{"input": rng.random(spec.concrete_shape(), dtype=np.float32)} for _ in range(8)]
    tflite = {m: to_tflite(path, None if m == "fp32" else m, samples) for m in MODES}
    result: dict = {"formats": formats(name, tflite, samples)}
    for mode in MODES:
        start = time.perf_counter()
        graph = read_tflite(tflite[mode])
        read = time.perf_counter() - start
        bounds = _balanced(np.ones(graph.n_ops), 4)
        start = time.perf_counter()
        for a, b in zip(bounds[:-1], bounds[1:]):
            graph.slice(a, b)
        result[mode] = {"ops": graph.n_ops, "read_s": read,
                        "slice_4_stages_s": time.perf_counter() - start,
                        "max_crossing": max(len(graph.crossing(k)) for k in range(graph.n_ops)),
                        "exact_max_abs": exactness(graph, samples[0]),
                        "costs": cost_accuracy(graph, samples[0], rounds)}
    return result


def report(results: dict) -> str:
    lines = []
    for name, r in results.items():
        rows = [[m, r[m]["ops"], r[m]["exact_max_abs"], f"{r[m]['read_s']:.2f}",
                 f"{r[m]['slice_4_stages_s']:.2f}", f"{r[m]['costs']['whole_ms']:.2f}",
                 " ".join(f"{e:+.0%}" for e in r[m]["costs"]["4_stages"]["timed_error"]),
                 " ".join(f"{e:+.0%}" for e in r[m]["costs"]["4_stages"]["estimate_error"])]
                for m in MODES]
        lines += [f"{name}: every single cut, slicing, 4-stage cost error (timed / estimate)",
                  table(["mode", "ops", "max |chain - whole|", "read s", "slice 4 s",
                         "whole ms", "timed err", "estimate err"], rows), ""]
        rows = [[k, f"{v['bytes'] / 1e6:.1f}", f"{v['ms']:.2f}"] for k, v in r["formats"].items()]
        lines += [f"{name}: whole model, one core", table(["format", "MB", "ms"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tflite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["mobilenetv2", "resnet50"])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of timing (3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tflite.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cores)})
    results = {name: measure(name, args.rounds) for name in args.models}
    print(report(results), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
