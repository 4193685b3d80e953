"""Scenario 2: partition strategies on ResNet50 at n=8 — balanced, equal layers and the DEFER
paper's hand cuts (after every second residual block: the 3rd, 5th, ..., 15th residual Add).

Predicted: slowest stage / ideal from the profiled plan. Measured: each bundle run alone in one
onnxruntime session with one thread on this process's core; slowest / mean of the stages.
"""

from __future__ import annotations

import os

from benchmarks.common import Context, fmt_spread, spread, table

DEFER_HAND_CUTS = [f"Add#{k}" for k in range(3, 16, 2)]


def run(ctx: Context, loaded, feeds) -> dict:
    from defer.compiler import compile_model
    from defer.compiler.verify import measure_stages

    os.sched_setaffinity(0, {0})
    plans = {
        "balanced": dict(strategy="balanced"),
        "layers": dict(strategy="layers"),
        "defer-hand-cuts": dict(cuts=DEFER_HAND_CUTS),
    }
    out = {}
    for name, options in plans.items():
        n = None if "cuts" in options else 8
        manifest = compile_model(loaded, n, ctx.work_dir / f"r50-{name}", **options)
        measured = []
        for _ in range(ctx.runs):
            stages = measure_stages(manifest, feeds, runs=5 if ctx.quick else 20)
            measured.append(max(stages) / (sum(stages) / len(stages)))
        out[name] = {
            "predicted_bottleneck_over_ideal": manifest.plan["imbalance"],
            "measured_slowest_over_mean": spread(measured),
            "bounds": manifest.plan["bounds"],
        }
        ctx.log(f"  {name}: predicted x{manifest.plan['imbalance']:.3f}, "
                f"measured x{fmt_spread(spread(measured), 3)}")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


def render(result: dict) -> str:
    rows = [[name, f"{r['predicted_bottleneck_over_ideal']:.3f}",
             fmt_spread(r["measured_slowest_over_mean"], 3)] for name, r in result.items()]
    return table(["ResNet50 n=8 strategy", "predicted slowest/ideal",
                  "measured slowest/mean (spread)"], rows)
