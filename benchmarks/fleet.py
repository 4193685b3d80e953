"""Scenario: `defer profile` and `defer doctor` on emulated fleets (issues 12 and 14).

- links: hosts in network namespaces whose egress is shaped by tc tbf to 20 Mbit/s
  (benchmarks/netns.py); `profile` must report 17-21 Mbit/s for every shaped link (node ->
  node, node -> dispatcher), while dispatcher -> node is not shaped.
- doctor: three hosts, only host 1's egress shaped to 1 Mbit/s, a 3-stage plan compiled for
  100 Mbit/s links: `doctor` must name exactly the slow link (host 1 -> host 2) and still let
  the chain start (exit 0; a warning, not an error).
- accuracy: each stage's time measured on its node (onnxruntime ms per inference, from STATS)
  against that node's own profile's prediction, priced as the planner prices it (the stage's
  op costs + the cost of cutting there, `costs_from_profile` on cluster.json's profile).
  ResNet50, one node per core on loopback. The median absolute error is the figure.
- capped: the same on 4 nodes capped to 0.6 / 0.3 / 0.2 / 0.1 of a core (cgroups, issue 9's
  benchmarks/testbed.py), each stage measured alone on its node, flat out (see `capped`).

    python -m benchmarks.fleet [--quick] [--only links doctor accuracy capped] [--out DIR]

Prints a table per scenario and writes benchmarks/results/fleet.json. The namespace scenarios
need root and `ip netns`, and say so in one line when they are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.common import Context, table
from benchmarks.netns import ShapedNetwork, available

TOKEN = "fleet-benchmark"
PREFIX = "dflt"  # namespace names: not the network scenario's, so the two never collide
SCENARIOS = ("links", "doctor", "accuracy", "capped")


def tiny_model(path: Path, width: int = 256) -> Path:
    """A 4-op MLP (MatMul + Relu twice), seeded: enough to profile and to chain."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) * 0.05).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = "y" if i == 2 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"h{i}"], [prev], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "tiny_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _start_in(hosts, bundles=None, token: str | None = TOKEN) -> list:
    """One node per host, inside its namespace, bound to its address (a bundle each, or none)."""
    from defer.local import start_node, stop_processes

    nodes = []
    try:
        for i, host in enumerate(hosts):
            nodes.append(start_node(bundles[i] if bundles else None, host=host.address,
                                    token=token, command_prefix=tuple(host.command([]))))
    except BaseException:
        stop_processes(nodes)
        raise
    return nodes


# --- links: does profile measure a tbf-shaped link right? ------------------------------------

def links(ctx: Context, rate_mbit: float = 20.0, hosts: int = 2) -> dict:
    ok, why = available()
    if not ok:
        return {"skipped": why}
    from defer.fleet.profile import ProfileOptions, profile_fleet
    from defer.local import stop_processes

    model = tiny_model(ctx.work_dir / "tiny.onnx")
    runs = []
    with ShapedNetwork(hosts, rate_mbit, PREFIX) as shaped:
        nodes = _start_in(shaped)
        try:
            for _ in range(ctx.runs):
                cluster = profile_fleet(model, ProfileOptions(
                    nodes=tuple(n.address for n in nodes), token=TOKEN, sequential=True,
                    runs=3))
                runs.append([{"from": link.source, "to": link.target,
                              "mbit": link.bandwidth * 8 / 1e6, "rtt_ms": link.rtt * 1e3,
                              "shaped": link.source != "dispatcher"} for link in cluster.links])
        finally:
            stop_processes(nodes)
    shaped_mbit = [link["mbit"] for run in runs for link in run if link["shaped"]]
    result = {"rate_mbit": rate_mbit, "runs": runs, "shaped_min": min(shaped_mbit),
              "shaped_max": max(shaped_mbit), "shaped_median": statistics.median(shaped_mbit),
              "within_17_21": all(17 <= m <= 21 for m in shaped_mbit)}
    ctx.log(f"  links: shaped {rate_mbit:g} Mbit/s measured {result['shaped_min']:.1f}.."
            f"{result['shaped_max']:.1f} Mbit/s over {len(shaped_mbit)} links")
    return result


