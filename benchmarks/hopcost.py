"""Scenario: the CPU a node spends beyond onnxruntime per inference (the hop's data path).

ResNet50 chains of n = 2 and 8 nodes on loopback (`LocalCluster`: one onnxruntime thread per
node, node i pinned to core i % cores), raw codec. For each node and inference:
- `cpu_ms`: the node process's CPU time (all threads), from its kernel CPU clock;
- `loop_ms`: its main thread's CPU time: the asyncio loop (sockets, framing, protocol);
- `ort_ms`: the same stage bundle timed alone in this process (thread CPU time, median);
- `overhead_ms` = cpu_ms - ort_ms: what the hop costs the node beyond onnxruntime.
Against the whole model in one process (pinned, one thread): the chain's CPU-seconds per
inference over the single process's. Then this machine's hop cost as a line (per request +
per byte received + per byte sent; defer/calibrate.py, what `defer compile` prices), from one
node running trivial bundles. Thread clocks are read from outside the nodes
(the process's CPU clock, /proc for the main thread), so nothing in the node is changed to measure it.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.common import Context, chain_stats, fmt_spread, single_device, spread, table
from defer.calibrate import process_cpu

__all__ = ["process_cpu", "render", "run", "run_manifest"]

SIZES = (2, 8)


def loop_cpu(pid: int) -> float:
    """CPU seconds of process `pid`'s main thread (clock ticks: 10 ms grain)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_ort_ms(manifest, sample: dict, runs: int = 15) -> list[float]:
    """Median onnxruntime CPU ms of each stage bundle run alone (one thread, this process)."""
    from defer.fidelity import run_chain, stage_engines

    engines = stage_engines(manifest)
    feeds: list[dict] = []
    run_chain(manifest, sample, engines, stage_feeds=feeds)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        result = []
        for stage, engine, feed in zip(manifest.stages, engines, feeds):
            names = [t.name for t in stage.outputs]
            times = []
            for i in range(runs + 3):
                start = time.thread_time()
                engine.run(names, feed)
                if i >= 3:
                    times.append(time.thread_time() - start)
            result.append(statistics.median(times) * 1e3)
        return result
    finally:
        os.sched_setaffinity(0, cores)


def measure(manifest, pids: list[int], addresses: list[str], samples: list[dict],
            ort_ms: list[float], codec: str | None = None) -> dict:
    """Per-node CPU split of one stream of `samples` through running nodes."""
    before = [(process_cpu(pid), loop_cpu(pid)) for pid in pids]
    dispatcher_before = time.process_time()
    stats = chain_stats(manifest, addresses, samples, codec=codec, warmup=0)
    dispatcher_cpu = time.process_time() - dispatcher_before
    after = [(process_cpu(pid), loop_cpu(pid)) for pid in pids]
    n = stats["requests"]
    nodes = []
    for b, a, ort in zip(before, after, ort_ms):
        total, loop = ((a[i] - b[i]) / n * 1e3 for i in (0, 1))
        nodes.append({"cpu_ms": total, "loop_ms": loop, "ort_ms": ort,
                      "overhead_ms": total - ort})
    return {"throughput": stats["throughput"], "requests": n, "nodes": nodes,
            "chain_cpu_ms": sum(x["cpu_ms"] for x in nodes),
            "dispatcher_cpu_ms": dispatcher_cpu / n * 1e3,
            "hop_bytes": [h["bytes_per_inference"] for h in stats["hops"]]}


