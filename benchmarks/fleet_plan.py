"""Scenario: planning for a mixed fleet (issue 12). ResNet50 on devices capped to fractions of a
core (cgroups: benchmarks/cgroups.py), each stage's node started in its device's group:

1. plans: *profile* (`compile --cluster`: every device costed on itself, stages placed),
   *blind* (`compile -n 4`, stage i on device i) and *speeds* (`--speeds` = the quotas, by
   hand). Measured throughput (median of runs) beside two predictions: the plan's own
   (manifest) and the fleet model's (fleet.py: that plan's cuts and order on the devices).
2. a fifth device at 0.05 core: what `defer plan` says, what `compile --cluster` without -n
   picks, and the measured chains of 4 and of 5.
3. codecs on 100 Mbit/s links (each node in its own network namespace, egress shaped with
   tbf): raw, lz4, zfp:1e-3, q8, q8+lz4 on the raw plan, and on the plan made for each codec.

cluster.json comes from `defer profile` against the same capped nodes, empty: each node's op
costs and CPU per hop (defer/fleet/hop_probe.py), every link.

    python -m benchmarks.fleet_plan [--quick] [--runs R] [--only plans|fifth|codecs ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Context, chain_stats, fmt_spread, spread, table, write_result
from benchmarks.testbed import Fleet

QUOTAS = (0.6, 0.3, 0.2, 0.1)
FIFTH = 0.05
CODECS = ("raw", "lz4", "zfp:1e-3", "q8", "q8+lz4")
SHAPED_MBIT = 100
# A window deep enough that a device throttled for the rest of its CFS period (100 ms) does not
# starve the others: with the default (8 for 4 stages) capped chains lost 10-15% to that.
INFLIGHT = 24


class Predictor:
    """The fleet model's throughput for a compiled plan: its cuts, stage i on its device
    (profiles and codec measurements made once per op order and codec)."""

    def __init__(self, loaded, cluster):
        self.loaded, self.cluster = loaded, cluster
        self._costs: dict = {}
        self._wire: dict = {}

    def __call__(self, manifest, codec: str | None = None) -> float:
        from defer.compiler.fleet import build_fleet
        from defer.compiler.graph import analyse
        from defer.compiler.partition import evaluate
        from defer.compiler.profile import costs_from_profile, profile
        from defer.compiler.wire import measure_wire

        codec, order = codec or manifest.codec, manifest.plan["op_order"]
        if order not in self._costs:
            info = analyse(self.loaded.model, order=order)
            self._costs[order] = (info, costs_from_profile(info, profile(info)))
        info, costs = self._costs[order]
        if (order, codec) not in self._wire:
            self._wire[order, codec] = measure_wire(info, codec) if codec != "raw" else None
        fleet = build_fleet(info, self.cluster, costs, self._wire[order, codec], codec=codec,
                            local_input=manifest.plan.get("local_input", False))
        devices = [fleet.names.index(d) for d in _devices(manifest, self.cluster)]
        plan = evaluate(fleet.problem(devices), manifest.plan["bounds"])
        return manifest.plan.get("batch", 1) / plan.bottleneck


def _devices(manifest, cluster) -> list[str]:
    """The device of each stage: the plan's placement, else stage i on cluster node i."""
    return manifest.devices or [n.address for n in cluster.nodes][: len(manifest.stages)]


def measure(ctx: Context, manifest, cluster, quota_of: dict[str, float], samples, codec=None,
            shaped_mbit: float | None = None) -> dict:
    """Median throughput over ctx.runs streams through freshly capped nodes."""
    cores = [quota_of[d] for d in _devices(manifest, cluster)]
    rates, used, cpu_ms = [], [], []
    bundles = [manifest.bundle_path(stage.index) for stage in manifest.stages]
    with Fleet(bundles, cores, shaped_mbit, timeout=180) as addresses:
        for _ in range(ctx.runs):
            stats = chain_stats(manifest, addresses, samples, codec=codec, warmup=2 * INFLIGHT,
                                seconds=8.0 if ctx.quick else 25.0, timeout=300.0,
                                inflight=INFLIGHT)
            rates.append(stats["throughput"])
            cpu = [s["cpu_s_per_inference"] for s in stats["stages"]]
            cpu_ms.append([c * 1e3 for c in cpu])
            # the share of its cap each device used: 1.0 = busy all the time
            used.append([c * stats["throughput"] / q for c, q in zip(cpu, cores)])
    return {"cores": cores, "throughput": spread(rates), "cap_used": used,
            "stage_cpu_ms": cpu_ms}


