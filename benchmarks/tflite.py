"""TFLite figures. In the suite (`python -m benchmarks --only tflite`, `run`/`render`):
- chains: MobileNetV2's .tflite compiled into 3 stages and ResNet50's .h5 into 4 with
  --format tflite, served by real `defer serve` nodes; the worst difference from the whole
  .tflite under LiteRT over the samples (raw hops: 0.0 expected);
- the 2-node speed-up like the ONNX one (benchmarks/compute.py): ResNet50 .tflite (fp32 and
  int8) compiled into 2 stages, one LiteRT thread per node, one core each, against the whole
  .tflite on one core, measured alternately in each run;
- the trained digits CNN, float and int8 (calibrated on 100 real test digits), 2 stages in
  both formats: bundle bytes, stage times, bytes per hop, top-1 agreement with float;
- (not --quick) MobileNetV2's details below.

Alone (`python -m benchmarks.tflite [--models resnet50 mobilenetv2] [--rounds R]`), for each
example model converted to .tflite (fp32, fp16, int8: int8 calibrated on seeded uniform [0, 1)
samples, which is enough for speed and size, not accuracy):
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
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.common import (
    Context,
    busy_balance,
    chain_stats,
    fmt_spread,
    single_device,
    spread,
    table,
)
from defer.compiler.verify import median_seconds

MODES = ("fp32", "fp16", "int8")


def run(ctx: Context) -> dict:
    """The suite's TFLite scenario (see the module docstring)."""
    result = {"chains": {"mobilenetv2 .tflite, 3 stages": chain_fidelity(ctx, "mobilenetv2", 3),
                         "resnet50 .h5 --format tflite, 4 stages":
                             chain_fidelity(ctx, "resnet50", 4, from_keras=True)},
              "speedup": {mode: speedup(ctx, "resnet50", mode) for mode in ("fp32", "int8")},
              "digits": digits(ctx)}
    if not ctx.quick:
        result["mobilenetv2"] = measure("mobilenetv2", ctx.runs)
    return result


def chain_fidelity(ctx: Context, name: str, n_stages: int, from_keras: bool = False) -> dict:
    """Compile the example (its cached .tflite, or its .h5 through the converter) into
    `n_stages` TFLite stages, stream seeded samples through real nodes, compare with the whole
    .tflite under LiteRT."""
    from defer.compiler import compile_model, load_model
    from defer.engines import load_engine
    from defer.examples import example_model, example_tflite
    from defer.fidelity import worst
    from defer.local import LocalCluster
    from defer.runtime.dispatcher import Dispatcher
    from defer.tensors import random_inputs

    loaded = load_model(example_model(name) if from_keras else example_tflite(name),
                        format="tflite")
    manifest = compile_model(loaded, n_stages, ctx.work_dir / f"{name}-tflite-{n_stages}")
    samples = random_inputs(manifest.inputs, 8 if ctx.quick else 20, seed=1)
    whole = load_engine(loaded.model.data)
    names = [t.name for t in manifest.outputs]
    reference = [dict(zip(names, whole.run(names, sample))) for sample in samples]
    with LocalCluster(manifest) as cluster, \
            Dispatcher(manifest, cluster.addresses, timeout=120) as dispatcher:
        outputs = list(dispatcher.map(samples))
    fidelity = worst(list(zip(outputs, reference)))
    ctx.log(f"  {name}: {n_stages} TFLite stages on real nodes vs the whole .tflite: {fidelity}")
    return {"bounds": manifest.plan["bounds"], "samples": len(samples),
            "max_abs": fidelity.max_abs, "max_rel": fidelity.max_rel,
            "receives": [len(s.receives) for s in manifest.stages]}