def run(ctx: Context, loaded, samples: list[dict], model_path=None) -> dict:
    from defer.compiler import compile_model

    out: dict = {}
    for n in SIZES:
        manifest = compile_model(loaded, n, ctx.work_dir / f"r50-hop{n}")
        entry = out[f"n{n}"] = run_manifest(ctx, manifest, loaded.model, samples)
        ctx.log(f"  n={n}: node overhead {entry['mean_overhead_ms']['median']:.2f} ms/inf, "
                f"chain CPU / single x{entry['chain_over_single']['median']:.2f}, "
                f"throughput / single x{entry['speedup']['median']:.2f}")
        if n == len(os.sched_getaffinity(0)) and model_path is not None:
            entry["processes_over_single"] = spread(
                [whole_model_processes(model_path, n, ctx.count // 2) / r["single_throughput"]
                 for r in entry["runs"]])
            ctx.log(f"  {n} independent whole-model processes / single "
                    f"x{fmt_spread(entry['processes_over_single'])} (the limit)")
    out["fit"] = fit(ctx)
    ctx.log("  " + render_fit(out["fit"]).splitlines()[-1])
    return out


def run_manifest(ctx: Context, manifest, whole_model, samples: list[dict]) -> dict:
    """`ctx.runs` streams through a local cluster of `manifest`, single process alongside."""
    from defer.local import LocalCluster

    ort_ms = stage_ort_ms(manifest, samples[0])
    runs, ratios = [], []
    with LocalCluster(manifest) as cluster:
        pids = [node.process.pid for node in cluster.nodes]
        chain_stats(manifest, cluster.addresses, samples[:5], warmup=0)  # warm every node
        for _ in range(ctx.runs):
            single = single_device(manifest, whole_model, samples[: ctx.count // 2 + 3])
            result = measure(manifest, pids, cluster.addresses, samples[: ctx.count], ort_ms)
            result["single_cpu_ms"] = single["cpu_s_per_inference"] * 1e3
            result["single_throughput"] = single["throughput"]
            runs.append(result)
            ratios.append(result["chain_cpu_ms"] / result["single_cpu_ms"])
    return {"runs": runs, "ort_ms": ort_ms, "chain_over_single": spread(ratios),
            "speedup": spread([r["throughput"] / r["single_throughput"] for r in runs]),
            "mean_overhead_ms": spread([statistics.mean(x["overhead_ms"] for x in r["nodes"])
                                        for r in runs]),
            "mean_loop_ms": spread([statistics.mean(x["loop_ms"] for x in r["nodes"])
                                    for r in runs])}


def render(result: dict) -> str:
    rows = []
    for key, entry in result.items():
        if key == "fit":
            continue
        last = entry["runs"][-1]
        for i, node in enumerate(last["nodes"]):
            rows.append([key.replace("n", "n=") if i == 0 else "", i, f"{node['ort_ms']:.2f}",
                         f"{node['cpu_ms']:.2f}", f"{node['loop_ms']:.2f}",
                         f"{node['overhead_ms']:.2f}",
                         f"{last['hop_bytes'][i] / 1e6:.2f}"])
        rows.append(["", "all", "", f"{last['chain_cpu_ms']:.1f}", "",
                     f"mean {fmt_spread(entry['mean_overhead_ms'])}",
                     f"chain/single CPU x{fmt_spread(entry['chain_over_single'])}"])
        if "speedup" in entry:
            limit = entry.get("processes_over_single")
            rows.append(["", "", "", "", "", f"throughput/single x{fmt_spread(entry['speedup'])}",
                         f"independent processes x{fmt_spread(limit)}" if limit else ""])
    chains = table(["chain", "node", "ort ms (alone)", "CPU ms", "loop thread ms",
                    "beyond ort ms", "MB in"], rows)
    return chains + ("\n\n" + render_fit(result["fit"]) if "fit" in result else "")


def fit(ctx: Context) -> dict:
    """This machine's hop cost line, fitted as `defer compile` calibrates it."""
    from defer import calibrate

    fitted = calibrate.fit(ctx.work_dir / "hopfit", count=ctx.count)
    return {**fitted["hop"].to_dict(), "points": fitted["points"]}


def render_fit(result: dict) -> str:
    from defer.hop import HopCost

    rows = [[kind, f"{size / 1e6:.3f}", f"{cost * 1e3:.3f}"]
            for kind, points in result["points"].items() for size, cost in points]
    lines = table(["side", "MB per request", "node CPU ms beyond the op"], rows)
    return f"{lines}\nhop cost: {HopCost.from_dict(result, 'this machine').describe()}"


def whole_model_processes(model_path, n: int, count: int) -> float:
    """Inferences/s of `n` independent processes, each pinned to its own core running the
    whole model (plain data parallelism: what a chain on `n` cores could at best reach)."""
    import json
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))[:n]
    procs = [subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-m",
                               "benchmarks.testbed", "single", str(model_path), str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for core in cores]
    try:
        if any(p.stdout.readline().strip() != "ready" for p in procs):
            raise RuntimeError("a whole-model process did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return sum(json.loads(p.stdout.readline())["throughput"] for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)