def render_links(result: dict) -> str:
    if "skipped" in result:
        return f"profile links: skipped ({result['skipped']})"
    rows = [[f"{link['from']} -> {link['to']}", "yes" if link["shaped"] else "no",
             f"{link['mbit']:.1f}", f"{link['rtt_ms']:.2f}"] for link in result["runs"][-1]]
    rows.append(["shaped links, all runs", f"{result['rate_mbit']:g} Mbit/s tbf",
                 f"{result['shaped_min']:.1f}..{result['shaped_max']:.1f}",
                 "17-21: " + ("yes" if result["within_17_21"] else "NO")])
    return table(["link (defer profile)", "shaped", "Mbit/s", "RTT ms"], rows)


# --- doctor: does it name the one slow link? --------------------------------------------------

def doctor(ctx: Context, slow_mbit: float = 1.0, plan_mbit: float = 100.0) -> dict:
    ok, why = available()
    if not ok:
        return {"skipped": why}
    from defer.compiler import compile_model
    from defer.fleet.doctor import DoctorOptions, check_chain
    from defer.local import stop_processes

    manifest = compile_model(tiny_model(ctx.work_dir / "tiny.onnx"), 3,
                             ctx.work_dir / "doctor-chain", profile=False,
                             bandwidth=plan_mbit * 1e6 / 8)
    with ShapedNetwork(3, None, PREFIX) as hosts:
        slow = hosts[1]
        subprocess.run(slow.command(["tc", "qdisc", "add", "dev", f"{slow.name}h", "root", "tbf",
                                     "rate", f"{slow_mbit:g}mbit", "burst", "64kb", "latency",
                                     "200ms"]), check=True, capture_output=True)
        nodes = _start_in(hosts, [manifest.bundle_path(i) for i in range(3)])
        try:
            started = time.perf_counter()
            report = check_chain(manifest, [n.address for n in nodes],
                                 DoctorOptions(token=TOKEN))
            took = time.perf_counter() - started
        finally:
            stop_processes(nodes)
    slow_link = f"{nodes[1].address} -> {nodes[2].address}"
    named = [f.where for f in report.problems]
    result = {"slow_link": slow_link, "problems": [vars(f) for f in report.problems],
              "findings": [vars(f) for f in report.findings], "can_start": report.can_start,
              "seconds": took, "names_only_the_slow_link": named == [slow_link]}
    ctx.log(f"  doctor: problems named {named}; slow link {slow_link}; can start "
            f"{report.can_start}; {took:.1f} s")
    return result


def render_doctor(result: dict) -> str:
    if "skipped" in result:
        return f"doctor: skipped ({result['skipped']})"
    rows = [[f["where"], f["check"], f["status"], f["detail"][:90]]
            for f in result["findings"] if f["check"] == "link"]
    rows.append([f"slow: {result['slow_link']}", "", "named alone: " +
                 ("yes" if result["names_only_the_slow_link"] else "NO"),
                 f"chain can start: {result['can_start']}, {result['seconds']:.1f} s"])
    return table(["link (defer doctor)", "check", "status", "detail"], rows)


# --- accuracy: does a node's own profile predict its stage? ------------------------------------

def predicted_stage_ms(node, info, bounds: list[int]) -> list[float]:
    """Each stage's predicted ms on `node` (a cluster NodeProfile), as the planner prices it."""
    from defer.compiler.profile import Profile, costs_from_profile
    from defer.engines.profiling import KernelProfile

    measured = Profile(*(KernelProfile.from_dict(node.extra["profile"][level])
                         for level in ("basic", "all")))
    costs = costs_from_profile(info, measured)
    return [1e3 * (costs.node[a:b].sum() + costs.enter[a] + costs.leave[b])
            for a, b in zip(bounds[:-1], bounds[1:])]


