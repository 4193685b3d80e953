"""Scenario 1 (compute-bound speed-up) and 5 (energy estimate) on ResNet50, loopback links.

One device = one process pinned to one core with one onnxruntime thread. The n=2 chain pins one
node per core. Single device and chain are measured alternately in each run, so the ratio of
one run is taken under the same machine load. For n=4 and n=8 (more nodes than the 2 cores)
the figure is the stage balance (busiest node's onnxruntime time / mean), not a speed-up.
Energy is an estimate: CPU-seconds per inference x an assumed power per busy core.
"""

from __future__ import annotations

from benchmarks.common import (
    Context,
    busy_balance,
    chain_stats,
    fmt_spread,
    single_device,
    spread,
    table,
)


def run(ctx: Context, loaded, samples: list[dict]) -> dict:
    from defer.compiler import compile_model
    from defer.local import LocalCluster
    from defer.runtime.report import DEFAULT_WATTS_PER_CORE

    result: dict = {"watts_per_core_assumed": DEFAULT_WATTS_PER_CORE}
    sizes = (2, 4) if ctx.quick else (2, 4, 8)
    manifests = {n: compile_model(loaded, n, ctx.work_dir / f"r50-n{n}") for n in sizes}
    speedups, singles, chains = [], [], []
    for n in sizes:
        ratios, balances, cpu_per_node = [], [], []
        with LocalCluster(manifests[n]) as cluster:
            for _ in range(ctx.runs):
                single = single_device(manifests[n], loaded.model, samples[: ctx.count // 2 + 3])
                stats = chain_stats(manifests[n], cluster.addresses, samples)
                ratios.append(stats["throughput"] / single["throughput"])
                balances.append(busy_balance(stats))
                cpu_per_node.append([s["cpu_s_per_inference"] for s in stats["stages"]])
                if n == 2:
                    singles.append(single)
                    chains.append(stats)
        entry = {"stage_balance": spread(balances),
                 "cpu_s_per_inference_per_node": cpu_per_node[-1],
                 "throughput_over_single": spread(ratios)}
        result[f"n{n}"] = entry
        ctx.log(f"  n={n}: chain/single x{fmt_spread(spread(ratios))}, "
                f"balance x{fmt_spread(spread(balances), 3)}")
        if n == 2:
            speedups = ratios
    single_cpu = [s["cpu_s_per_inference"] for s in singles]
    result["speedup_n2"] = spread(speedups)
    result["single_device"] = {"throughput": spread([s["throughput"] for s in singles]),
                               "cpu_s_per_inference": spread(single_cpu)}
    result["energy"] = _energy(result, spread(single_cpu)["median"], sizes)
    return result


def _energy(result: dict, single_cpu: float, sizes) -> dict:
    out = {"single_device_cpu_s_per_inference": single_cpu,
           "note": "estimate: CPU-seconds x an assumed power per busy core, not a measurement"}
    for n in sizes:
        per_node = result[f"n{n}"]["cpu_s_per_inference_per_node"]
        mean = sum(per_node) / len(per_node)
        out[f"n{n}"] = {"mean_node_cpu_s_per_inference": mean,
                        "per_node_vs_single": mean / single_cpu,
                        "chain_total_vs_single": sum(per_node) / single_cpu}
    return out


def render(result: dict) -> str:
    rows = []
    for key in ("n2", "n4", "n8"):
        if key not in result:
            continue
        entry, energy = result[key], result["energy"][key]
        rows.append([key.replace("n", "n="), fmt_spread(entry["throughput_over_single"]),
                     fmt_spread(entry["stage_balance"], 3),
                     f"{energy['per_node_vs_single']:.2f}", f"{energy['chain_total_vs_single']:.2f}"])
    return table(["ResNet50 chain", "throughput / single device",
                  "busiest/mean node", "CPU-s per node / single", "CPU-s all nodes / single"],
                 rows)
