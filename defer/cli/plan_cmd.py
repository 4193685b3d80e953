"""`defer plan`: the what-if planner over a measured fleet, a shell over defer.compiler.whatif."""

from __future__ import annotations

import json
from pathlib import Path

import click

from defer import progress
from defer.codecs import CODEC_HELP, parse_codec
from defer.compiler.order import ORDERS
from defer.units import format_bytes, parse_bandwidth, parse_size

DEFAULT_CODECS = "raw,lz4,zfp:1e-3,q8,q8+lz4"


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--cluster", "cluster_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="cluster.json written by `defer profile` (per-node op costs, memory, links).")
@click.option("--codec", default="raw", show_default=True,
              help=f"Codec of the main table, on every hop ({CODEC_HELP}).")
@click.option("--codecs", "compare", default=DEFAULT_CODECS, show_default=True,
              metavar="C1,C2,...", help="Codecs to compare (each planned on every hop).")
@click.option("--memory", default=None, metavar="SIZE",
              help="Cap each device's memory further, e.g. 512MB.  [default: what cluster.json "
                   "measured free]")
@click.option("--bandwidth", default=None, metavar="RATE",
              help="Price links cluster.json did not measure at this rate, e.g. 100Mbit.  "
                   "[default: such links are not used]")
@click.option("--latency", type=float, default=0.0, show_default=True,
              help="One-way latency in ms of the links priced by --bandwidth.")
@click.option("--local-input", is_flag=True,
              help="The model input does not cross the dispatcher's link (it sits beside the "
                   "first device).")
@click.option("--overlap", is_flag=True,
              help="Price a stage as max(compute, transfer): nodes receive while they compute.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size to plan for.")
@click.option("--profile/--no-profile", "use_profile", default=True, show_default=True,
              help="Time this machine's cut and codec costs with onnxruntime, or estimate them.")
@click.option("--order", type=click.Choice(ORDERS), default="auto", show_default=True,
              help="Op order to cut along (see `defer compile --help`).")
@click.option("--png", "png_path", default="plan.png", show_default=True, metavar="FILE",
              help="Draw throughput against device count here (needs matplotlib); '' for none.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every figure as JSON here.  [default: none]")