def accuracy(ctx: Context, n_stages: int = 2) -> dict:
    from benchmarks.common import chain_stats
    from defer.compiler import analyse, compile_model, load_model
    from defer.examples import example_onnx
    from defer.fleet.profile import ProfileOptions, profile_fleet
    from defer.local import start_node, stop_processes
    from defer.tensors import random_inputs

    path = example_onnx("resnet50")
    manifest = compile_model(path, n_stages, ctx.work_dir / "accuracy", profile=False)
    info = analyse(load_model(path).model, order=manifest.plan["op_order"])
    bounds = manifest.plan["bounds"]
    samples = random_inputs(manifest.inputs, 4, seed=0)
    runs = []
    with ExitStack() as stack:
        nodes = [start_node(manifest.bundle_path(i), cpu=i % 2) for i in range(n_stages)]
        stack.callback(stop_processes, nodes)
        addresses = [n.address for n in nodes]
        for _ in range(ctx.runs):
            cluster = profile_fleet(path, ProfileOptions(nodes=tuple(addresses),
                                                         sequential=True, links=False))
            stats = chain_stats(manifest, addresses, (samples * ctx.count)[:ctx.count],
                                warmup=5)
            for i, node in enumerate(cluster.nodes):
                predicted = predicted_stage_ms(node, info, bounds)[i]
                measured = stats["stages"][i]["ort_ms_per_inference"]
                runs.append({"stage": i, "node": node.address, "predicted_ms": predicted,
                             "measured_ms": measured,
                             "error": abs(predicted - measured) / measured})
    errors = [r["error"] for r in runs]
    result = {"model": "resnet50", "n_stages": n_stages, "bounds": bounds, "runs": runs,
              "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    ctx.log(f"  accuracy: median |error| {result['median_abs_error']:.1%}, max "
            f"{result['max_abs_error']:.1%} over {len(errors)} stage runs")
    return result


