"""Scenario: an emulated edge testbed. N `defer serve` devices, each in its own cgroup capped to
a fraction of a core (benchmarks/cgroups.py), optionally each in its own network namespace with
a shaped link (benchmarks/netns.py), against one device with the same cap running the whole
model in plain onnxruntime. Devices and links are emulated together, as DEFER's paper did
with CORE, so a fleet can be tried before it is bought:

    from benchmarks.testbed import Fleet
    with Fleet(manifest, cores=0.2, link_mbit=100) as addresses:
        Dispatcher(manifest, addresses) ...        # every device capped, links shaped

Each figure is the median over `runs` of the speed-up measured in one run (single device and
chain alternate, so both see the same machine load), printed beside the plan's prediction:
total op compute / the slowest predicted stage (`manifest.plan`), each stage priced with this
machine's hop cost (defer/calibrate.py) at the quota's speed; the prediction with hops free
(the plan made without it) is shown too. The dispatcher runs uncapped
in this process. Cgroups and namespaces are removed on every exit path (SIGTERM included).
Without writable cgroups the scenario says why in one line and is skipped.

`python -m benchmarks.testbed [MODEL.onnx] --devices 8 --cores 0.2 [--link 100]` tries one
fleet of your choosing (as root): the table below for it, and its JSON.

`python -m benchmarks.testbed single MODEL COUNT` is the single device's own process: it loads
MODEL, prints `ready`, then for each line on stdin times COUNT inferences and prints a JSON line.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cgroups
from benchmarks.common import Context, chain_stats, fmt_spread, spread, table
from defer.calibrate import machine_hop_cost

SCENARIOS = ((8, 0.2, None), (4, 0.4, None))  # devices, cores per device, link Mbit/s
LINKED = ((8, 0.2, 1000),)  # added to full runs when network namespaces are available
DEFER_PAPER = (8, 1.53)  # DEFER (Parthasarathy & Krishnamachari 2022): 8 devices, x1.53


@dataclass
class Scenario:
    devices: int
    cores: float
    link_mbit: float | None = None

    @property
    def label(self) -> str:
        link = f"{self.link_mbit:g} Mbit/s" if self.link_mbit else "loopback"
        return f"{self.devices} x {self.cores:g} core, {link}"


def predicted_speedup(plan: dict, single_speed: float | None = None) -> float:
    """The plan's promise: all op compute on one device of `single_speed` (default: the plan's
    first device) / the plan's slowest predicted stage."""
    total = sum(plan["speeds"]) * plan["ideal"]  # op compute at speed 1
    return total / (single_speed or plan["speeds"][0]) / plan["bottleneck"]