def plan_command(model: Path, cluster_path: Path, codec: str, compare: str, memory, bandwidth,
                 latency: float, batch: int, png_path: str, json_path: Path | None,
                 **fields) -> None:
    """For k = 1..N devices of CLUSTER: the best chain's predicted throughput and latency, its
    bottleneck (a stage on a device, or a link), the gain of each extra device, the same per
    codec, what to do next, and whether whole chains side by side (`defer gateway`) beat one.
    """
    from defer.cluster import load_cluster
    from defer.compiler.load import load_model
    from defer.compiler.whatif import plan_fleet
    from defer.errors import UsageError

    codec = parse_codec(codec).spec  # every option checked before the slow load
    codecs = tuple(dict.fromkeys(parse_codec(c).spec for c in compare.split(",") if c.strip()))
    memory = parse_size(memory) if memory else None
    bandwidth = parse_bandwidth(bandwidth) if bandwidth else None
    if batch < 1 or latency < 0:
        raise UsageError("--batch must be 1 or more and --latency 0 or more")
    cluster = load_cluster(cluster_path)
    with progress.reporting(progress.TerminalReporter(prefix="plan: ")):
        loaded = load_model(model)
        result = plan_fleet(loaded, cluster, codec=codec, codecs=codecs, memory=memory,
                            bandwidth=bandwidth, latency=latency / 1e3, batch=batch, **fields)
    click.echo(render(result, loaded.name, cluster_path))
    if json_path is not None:
        json_path.write_text(json.dumps(to_dict(result), indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if png_path:
        click.echo(draw(result, Path(png_path)))


def render(result, model_name: str, cluster_path: Path) -> str:
    from defer.compiler.whatif import format_rate

    rows = result.rows
    m = len(rows)
    lines = [f"model {model_name} on {m} device(s) of {cluster_path}; codec {result.codec}; "
             + ("exact placement" if result.exact else
                "HEURISTIC placement (more than 10 devices)")]
    others = [c for c in result.tables if c != result.codec]
    head = f"{'k':>2} {'inf/s':>8} {'latency':>9} {'gain':>6}  " + "".join(
        f"{c:>10}" for c in others)
    lines += [head + "  devices -> bottleneck"]
    previous = None
    for i, row in enumerate(rows):
        extra = "".join(f"{_rate(result.tables[c][i]):>10}" for c in others)
        if row.placement is None:
            lines.append(f"{row.n:>2} {'-':>8} {'-':>9} {'-':>6}  {extra}  no chain fits")
            continue
        gain = f"{row.throughput / previous - 1:+.0%}" if previous else "-"
        lines.append(f"{row.n:>2} {row.throughput:>8.2f} {row.placement.latency * 1e3:>7.1f}ms "
                     f"{gain:>6}  {extra}  {' > '.join(row.placement.devices)} -> "
                     f"{row.bottleneck.text}")
        previous = row.throughput
    chosen = result.best()
    lines.append(f"best: {chosen.n} device(s), {chosen.throughput:.2f} inf/s predicted, "
                 f"latency {chosen.placement.latency * 1e3:.1f} ms")
    link = result.slowest_link
    if link:
        lines.append(f"slowest link of that chain: {link['from']} -> {link['to']} at "
                     f"{format_rate(link['bandwidth'])} (cut {link['cut']}); per codec, best "
                     "chain with it on every hop:")
        for spec, on_link in link["codecs"].items():
            row = result.best(spec)
            lines.append(f"  {spec:<10} {format_bytes(on_link['bytes']):>10} on it "
                         f"({on_link['seconds'] * 1e3:.1f} ms)   best: {row.n} device(s), "
                         f"{row.throughput:.2f} inf/s")
    lines.append("what to do: " + "; ".join(result.advice))
    if result.replicas:
        r = result.replicas
        lines.append(f"replicas: {len(r['chains'])} chains of {r['devices_per_chain']} "
                     f"device(s) behind `defer gateway` give {r['throughput']:.2f} inf/s "
                     f"predicted ({r['gain']:+.0%} over one chain): "
                     + "; ".join(" > ".join(devices) for devices, _ in r["chains"]))
    else:
        lines.append("replicas: whole chains side by side do not beat one chain here")
    return "\n".join(lines)


def _rate(row) -> str:
    return f"{row.throughput:.2f}" if row.placement else "-"


def to_dict(result) -> dict:
    def row(r) -> dict:
        p = r.placement
        return {"n": r.n, "throughput": r.throughput,
                "latency": p.latency if p else None, "devices": p.devices if p else None,
                "bounds": p.plan.bounds if p else None,
                "stage_times": p.plan.stage_times if p else None,
                "bottleneck": r.bottleneck.text if r.bottleneck else None,
                "bottleneck_kind": r.bottleneck.kind if r.bottleneck else None}

    return {"codec": result.codec, "exact": result.exact,
            "tables": {c: [row(r) for r in rows] for c, rows in result.tables.items()},
            "best": row(result.best()), "slowest_link": result.slowest_link,
            "advice": result.advice, "replicas": result.replicas}


def draw(result, path: Path) -> str:
    """Throughput against device count per codec, each point of the main codec annotated with
    what limits it. Returns the line to print."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib not installed: no PNG; pip install 'defer-edge[plot]')"
    fig, ax = plt.subplots(figsize=(8, 5))
    for codec, rows in result.tables.items():
        points = [(r.n, r.throughput) for r in rows if r.placement]
        style = "-o" if codec == result.codec else "--."
        ax.plot(*zip(*points), style, label=codec)
    for r in result.rows:
        if r.placement:
            short = r.bottleneck.text.split(" (")[0]
            ax.annotate(short, (r.n, r.throughput), textcoords="offset points", xytext=(4, 6),
                        fontsize=7, rotation=20)
    ax.set_xlabel("devices in the chain")
    ax.set_ylabel("predicted inferences/s")
    ax.set_xticks([r.n for r in result.rows])
    ax.legend(title="codec")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
