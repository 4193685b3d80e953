"""`defer compile` and `defer inspect`: shells over defer.compiler."""

from __future__ import annotations

import time
from pathlib import Path

import click

from defer import progress
from defer.codecs import CODEC_HELP
from defer.compiler.options import STRATEGIES, CompileOptions, parse_speeds
from defer.compiler.order import ORDERS
from defer.manifest import Manifest, load_manifest
from defer.units import format_bytes, parse_bandwidth, parse_size

_DEFAULTS = CompileOptions()


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-n", "--stages", "n_stages", type=int, default=None,
              help="Number of stages = devices in the chain (implied by --cut).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("bundles"),
              show_default=True, help="Output folder for bundle_<i>.onnx and manifest.json.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=_DEFAULTS.strategy,
              show_default=True, help="balanced = exact min-bottleneck; layers = equal op counts.")
@click.option("--cut", "cuts", multiple=True, metavar="NAME",
              help="Cut after this op or tensor (or OpType#k, the k-th op of that type). "
                   "Repeatable; replaces --strategy.")
@click.option("--bandwidth", default=None, metavar="RATE",
              help="Link bandwidth, e.g. 100Mbit or 12.5MB/s.  [default: unlimited]")
@click.option("--latency", type=float, default=_DEFAULTS.latency * 1e3, show_default=True,
              help="Per-hop latency in milliseconds.")
@click.option("--local-input", is_flag=True,
              help="The dispatcher sits beside the first device: the model input does not "
                   "cross a --bandwidth-limited link.")
@click.option("--overlap", is_flag=True,
              help="Price a stage as max(compute, transfer) rather than their sum: nodes "
                   "receive while they compute.")
@click.option("--speeds", default=None, metavar="S0,S1,...",
              help="Relative speed of each device in chain order, e.g. 2,1,1.  [default: all 1]")
@click.option("--memory", default=None, metavar="SIZE",
              help="Memory cap per device (weights + activations), e.g. 512MB.  [default: none]")
@click.option("--batch", type=int, default=_DEFAULTS.batch, show_default=True,
              help="Batch size to plan for.")
@click.option("--profile/--no-profile", default=_DEFAULTS.profile, show_default=True,
              help="Cost ops with onnxruntime's profiler, or with a FLOP/byte estimate.")
@click.option("--codec", default=_DEFAULTS.codec, show_default=True,
              help=f"Activation codec on every hop: {CODEC_HELP}. The plan prices its encoded "
                   "bytes and codec time, measured on a sample input.")
@click.option("--order", type=click.Choice(ORDERS), default=_DEFAULTS.order, show_default=True,
              help="Op order to cut along: auto = the candidate with the fewest bytes alive, "
                   "file = as in the model file, depth = one branch at a time, greedy = free "
                   "the most bytes first.")
@click.option("--verify", is_flag=True, help="Run the stages in one process and compare with "
              "the whole model; exit 1 above the tolerance.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Max relative error accepted by --verify.")
def compile_command(model: Path, out_dir: Path, verify: bool, tolerance: float, bandwidth,
                    latency: float, speeds, memory, cuts, **fields) -> None:
    """Cut MODEL (.onnx, .h5, .keras or a SavedModel folder) into balanced ONNX stages."""
    from defer.compiler import compile_model, load_model
    from defer.compiler import verify as verify_chain

    started = time.perf_counter()
    options = CompileOptions(
        bandwidth=parse_bandwidth(bandwidth) if bandwidth else None, latency=latency / 1e3,
        speeds=parse_speeds(speeds), memory=parse_size(memory) if memory else None,
        cuts=tuple(cuts), **fields).checked()  # every option checked before the slow load
    with progress.reporting(progress.TerminalReporter(prefix="compile: ")):
        loaded = load_model(model)
        manifest = compile_model(loaded, out_dir=out_dir, options=options)
        click.echo(render_plan(manifest))
        if verify:
            with progress.phase("verify"):
                fidelity = verify_chain(manifest, loaded, batch=options.batch,
                                        tolerance=tolerance)
            click.echo(f"verify: {fidelity} (tolerance {tolerance:g}) OK")
    click.echo(f"wrote {len(manifest.stages)} bundles and manifest.json to {out_dir} "
               f"in {time.perf_counter() - started:.1f} s")