class Fleet:
    """Node i serves `bundles[i]` (a path, or None: an empty node waiting for a push) in its
    own cgroup capped to `cores` (one share for all, or one per node), and in its own network
    namespace with its egress shaped to `link_mbit` if given. `bundles` may be a manifest: its
    stages in order.

    A context manager yielding the node addresses; nodes start uncapped (so loading a bundle
    is not slowed down) and are capped once all are ready.
    """

    def __init__(self, bundles, cores: float | Sequence[float], link_mbit: float | None = None,
                 period_us: int | None = None, timeout: float = 60.0):
        if hasattr(bundles, "stages"):
            bundles = [bundles.bundle_path(stage.index) for stage in bundles.stages]
        self.bundles = list(bundles)
        self.cores = ([float(cores)] * len(self.bundles) if isinstance(cores, int | float)
                      else list(cores))
        self.link_mbit, self.period_us, self.timeout = link_mbit, period_us, timeout
        self.devices: list[cgroups.Device] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> list[str]:
        from defer.local import start_node, stop_processes

        n = len(self.bundles)
        try:
            self.devices = self._stack.enter_context(
                cgroups.CpuCaps([f"device{i}" for i in range(n)]))
            hosts = [None] * n
            if self.link_mbit:
                from benchmarks.netns import ShapedNetwork

                hosts = self._stack.enter_context(ShapedNetwork(n, self.link_mbit, "dtb"))
            nodes: list = []
            self._stack.callback(stop_processes, nodes)  # runs before the groups go
            for bundle, device, host in zip(self.bundles, self.devices, hosts):
                # the cgroup first: `ip netns exec` remounts /sys, hiding /sys/fs/cgroup
                prefix = device.command() + (host.command([]) if host else [])
                nodes.append(start_node(bundle, host=host.address if host else "127.0.0.1",
                                        command_prefix=tuple(prefix), timeout=self.timeout))
            for device, cores in zip(self.devices, self.cores):
                device.cap(cores, self.period_us)
        except BaseException:
            self._stack.close()
            raise
        return [node.address for node in nodes]

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class SingleDevice:
    """The whole model in plain onnxruntime (one thread), in a cgroup with the same cap."""

    def __init__(self, model: Path, cores: float, count: int, period_us: int | None = None):
        self.model, self.cores, self.count, self.period_us = model, cores, count, period_us
        self._stack = contextlib.ExitStack()
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> SingleDevice:
        try:
            (device,) = self._stack.enter_context(cgroups.CpuCaps(["single"]))
            self._process = subprocess.Popen(
                device.command([sys.executable, "-m", "benchmarks.testbed", "single",
                                str(self.model), str(self.count)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self._stack.callback(self._stop)
            if self._process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the single device could not load {self.model}")
            device.cap(self.cores, self.period_us)
        except BaseException:
            self._stack.close()
            raise
        return self

    def measure(self) -> dict:
        """Throughput and CPU per inference over `count` inferences."""
        self._process.stdin.write("go\n")
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the single device exited")
        return json.loads(line)

    def _stop(self) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def run(ctx: Context, loaded, samples: list[dict], model_path: Path) -> dict:
    ok, why = cgroups.available()
    if not ok:
        ctx.log(f"  skipped: {why}")
        return {"skipped": why}
    scenarios = [Scenario(*s) for s in SCENARIOS]
    if not ctx.quick:
        from benchmarks import netns

        linked, why_not = netns.available()
        if linked:
            scenarios += [Scenario(*s) for s in LINKED]
        else:
            ctx.log(f"  no shaped links: {why_not}")
    with _terminate_as_exit():
        return {s.label: _run_scenario(ctx, s, loaded, samples, model_path) for s in scenarios}


def _run_scenario(ctx: Context, scenario: Scenario, loaded, samples: list[dict],
                  model_path: Path) -> dict:
    from defer.compiler import compile_model

    # Devices at `cores` of a core run ops 1/cores times slower; links keep their speed. The
    # nodes receive the next request while computing, hence `overlap`.
    extra = {"bandwidth": scenario.link_mbit * 1e6 / 8, "local_input": True, "overlap": True} \
        if scenario.link_mbit else {}
    # This machine's hop cost (defer/calibrate.py, measured once), divided by the quota like
    # the ops; the plan without it is made too, to show what pricing the hop changes.
    where = ctx.work_dir / f"testbed-{scenario.devices}-{scenario.link_mbit}"
    speeds = [scenario.cores] * scenario.devices
    manifest = compile_model(loaded, scenario.devices, where, speeds=speeds,
                             hop_cost=machine_hop_cost(), **extra)
    unpriced = compile_model(loaded, scenario.devices, where.with_name(where.name + "-ops"),
                             speeds=speeds, hop_cost=None, **extra)
    single_count = max(8, ctx.count // 10)
    ratios, runs = [], []
    with SingleDevice(model_path, scenario.cores, single_count) as single, \
            Fleet(manifest, scenario.cores, scenario.link_mbit) as addresses:
        for _ in range(ctx.runs):
            alone = single.measure()
            stats = chain_stats(manifest, addresses, samples[: ctx.count], timeout=120.0)
            chain_cpu = sum(s["cpu_s_per_inference"] for s in stats["stages"])
            runs.append({"single": alone, "chain_throughput": stats["throughput"],
                         "chain_cpu_s_per_inference": chain_cpu,
                         "stage_cpu_ms": [s["cpu_s_per_inference"] * 1e3
                                          for s in stats["stages"]],
                         # share of its cap each device used: 1.0 = busy all the time
                         "cap_used": [s["cpu_s_per_inference"] * stats["throughput"]
                                      / scenario.cores for s in stats["stages"]],
                         "hop_bytes": [h["bytes_per_inference"] for h in stats["hops"]]})
            ratios.append(stats["throughput"] / alone["throughput"])
    predicted = predicted_speedup(manifest.plan)
    ops_only = predicted_speedup(unpriced.plan)
    measured = spread(ratios)
    ctx.log(f"  {scenario.label}: x{fmt_spread(measured)} measured, x{predicted:.2f} predicted "
            f"(x{ops_only:.2f} with hops free)")
    return {"devices": scenario.devices, "cores": scenario.cores,
            "link_mbit": scenario.link_mbit, "speedup": measured, "predicted": predicted,
            "predicted_hops_free": ops_only, "hop_cost": manifest.plan.get("hop_cost"),
            "cuts_hops_free": unpriced.plan["bounds"][1:-1],
            "predicted_throughput": manifest.plan["throughput"],
            "of_predicted": measured["median"] / predicted,
            "single_throughput": statistics.median(r["single"]["throughput"] for r in runs),
            "chain_throughput": statistics.median(r["chain_throughput"] for r in runs),
            "cpu_vs_single": statistics.median(
                r["chain_cpu_s_per_inference"] / r["single"]["cpu_s_per_inference"]
                for r in runs),
            "cuts": manifest.plan["bounds"][1:-1], "runs": runs}


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM unwinds like Ctrl-C, so every `with` removes its groups and namespaces."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def render(result: dict) -> str:
    if "skipped" in result:
        return f"testbed: skipped ({result['skipped']})"
    rows = []
    for r in result.values():
        link = f"{r['link_mbit']:g} Mbit/s" if r["link_mbit"] else "loopback"
        rows.append([r["devices"], f"{r['cores']:g}", link, f"{r['single_throughput']:.2f}",
                     f"{r['chain_throughput']:.2f}", f"{r.get('predicted_throughput', 0):.2f}",
                     f"x{fmt_spread(r['speedup'])}",
                     f"x{r['predicted']:.2f}", f"{r['of_predicted']:.0%}",
                     f"x{r['predicted_hops_free']:.2f}" if "predicted_hops_free" in r else "",
                     f"x{r['cpu_vs_single']:.2f}"])
    return table(["devices", "core each", "link", "single inf/s", "chain inf/s",
                  "predicted inf/s", "speed-up",
                  "predicted", "of predicted", "hops free", "CPU/inf vs single"], rows)


def plot(result: dict, path: Path, plt) -> None:
    """Speed-up against device count: measured (median, min..max) and predicted, the ideal
    line, and DEFER's 8-device point."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = max(r["devices"] for r in result.values())
    ax.plot([1, top], [1, top], "k:", label="ideal (x devices)")
    for i, r in enumerate(result.values()):
        link = f", {r['link_mbit']:g} Mbit/s" if r["link_mbit"] else ""
        s, color = r["speedup"], f"C{i}"
        ax.errorbar([r["devices"]], [s["median"]], fmt="o", capsize=4, color=color,
                    yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                    label=f"measured, {r['cores']:g} core each{link}")
        ax.plot([r["devices"]], [r["predicted"]], "x", markersize=9, color=color,
                label=f"predicted (hops priced), {r['cores']:g} core each{link}")
    ax.plot([DEFER_PAPER[0]], [DEFER_PAPER[1]], "s", color="grey", label="DEFER paper (x1.53)")
    ax.set_xlabel("devices")
    ax.set_ylabel("throughput / one device with the same cap")
    ax.set_title("ResNet50 on CPU-capped emulated devices")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _single_main(model: str, count: int) -> None:
    """The single device's process: load, say ready, time `count` inferences per request."""
    from defer.engines import load_engine
    from defer.tensors import random_inputs

    engine = load_engine(Path(model), 1)
    names = [o.name for o in engine.outputs]
    inputs = random_inputs(engine.inputs, count, 0)
    for sample in inputs[:2]:
        engine.run(names, sample)
    print("ready", flush=True)
    for _ in sys.stdin:
        cpu, start = time.process_time(), time.perf_counter()
        for sample in inputs:
            engine.run(names, sample)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(json.dumps({"throughput": count / wall, "cpu_s_per_inference": cpu / count}),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    """One fleet of your choosing: devices x quota (x link), single device beside it."""
    import argparse
    import logging
    import tempfile

    from benchmarks.common import write_result

    parser = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None,
                        help="an .onnx model (default: the example ResNet50)")
    parser.add_argument("--devices", type=int, default=8, help="devices in the chain (8)")
    parser.add_argument("--cores", type=float, default=0.2,
                        help="share of one core each device gets (0.2)")
    parser.add_argument("--link", type=float, default=None, metavar="MBIT",
                        help="shape each device's link to this many Mbit/s (root, ip netns)")
    parser.add_argument("--runs", type=int, default=3, help="repeats; the median is shown (3)")
    parser.add_argument("--count", type=int, default=100, help="inferences per run (100)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/testbed.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ok, why = cgroups.available()
    if not ok:
        print(f"testbed: skipped ({why})")
        return 0
    from defer.compiler import load_model
    from defer.compiler.load import sample_inputs
    from defer.examples import example_onnx

    model_path = args.model or example_onnx("resnet50")
    loaded = load_model(model_path)
    samples = [sample_inputs(loaded.model, 1, seed=i) for i in range(args.count + 5)]
    scenario = Scenario(args.devices, args.cores, args.link)
    with tempfile.TemporaryDirectory(prefix="defer-testbed-") as tmp, _terminate_as_exit():
        ctx = Context(quick=False, runs=args.runs, work_dir=Path(tmp), count=args.count,
                      log=lambda line: print(line, flush=True))
        result = {scenario.label: _run_scenario(ctx, scenario, loaded, samples, model_path)}
    return write_result(args.out, result, render(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["single"]:
        _single_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