def run_plans(ctx: Context, loaded, cluster_path: Path, cluster, quota_of, samples) -> dict:
    from defer.compiler import compile_model

    predict = Predictor(loaded, cluster)
    plans = {
        "profile": compile_model(loaded, 4, ctx.work_dir / "profile", cluster=str(cluster_path)),
        "blind": compile_model(loaded, 4, ctx.work_dir / "blind"),
        "speeds": compile_model(loaded, 4, ctx.work_dir / "speeds", speeds=QUOTAS),
    }
    out = {}
    for name, manifest in plans.items():
        result = measure(ctx, manifest, cluster, quota_of, samples)
        result.update(own=manifest.plan["throughput"],
                      fleet=predict(manifest),
                      devices=_devices(manifest, cluster), bounds=manifest.plan["bounds"])
        ctx.log(f"  {name}: {fmt_spread(result['throughput'])} inf/s measured; predicted "
                f"{result['fleet']:.2f} (fleet model), {result['own']:.2f} (its own plan)")
        out[name] = result
    blind = out["blind"]["throughput"]["median"]
    out["profile_over_blind"] = out["profile"]["throughput"]["median"] / blind
    out["profile_of_prediction"] = out["profile"]["throughput"]["median"] / out["profile"]["fleet"]
    return out


def run_fifth(ctx: Context, loaded, cluster_path: Path, cluster, quota_of, samples) -> dict:
    from click.testing import CliRunner

    from defer.cli import main
    from defer.compiler import compile_model
    from defer.examples import example_onnx

    predict = Predictor(loaded, cluster)
    said = CliRunner().invoke(main, ["plan", str(example_onnx("resnet50")), "--cluster",
                                     str(cluster_path),
                                     "--codecs", "raw", "--png", "",
                                     "--json", str(ctx.work_dir / "fifth.json")])
    if said.exit_code != 0:
        raise RuntimeError(f"defer plan failed: {said.output}")
    report = json.loads((ctx.work_dir / "fifth.json").read_text())
    chosen = compile_model(loaded, None, ctx.work_dir / "fifth", cluster=str(cluster_path))
    other = compile_model(loaded, 9 - len(chosen.stages) if len(chosen.stages) in (4, 5) else 5,
                          ctx.work_dir / "other", cluster=str(cluster_path))
    out = {"plan_advice": report["advice"], "plan_best_n": report["best"]["n"],
           "predicted": {r["n"]: r["throughput"] for r in report["tables"]["raw"]},
           "compiled_n": len(chosen.stages), "other_n": len(other.stages),
           "plan_output": said.output}
    for name, manifest in (("chosen", chosen), ("other", other)):
        out[name] = measure(ctx, manifest, cluster, quota_of, samples)
        out[name]["fleet"] = predict(manifest)
        ctx.log(f"  {name} ({len(manifest.stages)} devices): "
                f"{fmt_spread(out[name]['throughput'])} inf/s, predicted {out[name]['fleet']:.2f}")
    return out


def run_codecs(ctx: Context, loaded, cluster_path: Path, cluster, quota_of, samples) -> dict:
    from defer.compiler import compile_model

    predict, runs = Predictor(loaded, cluster), []
    raw_plan = compile_model(loaded, 4, ctx.work_dir / "net-raw", cluster=str(cluster_path))
    codecs = ("raw", "q8") if ctx.quick else CODECS
    for codec in codecs:
        own = raw_plan if codec == "raw" else compile_model(
            loaded, 4, ctx.work_dir / f"net-{codec}", cluster=str(cluster_path), codec=codec)
        plans = [("raw plan", raw_plan)] + ([(f"{codec} plan", own)] if codec != "raw" else [])
        for plan_name, manifest in plans:
            result = measure(ctx, manifest, cluster, quota_of, samples, codec=codec,
                             shaped_mbit=SHAPED_MBIT)
            result.update(codec=codec, plan=plan_name, bounds=manifest.plan["bounds"],
                          devices=_devices(manifest, cluster),
                          fleet=predict(manifest, codec))
            ctx.log(f"  {codec} on the {plan_name}: {fmt_spread(result['throughput'])} inf/s, "
                    f"predicted {result['fleet']:.2f}")
            runs.append(result)
    return {"link_mbit": SHAPED_MBIT, "runs": runs}