def capped(ctx: Context, quotas: tuple[float, ...] = (0.6, 0.3, 0.2, 0.1)) -> dict:
    """Each node capped to its share of a core (benchmarks/testbed.py); its stage's measured
    time against its own profile's prediction. A stage is measured alone on its node, flat out
    (a one-stage chain of that node, fed seeded inputs of what the stage receives): in the
    4-node chain every stage but the slowest idles between requests, and an idle cgroup starts
    each request with a fresh quota, so its time there is its CPU time, not its capped speed
    (shown beside, for the record)."""
    try:
        from benchmarks import cgroups
        from benchmarks.testbed import Fleet
    except ImportError:
        return {"skipped": "benchmarks/testbed.py (issue 9) is not on this branch yet"}
    ok, why = cgroups.available()
    if not ok:
        return {"skipped": why}
    from benchmarks.common import chain_stats
    from defer.compiler import analyse, compile_model, load_model
    from defer.examples import example_onnx
    from defer.fleet.profile import ProfileOptions, profile_fleet
    from defer.tensors import random_inputs

    path = example_onnx("resnet50")
    manifest = compile_model(path, len(quotas), ctx.work_dir / "capped", profile=False)
    info = analyse(load_model(path).model, order=manifest.plan["op_order"])
    bounds, runs = manifest.plan["bounds"], []
    count = max(16, (2 * ctx.count) // 5)  # CFS periods are 100 ms: average over many
    with ExitStack() as stack:
        addresses = stack.enter_context(Fleet(manifest, quotas))
        for _ in range(ctx.runs):
            cluster = profile_fleet(path, ProfileOptions(
                nodes=tuple(addresses), sequential=True, links=False, timeout=3600))
            chain = chain_stats(manifest, addresses, random_inputs(manifest.inputs, count),
                                warmup=3, timeout=600)
            for i, (node, quota) in enumerate(zip(cluster.nodes, quotas)):
                alone = _stage_alone(manifest, i, addresses[i], count)
                predicted = predicted_stage_ms(node, info, bounds)[i]
                runs.append({"stage": i, "node": node.address, "quota": quota,
                             "predicted_ms": predicted, "measured_ms": alone,
                             "in_chain_ms": chain["stages"][i]["ort_ms_per_inference"],
                             "error": abs(predicted - alone) / alone})
    errors = [r["error"] for r in runs]
    result = {"model": "resnet50", "quotas": list(quotas), "bounds": bounds, "runs": runs,
              "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    ctx.log(f"  capped: median |error| {result['median_abs_error']:.1%}, max "
            f"{result['max_abs_error']:.1%} over {len(errors)} stage runs")
    return result


def _stage_alone(manifest, index: int, address: str, count: int, warmup: int = 3) -> float:
    """Onnxruntime ms per inference of stage `index` on its node, as a one-stage chain."""
    import dataclasses

    from defer.manifest import Manifest
    from defer.runtime.dispatcher import Dispatcher
    from defer.tensors import random_inputs

    stage = manifest.stages[index]
    received = {t.name: t for t in [*stage.inputs, *stage.forward]}
    specs = [received[name] for name in stage.receives]
    alone = Manifest(model={"name": f"stage{index}", "inputs": [t.to_dict() for t in specs],
                            "outputs": [t.to_dict() for t in [*stage.outputs, *stage.forward]]},
                     plan={"batch": manifest.plan.get("batch", 1)},
                     stages=[dataclasses.replace(stage, index=0)], codec="raw",
                     path=manifest.path)
    samples = random_inputs(specs, warmup + count, seed=index)
    with Dispatcher(alone, [address], timeout=600) as dispatcher:
        list(dispatcher.map(samples[:warmup]))
        dispatcher.reset_stats()
        list(dispatcher.map(samples[warmup:]))
        return dispatcher.stats()["stages"][0]["ort_ms_per_inference"]


def render_capped(result: dict) -> str:
    if "skipped" in result:
        return f"capped nodes: skipped ({result['skipped']})"
    rows = [[r["stage"], f"{r['quota']:g}", f"{r['predicted_ms']:.1f}", f"{r['measured_ms']:.1f}",
             f"{r['error']:.1%}", f"{r['in_chain_ms']:.1f}"] for r in result["runs"]]
    rows.append(["", "median |error|", "", "", f"{result['median_abs_error']:.1%}", ""])
    return table(["stage", "core", "predicted ms (own profile)", "measured ms (flat out)",
                  "|error|", "in the chain ms"], rows)


def render_accuracy(result: dict) -> str:
    rows = [[r["stage"], r["node"], f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}",
             f"{r['error']:.1%}"] for r in result["runs"]]
    rows.append(["", "median |error|", "", "", f"{result['median_abs_error']:.1%}"])
    return table(["stage", "node (own profile)", "predicted ms", "measured ms", "|error|"],
                 rows)


RUNNERS = {"links": (links, render_links), "doctor": (doctor, render_doctor),
           "accuracy": (accuracy, render_accuracy), "capped": (capped, render_capped)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run each, fewer inferences")
    parser.add_argument("--runs", type=int, default=None, help="repeats (default 3, quick 1)")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results, tables = {}, []
    with tempfile.TemporaryDirectory(prefix="defer-fleet-") as tmp:
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=40 if args.quick else 100,
                      log=lambda line: print(line, flush=True))
        for name in args.only:
            run, render = RUNNERS[name]
            print(f"{name}...", flush=True)
            results[name] = run(ctx)
            tables.append(render(results[name]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(
        {"command": " ".join(["python -m benchmarks.fleet", *(argv or [])]), "runs": ctx.runs,
         "results": results}, indent=2, default=str) + "\n")
    print("\n" + "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
