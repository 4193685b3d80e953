"""`python -m benchmarks [--quick] [--runs R] [--only NAME ...]`: every scenario, one command.

Prints each scenario's table as it finishes, then writes all figures as JSON (and PNG plots
when matplotlib is installed) to benchmarks/results/. Runs as root for the network scenario;
without root or `ip netns` that scenario says it was skipped. `testbed` needs writable cgroups
(the cpu controller) the same way; `hopcost` measures what a node spends beyond onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import (
    compute,
    gateway,
    hopcost,
    network,
    overhead,
    partition,
    testbed,
    tflite,
    trace,
)
from benchmarks.common import Context

SCENARIOS = ("compute", "partition", "overhead", "network", "gateway", "trace", "tflite",
             "hopcost", "testbed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and configurations (<3 min)")
    parser.add_argument("--runs", type=int, default=None, help="repeats per figure (default 3, quick 1)")
    parser.add_argument("--count", type=int, default=None, help="inferences per stream (default 200, quick 60)")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="defer-bench-") as tmp:
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=args.count or (60 if args.quick else 200),
                      log=lambda line: print(line, flush=True))
        args.out.mkdir(parents=True, exist_ok=True)
        results, tables = _run_all(ctx, args.only, args.out)
    elapsed = time.perf_counter() - started
    report = {"command": " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
              "quick": args.quick, "runs": ctx.runs, "count": ctx.count,
              "elapsed_s": elapsed, "machine": {"cpus": _cpus(), "python": platform.python_version()},
              "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + "\n\n".join(tables))
    print(f"\nall figures: {args.out / 'latest.json'}; took {elapsed:.0f} s")
    _plot(results, args.out)
    return 0


def _run_all(ctx: Context, only: list[str], out: Path) -> tuple[dict, list[str]]:
    from defer.compiler import compile_model, load_model
    from defer.compiler.load import sample_inputs
    from defer.examples import example_onnx

    results, tables = {}, []
    if set(only) - {"tflite"}:  # the ONNX scenarios share one load
        ctx.log("loading ResNet50 (built once, converted with tf2onnx)...")
        model_path = example_onnx("resnet50")
        loaded = load_model(model_path)
        samples = [sample_inputs(loaded.model, 1, seed=i) for i in range(ctx.count + 5)]
    if "compute" in only:
        ctx.log("scenario 1+5: compute-bound speed-up and energy")
        results["compute"] = compute.run(ctx, loaded, samples)
        tables.append(compute.render(results["compute"]))
    if "partition" in only:
        ctx.log("scenario 2: partition strategies")
        results["partition"] = partition.run(ctx, loaded, samples[0])
        tables.append(partition.render(results["partition"]))
    blind = None
    if "overhead" in only or "network" in only:
        blind = compile_model(loaded, 2, ctx.work_dir / "r50-blind", local_input=True)
    if "overhead" in only:
        ctx.log("scenario 3: overhead per hop and codec")
        results["overhead"] = overhead.run(ctx, blind, samples)
        tables.append(overhead.render(results["overhead"]))
    if "network" in only:
        ctx.log("scenario 4: network-limited (ip netns + tc tbf)")
        results["network"] = network.run(ctx, loaded, blind, samples)
        tables.append(network.render(results["network"]))
    if "gateway" in only:
        ctx.log("scenario 6: the gateway under load (16 clients, a chain killed, batching)")
        results["gateway"] = gateway.run(ctx, loaded)
        tables.append(gateway.render(results["gateway"]))
    if "trace" in only:
        ctx.log("scenario 7: tracing's cost, and a trace drawn")
        results["trace"] = trace.run(ctx, loaded, samples, png=out / "trace.png")
        tables.append(trace.render(results["trace"]))
    if "tflite" in only:
        ctx.log("scenario 8: TFLite chains and the 2-node speed-up under LiteRT")
        results["tflite"] = tflite.run(ctx)
        tables.append(tflite.render(results["tflite"]))
    if "hopcost" in only:
        ctx.log("scenario 9: CPU a node spends beyond onnxruntime (n=2, n=8)")
        results["hopcost"] = hopcost.run(ctx, loaded, samples, model_path)
        tables.append(hopcost.render(results["hopcost"]))
    if "testbed" in only:
        ctx.log("scenario 10: emulated edge testbed (cgroup-capped devices)")
        results["testbed"] = testbed.run(ctx, loaded, samples, model_path)
        tables.append(testbed.render(results["testbed"]))
    return results, tables


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots; pip install 'defer-edge[plot]')")
        return
    net = {k: v for k, v in results.get("network", {}).items() if isinstance(v, dict) and "runs" in v}
    if net:
        fig, axes = plt.subplots(1, len(net), figsize=(6 * len(net), 4), squeeze=False)
        for ax, (rate, entry) in zip(axes[0], net.items()):
            labels = [f"{r['plan']}\n{r['codec']}" for r in entry["runs"]]
            ax.bar(labels, [r["throughput"] for r in entry["runs"]])
            ax.set_title(f"ResNet50 n=2 over {rate}")
            ax.set_ylabel("inferences/s")
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "network.png", dpi=100)
    if "overhead" in results:
        fig, ax = plt.subplots(figsize=(7, 4))
        codecs = list(results["overhead"])
        ax.bar(codecs, [results["overhead"][c]["hops"][1]["bytes_per_inference"] / 1e6
                        for c in codecs])
        ax.set_ylabel("MB per inference, node 0 -> node 1")
        ax.set_title("ResNet50 n=2: bytes on the hop by codec")
        fig.tight_layout()
        fig.savefig(out / "codecs.png", dpi=100)
    if results.get("testbed") and "skipped" not in results["testbed"]:
        testbed.plot(results["testbed"], out / "testbed.png", plt)
    print(f"plots in {out}")


if __name__ == "__main__":
    sys.exit(main())