def render(results: dict) -> str:
    parts = ["cluster.json: `defer profile` against the capped nodes"]
    if "plans" in results:
        p = results["plans"]
        rows = [[name, " > ".join(f"{c:g}" for c in p[name]["cores"]), str(p[name]["bounds"]),
                 fmt_spread(p[name]["throughput"]), f"{p[name]['fleet']:.2f}",
                 f"{p[name]['own']:.2f}"] for name in ("profile", "blind", "speeds")]
        parts.append(table(["plan", "cores by stage", "bounds", "measured inf/s",
                            "predicted (fleet)", "predicted (own plan)"], rows))
        parts.append(f"profile / blind x{p['profile_over_blind']:.2f}; profile measured / "
                     f"predicted {p['profile_of_prediction']:.0%}")
    if "fifth" in results:
        f = results["fifth"]
        parts.append(f["plan_output"].rstrip())
        parts.append(f"fifth device at {FIFTH} core: plan's best n = {f['plan_best_n']}, "
                     f"compile without -n chose {f['compiled_n']}; predicted by n "
                     + ", ".join(f"{n}: {t:.2f}" for n, t in f["predicted"].items())
                     + f"; measured chosen ({f['compiled_n']}) "
                       f"{fmt_spread(f['chosen']['throughput'])}, other ({f['other_n']}) "
                       f"{fmt_spread(f['other']['throughput'])}\n  plan says: "
                     + "; ".join(f["plan_advice"]))
    if "codecs" in results:
        rows = [[r["codec"], r["plan"], str(r["bounds"]), fmt_spread(r["throughput"]),
                 f"{r['fleet']:.2f}"] for r in results["codecs"]["runs"]]
        parts.append(f"codecs, {results['codecs']['link_mbit']} Mbit/s links:\n" + table(
            ["codec", "plan", "bounds", "measured inf/s", "predicted (fleet)"], rows))
    return "\n".join(parts)


def _cluster(ctx: Context, quotas, shaped_mbit: float | None = None):
    """(path, Cluster, {device address: quota}) for these quotas: `defer profile` against
    empty nodes so capped (op costs, each node's CPU per hop, links)."""
    from defer.examples import example_onnx
    from defer.fleet.profile import ProfileOptions, profile_fleet

    path = ctx.work_dir / f"cluster-{len(quotas)}-{shaped_mbit or 'lo'}.json"
    with Fleet([None] * len(quotas), quotas, shaped_mbit, timeout=180) as addresses:
        cluster = profile_fleet(example_onnx("resnet50"), ProfileOptions(
            nodes=tuple(addresses), sequential=True))
    cluster.save(path)
    return path, cluster, dict(zip(addresses, quotas))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="streams per figure (3; quick 1)")
    parser.add_argument("--only", nargs="*", choices=("plans", "fifth", "codecs"),
                        default=["plans", "fifth", "codecs"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet_plan.json"))
    args = parser.parse_args(argv)
    from benchmarks import cgroups
    from defer.compiler.load import load_model, sample_inputs
    from defer.examples import example_onnx

    ok, why = cgroups.available()
    if not ok:
        print(f"fleet_plan: skipped ({why})")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="defer-fleet-") as tmp:
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=400, log=lambda line: print(line, flush=True))
        loaded = load_model(example_onnx("resnet50"))
        samples = [sample_inputs(loaded.model, 1, seed=i) for i in range(8)] * 50
        results: dict = {}
        steps = {"plans": (run_plans, QUOTAS, None), "fifth": (run_fifth, (*QUOTAS, FIFTH), None),
                 "codecs": (run_codecs, QUOTAS, SHAPED_MBIT)}
        for name in args.only:
            step, quotas, shaped = steps[name]
            ctx.log(f"fleet_plan: {name} on {' / '.join(f'{q:g}' for q in quotas)} core")
            path, cluster, quota_of = _cluster(ctx, quotas, shaped)
            results[name] = step(ctx, loaded, path, cluster, quota_of, samples)
            results[name]["hop_cost"] = {n.address: n.extra.get("hop_cost")
                                         for n in cluster.nodes}
    results["elapsed_s"] = time.perf_counter() - started
    results["command"] = " ".join(["python -m benchmarks.fleet_plan", *(argv or sys.argv[1:])])
    return write_result(args.out, results, render(results) + f"\ntook {results['elapsed_s']:.0f} s, "
                        f"median of {ctx.runs} run(s) each (a shared machine is noisy)")


if __name__ == "__main__":
    sys.exit(main())