@click.command("inspect")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def inspect_command(bundle_dir):
    """Show the plan of a compiled model (a bundle folder or its manifest.json) and, per cut,
    every tensor that crosses it; a crossing tensor that is not an activation is flagged."""
    from defer.compiler.verify import constant_sends

    manifest = load_manifest(bundle_dir)
    click.echo(render_plan(manifest))
    click.echo(render_cuts(manifest, constant_sends(manifest)))


def render_cuts(manifest: Manifest, constants: list[set[str] | None]) -> str:
    """Per cut (after each stage): name, dtype, shape and bytes of each tensor crossing it."""
    batch = manifest.plan.get("batch", 1)
    lines = []
    for stage, constant in zip(manifest.stages, constants):
        sent = [*stage.outputs, *stage.forward]
        to = "dispatcher" if stage.index == len(manifest.stages) - 1 else \
            f"stage {stage.index + 1}"
        lines.append(f"cut after stage {stage.index} (-> {to}): {len(sent)} tensor(s), "
                     f"{format_bytes(sum(t.nbytes(batch) for t in sent))}")
        for t in sent:
            kind = "?" if constant is None else (
                "NOT AN ACTIVATION (computed from weights only)" if t.name in constant
                else "activation")
            lines.append(f"    {t.name:<40} {t.dtype:<8} {t.shape_text():<20} "
                         f"{format_bytes(t.nbytes(batch)):>10}  {kind}")
    flagged = sum(len(c) for c in constants if c)
    lines.append(f"{flagged} crossing tensor(s) are not activations" if flagged
                 else "only activations cross the cuts")
    return "\n".join(lines)


def render_plan(manifest: Manifest) -> str:
    plan = manifest.plan
    total = sum(s.compute for s in manifest.stages) or 1.0
    bw = plan.get("bandwidth")
    lines = [
        f"model {manifest.model['name']} ({manifest.model.get('n_ops', '?')} ops) -> "
        f"{plan['n_stages']} stages, strategy {plan['strategy']}, costs from {plan['cost_source']}, "
        f"bandwidth {format_bytes(bw * 8).replace('B', 'bit') + '/s' if bw else 'unlimited'}",
        f"{'stage':>5} {'ops':>5} {'time ms':>8} {'share':>6} {'weights':>10} "
        f"{'sends':>10}  crossing tensors",
    ]
    for s in manifest.stages:
        names = f"{len(s.sends)} tensor(s)"
        lines.append(f"{s.index:>5} {s.n_ops:>5} {s.compute * 1e3:>8.2f} "
                     f"{s.compute / total:>6.1%} {format_bytes(s.weight_bytes):>10} "
                     f"{format_bytes(s.bytes_out):>10}  {names}")
    lines.append(_summary(plan["strategy"], plan))
    layers = plan.get("baselines", {}).get("layers")
    if layers:
        lines.append(_summary("layers", layers))
    return "\n".join(lines)


def _summary(name: str, figures: dict) -> str:
    mean = sum(figures["stage_times"]) / len(figures["stage_times"])
    return (f"{name:>8}: slowest stage {figures['bottleneck'] * 1e3:.2f} ms = "
            f"x{figures['imbalance']:.3f} the mean stage ({mean * 1e3:.2f} ms), "
            f"x{figures.get('over_ideal', figures['imbalance']):.3f} the ideal "
            f"({figures['ideal'] * 1e3:.2f} ms); predicted {figures['throughput']:.1f} inf/s, "
            f"{format_bytes(figures['wire_bytes'])} on the wire")


