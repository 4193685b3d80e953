"""Scenario 4: network-limited chains. Each node is a host in its own network namespace with a
veth link shaped by `tc tbf` (benchmarks/netns.py); the dispatcher stays in the root namespace.

Only the hosts' egress is shaped: the hop between the two nodes crosses one limited link, while
the dispatcher's input link is left fast, as if the dispatcher sat beside node 0 (plans for this
are compiled with --local-input). For each rate: throughput and bytes per inference for each
codec on the bandwidth-blind plan; the bandwidth-aware plan (--bandwidth, the DESIGN cost model:
compute + transfer); and the bandwidth- and codec-aware plan (--bandwidth --overlap --codec
zfp:1e-3: it prices encoded bytes and codec time, and a link as a resource of its own).
"""

from __future__ import annotations

from benchmarks.common import Context, chain_stats, table
from benchmarks.netns import ShapedNetwork, available

CODECS = ("raw", "lz4", "zfp", "zfp:1e-3", "zfp+lz4")
LOSSY = "zfp:1e-3"


def run(ctx: Context, loaded, blind_manifest, samples: list[dict]) -> dict:
    ok, why = available()
    if not ok:
        ctx.log(f"  skipped: {why}")
        return {"skipped": why}
    from defer.compiler import compile_model

    rates = (20,) if ctx.quick else (100, 20)
    codecs = ("raw", LOSSY) if ctx.quick else CODECS
    seconds = 4.0 if ctx.quick else 8.0
    out: dict = {}
    for rate in rates:
        bandwidth = rate * 1e6 / 8
        plans = {
            "blind": (blind_manifest, codecs),
            "aware": (compile_model(loaded, 2, ctx.work_dir / f"r50-bw{rate}",
                                    bandwidth=bandwidth, local_input=True), ("raw",)),
            "aware+codec": (compile_model(loaded, 2, ctx.work_dir / f"r50-bwc{rate}",
                                          bandwidth=bandwidth, local_input=True, overlap=True,
                                          codec=LOSSY), (LOSSY,)),
        }
        entry: dict = {f"{name}_cuts": m.plan["bounds"] for name, (m, _) in plans.items()}
        entry["runs"] = []
        for plan_name, (manifest, plan_codecs) in plans.items():
            with ShapedNetwork(2, rate) as hosts, _Nodes(manifest, hosts) as addresses:
                for codec in plan_codecs:
                    stats = chain_stats(manifest, addresses, samples, codec=codec,
                                        warmup=2, seconds=seconds, timeout=120.0)
                    run_entry = {"plan": plan_name, "codec": codec,
                                 "throughput": stats["throughput"],
                                 "requests": stats["requests"],
                                 "hop_bytes_per_inference": stats["hops"][1]["bytes_per_inference"]}
                    entry["runs"].append(run_entry)
                    ctx.log(f"  {rate} Mbit/s {plan_name} {codec}: {stats['throughput']:.2f} inf/s,"
                            f" {run_entry['hop_bytes_per_inference'] / 1e3:.0f} kB/inf")
        base = _find(entry, "blind", "raw")["throughput"]
        best = max(entry["runs"], key=lambda r: r["throughput"])
        entry["best"] = {**best, "over_blind_raw": best["throughput"] / base}
        out[f"{rate}mbit"] = entry
    return out


def _find(entry: dict, plan: str, codec: str) -> dict:
    return next(r for r in entry["runs"] if r["plan"] == plan and r["codec"] == codec)


class _Nodes:
    """Node i serving stage i inside host i, bound to the host's address."""

    def __init__(self, manifest, hosts):
        self.manifest, self.hosts, self.nodes = manifest, hosts, []

    def __enter__(self) -> list[str]:
        from defer.local import start_node, stop_processes

        try:
            for stage, host in zip(self.manifest.stages, self.hosts):
                self.nodes.append(start_node(self.manifest.bundle_path(stage.index),
                                             host=host.address, cpu=stage.index % 2,
                                             command_prefix=tuple(host.command([]))))
        except BaseException:
            stop_processes(self.nodes)
            raise
        return [n.address for n in self.nodes]

    def __exit__(self, *exc) -> None:
        from defer.local import stop_processes

        stop_processes(self.nodes)


def render(result: dict) -> str:
    if "skipped" in result:
        return f"network-limited: skipped ({result['skipped']})"
    rows = []
    for rate, entry in result.items():
        for r in entry["runs"]:
            cuts = entry[f"{r['plan']}_cuts"][1:-1]
            rows.append([rate, f"{r['plan']} {cuts}", r["codec"], f"{r['throughput']:.2f}",
                         f"{r['hop_bytes_per_inference'] / 1e3:.0f}"])
        best = entry["best"]
        rows.append([rate, f"best: {best['plan']} + {best['codec']}", "",
                     f"x{best['over_blind_raw']:.2f} vs blind raw", ""])
    return table(["link", "plan [cut]", "codec", "inf/s", "kB/inf on the hop"], rows)
