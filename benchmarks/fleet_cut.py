"""Scenario: does the plan move the cut when `defer profile` measures a slow link? (issue 12)

Two hosts, each a network namespace (benchmarks/netns.py) with one empty `defer serve` node,
first unshaped, then with every host's egress shaped by `tc tbf` to `rate` Mbit/s (node -> node
and node -> dispatcher are limited; dispatcher -> node is not). On each network `defer profile`
measures ResNet50 on both nodes and every link, and `defer compile --cluster` plans two stages
on what it measured (and, without -n, picks the device count). The figures: the links as
profiled, each plan's cut (op index, bytes on the wire), its predicted throughput, and both
two-stage plans measured on the shaped network, alternating, median of `runs`: the plan made
for the slow link should be the faster one there.

    python -m benchmarks.fleet_cut [--quick] [--runs R] [--rate 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Context, chain_stats, fmt_spread, spread, table, write_result
from benchmarks.fleet import TOKEN, _start_in
from benchmarks.netns import ShapedNetwork, available

PREFIX = "dfct"  # namespace names of this scenario only


def _profile(ctx: Context, model: Path, rate_mbit: float | None, name: str):
    """(cluster.json path, Cluster) of two empty nodes on a network shaped to `rate_mbit`."""
    from defer.fleet.profile import ProfileOptions, profile_fleet
    from defer.local import stop_processes

    with ShapedNetwork(2, rate_mbit, PREFIX) as hosts:
        nodes = _start_in(hosts)
        try:
            cluster = profile_fleet(model, ProfileOptions(
                nodes=tuple(n.address for n in nodes), token=TOKEN, sequential=True,
                runs=3 if ctx.quick else 5, warmup=1))
        finally:
            stop_processes(nodes)
    path = ctx.work_dir / f"cluster-{name}.json"
    cluster.save(path)
    return path, cluster


def _plan(ctx: Context, loaded, cluster_path: Path, cluster, name: str) -> dict:
    from defer.compiler import compile_model

    two = compile_model(loaded, 2, ctx.work_dir / f"plan-{name}", cluster=str(cluster_path))
    chosen = compile_model(loaded, None, ctx.work_dir / f"best-{name}",
                           cluster=str(cluster_path))
    node_links = [link.bandwidth * 8 / 1e6 for link in cluster.links
                  if "dispatcher" not in (link.source, link.target)]
    return {"manifest": two, "cut": two.plan["bounds"][1], "n_ops": two.plan["bounds"][-1],
            "cut_bytes": two.stages[0].bytes_out, "predicted": two.plan["throughput"],
            "best_n": len(chosen.stages), "best_predicted": chosen.plan["throughput"],
            "node_link_mbit": statistics.median(node_links)}


def run(ctx: Context, rate_mbit: float = 20.0) -> dict:
    ok, why = available()
    if not ok:
        return {"skipped": why}
    from defer.compiler import load_model
    from defer.examples import example_onnx
    from defer.local import stop_processes
    from defer.tensors import random_inputs

    model = example_onnx("resnet50")
    loaded = load_model(model)
    plans = {}
    for name, rate in (("unshaped", None), ("shaped", rate_mbit)):
        ctx.log(f"  profile + plan on the {name} network")
        plans[name] = _plan(ctx, loaded, *_profile(ctx, model, rate, name), name)
    samples = random_inputs(plans["shaped"]["manifest"].inputs, 8, seed=0) * 50
    rates: dict[str, list[float]] = {name: [] for name in plans}
    with ShapedNetwork(2, rate_mbit, PREFIX) as hosts:
        for _ in range(ctx.runs):
            for name, plan in plans.items():
                manifest = plan["manifest"]
                nodes = _start_in(hosts, [manifest.bundle_path(i) for i in range(2)], None)
                try:
                    stats = chain_stats(manifest, [n.address for n in nodes], samples,
                                        seconds=8.0 if ctx.quick else 15.0, timeout=120.0)
                finally:
                    stop_processes(nodes)
                rates[name].append(stats["throughput"])
    for name, plan in plans.items():
        plan.pop("manifest")
        plan["measured_on_shaped"] = spread(rates[name])
        ctx.log(f"  {name} plan: cut at op {plan['cut']} ({plan['cut_bytes']} B), predicted "
                f"{plan['predicted']:.2f} inf/s; on {rate_mbit:g} Mbit/s "
                f"{fmt_spread(plan['measured_on_shaped'])}")
    shaped, unshaped = plans["shaped"], plans["unshaped"]
    return {"rate_mbit": rate_mbit, "plans": plans,
            "cut_moved": shaped["cut"] != unshaped["cut"],
            "shaped_plan_gain": (shaped["measured_on_shaped"]["median"]
                                 / unshaped["measured_on_shaped"]["median"])}


def render(result: dict) -> str:
    if "skipped" in result:
        return f"fleet_cut: skipped ({result['skipped']})"
    rows = [[f"profiled on the {name} network", f"{p['node_link_mbit']:.1f}",
             f"{p['cut']} of {p['n_ops']}", p["cut_bytes"], f"{p['predicted']:.2f}",
             fmt_spread(p["measured_on_shaped"]), f"{p['best_n']} ({p['best_predicted']:.2f})"]
            for name, p in result["plans"].items()]
    return (table(["2-stage plan", "node links Mbit/s", "cut at op", "bytes on the cut",
                   "predicted inf/s", f"measured at {result['rate_mbit']:g} Mbit/s",
                   "best n (predicted)"], rows)
            + f"\ncut moved: {'yes' if result['cut_moved'] else 'NO'}; on the shaped network "
              f"the plan made for it is x{result['shaped_plan_gain']:.2f} the other")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_cut", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="streams per plan (3; quick 1)")
    parser.add_argument("--rate", type=float, default=20.0, help="shaped egress, Mbit/s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet_cut.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="defer-fleet-cut-") as tmp:
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=400, log=lambda line: print(line, flush=True))
        result = run(ctx, args.rate)
    result["command"] = " ".join(["python -m benchmarks.fleet_cut", *(argv or sys.argv[1:])])
    return write_result(args.out, result, render(result))


if __name__ == "__main__":
    sys.exit(main())