def speedup(ctx: Context, name: str, mode: str) -> dict:
    """2 nodes (one core, one LiteRT thread each) against the whole .tflite on one core."""
    from defer.compiler import compile_model
    from defer.examples import example_tflite
    from defer.local import LocalCluster
    from defer.tensors import random_inputs

    path = example_tflite(name, None if mode == "fp32" else mode)
    manifest = compile_model(path, 2, ctx.work_dir / f"{name}-tflite-{mode}-n2")
    samples = random_inputs(manifest.inputs, ctx.count + 5, seed=0)
    whole = path.read_bytes()
    ratios, singles, chains, balances = [], [], [], []
    with LocalCluster(manifest) as cluster:
        for _ in range(ctx.runs):
            single = single_device(manifest, whole, samples[: ctx.count // 2 + 3])
            stats = chain_stats(manifest, cluster.addresses, samples)
            ratios.append(stats["throughput"] / single["throughput"])
            singles.append(single["throughput"])
            chains.append(stats["throughput"])
            balances.append(busy_balance(stats))
    ctx.log(f"  {name} {mode} tflite n=2: chain/single x{fmt_spread(spread(ratios))}")
    return {"bounds": manifest.plan["bounds"], "predicted_imbalance": manifest.plan["imbalance"],
            "single_per_s": spread(singles), "chain_per_s": spread(chains),
            "stage_balance": spread(balances), "speedup": spread(ratios)}


def digits(ctx: Context) -> dict:
    """The trained digits CNN, float and `--quantize int8 --calibration` (100 real test
    digits), in both formats, 2 stages: bundle bytes, each stage's median time run alone, bytes
    per hop and top-1 agreement of the int8 chain with the float chain on the test digits."""
    from defer.compiler import compile_model
    from defer.compiler.verify import measure_stages
    from defer.examples import digits_cnn
    from defer.fidelity import run_chain

    path, x_test, _ = digits_cnn(ctx.work_dir / "digits.h5")
    calibration = ctx.work_dir / "digits-calibration.npy"
    np.save(calibration, x_test[:100])
    result = {}
    for fmt in ("tflite", "onnx"):
        top1 = {}
        for mode in ("float", "int8"):
            manifest = compile_model(path, 2, ctx.work_dir / f"digits-{fmt}-{mode}", format=fmt,
                                     quantize=None if mode == "float" else mode,
                                     calibration=None if mode == "float" else calibration)
            top1[mode] = np.argmax(run_chain(manifest, {"input": x_test})["logits"], axis=-1)
            stages = measure_stages(manifest, {"input": x_test[:1]}, runs=200, warmup=20)
            result[f"{fmt} {mode}"] = {
                "bundle_bytes": [manifest.bundle_path(s.index).stat().st_size
                                 for s in manifest.stages],
                "stage_us": [round(1e6 * t, 1) for t in stages],
                "hop_bytes": manifest.stages[0].bytes_out,
                "hop_dtypes": [t.dtype for t in manifest.stages[0].outputs]}
        result[f"{fmt} int8"]["top1_agreement"] = float(np.mean(top1["int8"] == top1["float"]))
        result[f"{fmt} int8"]["samples"] = len(x_test)
    return result


def render(result: dict) -> str:
    rows = [[label, r["bounds"], r["receives"], r["samples"], f"{r['max_abs']:.3g}",
             f"{r['max_rel']:.3g}"] for label, r in result["chains"].items()]
    lines = ["TFLite chains of real nodes vs the whole .tflite (LiteRT, raw hops)",
             table(["model", "bounds", "tensors in", "samples", "max abs", "max rel"], rows), ""]
    rows = [[f"resnet50 {mode}", fmt_spread(r["single_per_s"], 1), fmt_spread(r["chain_per_s"], 1),
             fmt_spread(r["speedup"]), fmt_spread(r["stage_balance"], 3)]
            for mode, r in result["speedup"].items()]
    lines += ["TFLite 2-node speed-up (one core and one LiteRT thread per node; whole .tflite on "
              "one core)", table(["model", "single inf/s", "chain inf/s", "speed-up",
                                  "stage balance"], rows)]
    rows = [[label, sum(r["bundle_bytes"]), " + ".join(map(str, r["stage_us"])), r["hop_bytes"],
             ",".join(r["hop_dtypes"]), f"{r['top1_agreement']:.2%}" if "samples" in r else "-"]
            for label, r in result["digits"].items()]
    lines += ["", "digits CNN, 2 stages: float vs --quantize int8 (calibrated on 100 real test "
              "digits; agreement on the test digits)",
              table(["stages", "bundle bytes", "stage us", "hop bytes", "hop dtype",
                     "top-1 vs float"], rows)]
    if "mobilenetv2" in result:
        lines += ["", report({"mobilenetv2": result["mobilenetv2"]})]
    return "\n".join(lines)


# --- alone: exactness at every cut, cost accuracy, sizes and speeds ---------------------------


def _balanced(costs: np.ndarray, n_stages: int) -> list[int]:
    total = np.concatenate([[0.0], np.cumsum(costs)])
    inner = [int(np.searchsorted(total, total[-1] * i / n_stages)) for i in range(1, n_stages)]
    return sorted({0, *inner, len(costs)})


def _stages(info, bounds: list[int], feeds) -> list:
    """(engine, output names, feed) of each stage of `bounds`, fed by the stages before it."""
    from defer.compiler.tflite import stage_bundle
    from defer.engines.litert import LiteRTEngine

    values, stages = dict(feeds), []
    for a, b in zip(bounds[:-1], bounds[1:]):
        engine = LiteRTEngine(stage_bundle(info, a, b, 0)[0])
        names = [s.name for s in engine.outputs]
        feed = {s.name: values[s.name] for s in engine.inputs}
        values.update(zip(names, engine.run(names, feed)))
        stages.append((engine, names, feed))
    return stages, values


def exactness(graph, info, feeds) -> float:
    from defer.engines.litert import LiteRTEngine

    whole = LiteRTEngine(graph.data).run(graph.output_names, feeds)
    worst = 0.0
    for k in range(1, info.n_ops):
        _, values = _stages(info, [0, k, info.n_ops], feeds)
        worst = max(worst, *(float(np.max(np.abs(values[n].astype(np.float64) - w)))
                             for n, w in zip(graph.output_names, whole)))
    return worst


def cost_accuracy(graph, info, feeds, rounds: int) -> dict:
    """Predicted vs measured stage seconds for 2 and 4 stages (medians over `rounds`)."""
    from defer.compiler.tflite import estimate_costs, time_ops
    from defer.engines.litert import LiteRTEngine

    whole = LiteRTEngine(graph.data)
    timed_rounds, io_rounds, measured_rounds, whole_rounds = [], [], {}, []
    bounds = None
    for _ in range(rounds):
        times = time_ops(info, feeds)
        timed_rounds.append(times.seconds)
        io_rounds.append(times.io_seconds_per_byte)
        whole_rounds.append(median_seconds(partial(whole.run, graph.output_names, feeds)))
        if bounds is None:
            bounds = {n: _balanced(times.seconds, n) for n in (2, 4)}
        for n, cut in bounds.items():
            stages, _ = _stages(info, cut, feeds)
            measured_rounds.setdefault(n, []).append(
                [median_seconds(partial(e.run, names, feed)) for e, names, feed in stages])
    timed = np.median(timed_rounds, axis=0)
    io_rate = statistics.median(io_rounds)
    estimate = estimate_costs(info).node
    whole_seconds = statistics.median(whole_rounds)
    estimate = estimate / estimate.sum() * whole_seconds
    result = {"whole_ms": 1e3 * whole_seconds, "sum_of_ops_ms": 1e3 * timed.sum(),
              "io_ns_per_byte": 1e9 * io_rate}
    for n, cut in bounds.items():
        measured = np.median(measured_rounds[n], axis=0)
        pairs = list(zip(cut[:-1], cut[1:]))
        predicted = np.array([timed[a:b].sum() + io_rate * (info.crossing_bytes(a) +
                                                            info.crossing_bytes(b))
                              for a, b in pairs])
        estimated = np.array([estimate[a:b].sum() for a, b in pairs])
        result[f"{n}_stages"] = {
            "bounds": cut, "measured_ms": (1e3 * measured).round(3).tolist(),
            "timed_ms": (1e3 * predicted).round(3).tolist(),
            "timed_error": (predicted / measured - 1).round(3).tolist(),
            "estimate_error": (estimated / measured - 1).round(3).tolist()}
    return result


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
            ms = 1e3 * median_seconds(partial(engine.run, names, samples[0]))
            result[f"{fmt} {mode}"] = {"bytes": len(data), "ms": ms}
    return result


def measure(name: str, rounds: int) -> dict:
    from defer.compiler.tflite import analyse, read_tflite, stage_bundle, to_tflite
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
        info = analyse(graph, order="file")
        read = time.perf_counter() - start
        bounds = _balanced(np.ones(info.n_ops), 4)
        start = time.perf_counter()
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            stage_bundle(info, a, b, i)
        result[mode] = {"ops": info.n_ops, "read_s": read,
                        "slice_4_stages_s": time.perf_counter() - start,
                        "max_crossing": max(len(info.crossing(k)) for k in range(info.n_ops)),
                        "exact_max_abs": exactness(graph, info, samples[0]),
                        "costs": cost_accuracy(graph, info, samples[0], rounds)}
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
                  table(["mode", "ops", "max |chain - whole|", "read+analyse s", "slice 4 s",
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
