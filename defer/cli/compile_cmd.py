"""`defer compile` and `defer inspect`: shells over defer.compiler."""

from __future__ import annotations

import time
from pathlib import Path

import click

from defer import progress
from defer.cli.common import MEASURED_FILE, hop_cost_option, machine_hop_cost, predicted_vs_measured
from defer.codecs import CODEC_HELP
from defer.compiler.options import STRATEGIES, CompileOptions, parse_speeds
from defer.compiler.order import ORDERS
from defer.compiler.quantize import MODES
from defer.engines import FORMATS
from defer.hop import HopCost
from defer.manifest import Manifest, load_manifest
from defer.units import format_bytes, parse_bandwidth, parse_size

_DEFAULTS = CompileOptions()


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-n", "--stages", "n_stages", type=int, default=None,
              help="Number of stages = devices in the chain (implied by --cut; with --cluster, "
                   "the best count when omitted).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("bundles"),
              show_default=True,
              help="Output folder for bundle_<i>.onnx (or .tflite) and manifest.json.")
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
              help="Cost ops with onnxruntime's profiler (TFLite: each op timed under "
                   "LiteRT), or with a FLOP/byte estimate.")
@click.option("--codec", default=_DEFAULTS.codec, show_default=True,
              help=f"Activation codec on every hop: {CODEC_HELP}. The plan prices its encoded "
                   "bytes and codec time, measured on a sample input.")
@click.option("--order", type=click.Choice(ORDERS), default=_DEFAULTS.order, show_default=True,
              help="Op order to cut along: auto = the candidate with the fewest bytes alive, "
                   "file = as in the model file, depth = one branch at a time, greedy = free "
                   "the most bytes first.")
@click.option("--format", "format", type=click.Choice(FORMATS), default=None,
              help="Format of the stages: onnx (onnxruntime) or tflite (LiteRT). A .tflite "
                   "becomes ONNX through tf2onnx, Keras/SavedModel TFLite through the TFLite "
                   "converter; ONNX cannot become TFLite.  [default: tflite for a .tflite "
                   "model, else onnx]")
@click.option("--quantize", type=click.Choice(MODES), default=None,
              help="Quantize the model first: fp16 weights, or int8 (calibrated on "
                   "--calibration). inspect shows size, speed and agreement with float.  "
                   "[default: keep float]")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration samples for --quantize: x.npy (one input, samples along the "
                   "first axis) or x.npz (one array per input name); at most 512 are used.  "
                   "[default: 32 seeded random samples, with a warning]")
@click.option("--cluster", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Plan for the fleet `defer profile` measured in this cluster.json: each "
                   "device costed with its own op times and memory, each link with its "
                   "bandwidth and rtt; chooses the devices, their order and the cuts, and "
                   "records each stage's device. --bandwidth then prices links it lacks.  "
                   "[default: devices alike, --speeds]")
@hop_cost_option
@click.option("--verify", is_flag=True, help="Run the stages in one process and compare with "
              "the whole model; exit 1 above the tolerance.")
@click.option("--tolerance", type=float, default=None,
              help="Max relative error accepted by --verify.  [default: 1e-4; 1e-2 with "
                   "--quantize, whose stages may round differently from the whole model]")
def compile_command(model: Path, out_dir: Path, verify: bool, tolerance: float, bandwidth,
                    latency: float, speeds, memory, cuts, hop_cost: str, **fields) -> None:
    """Cut MODEL (.onnx, .tflite, .h5, .keras or a SavedModel folder) into balanced ONNX or
    TFLite stages."""
    from defer.compiler import compile_model, load_model
    from defer.compiler import verify as verify_chain
    from defer.compiler.verify import tolerance_for

    started = time.perf_counter()
    options = CompileOptions(
        bandwidth=parse_bandwidth(bandwidth) if bandwidth else None, latency=latency / 1e3,
        speeds=parse_speeds(speeds), memory=parse_size(memory) if memory else None,
        cuts=tuple(cuts), hop_cost="none", **fields).checked()  # checked before slow work
    if not options.cluster:  # a fleet's nodes bring their own (cluster.json)
        options = options.replace(hop_cost=machine_hop_cost(hop_cost))
    with progress.reporting(progress.TerminalReporter(prefix="compile: ")):
        loaded = load_model(model, format=options.format, quantize=options.quantize,
                            calibration=options.calibration)
        manifest = compile_model(loaded, out_dir=out_dir, options=options)
        click.echo(render_plan(manifest))
        if verify:
            with progress.phase("verify"):
                fidelity = verify_chain(manifest, loaded, batch=options.batch,
                                        tolerance=tolerance)
            click.echo(f"verify: {fidelity} (tolerance "
                       f"{tolerance_for(manifest, tolerance):g}) OK")
    click.echo(f"wrote {len(manifest.stages)} bundles and manifest.json to {out_dir} "
               f"in {time.perf_counter() - started:.1f} s")


@click.command("inspect")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def inspect_command(bundle_dir):
    """Show the plan of a compiled model (a bundle folder or its manifest.json): format, stage
    times, bundle sizes, how a quantized model compares with float and, per cut, every tensor
    that crosses it (dtype, quantization); a tensor that is not an activation is flagged."""
    from defer.compiler.verify import constant_sends

    manifest = load_manifest(bundle_dir)
    click.echo(render_plan(manifest))
    click.echo(render_cuts(manifest, constant_sends(manifest)))
    click.echo(_measured_line(manifest))


def _measured_line(manifest: Manifest) -> str:
    """Predicted throughput beside the last measured one (measured.json, written by
    `defer dispatch` and `defer run -o`)."""
    import json

    path = manifest.path.parent / MEASURED_FILE if manifest.path else None
    try:
        record = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("throughput"), (int, float)):
        return predicted_vs_measured(manifest.plan, None)
    return (predicted_vs_measured(manifest.plan, record["throughput"])
            + f" by `{record.get('command', '?')}` at {record.get('at', '?')}")


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
            quant = f"scale {t.quant[0]:.4g} zero {t.quant[1]}" if t.quant else ""
            lines.append(f"    {t.name:<40} {t.dtype:<8} {quant:<24} {t.shape_text():<20} "
                         f"{format_bytes(t.nbytes(batch)):>10}  {kind}")
    flagged = sum(len(c) for c in constants if c)
    lines.append(f"{flagged} crossing tensor(s) are not activations" if flagged
                 else "only activations cross the cuts")
    return "\n".join(lines)


def render_plan(manifest: Manifest) -> str:
    plan = manifest.plan
    total = sum(s.compute for s in manifest.stages) or 1.0
    bw = plan.get("bandwidth")
    links = ("measured links" if isinstance(bw, list) else
             format_bytes(bw * 8).replace('B', 'bit') + '/s' if bw else 'unlimited')
    formats = sorted({s.format for s in manifest.stages})
    lines = [
        f"model {manifest.model['name']} ({manifest.model.get('n_ops', '?')} ops) -> "
        f"{plan['n_stages']} {'+'.join(formats)} stages, strategy {plan['strategy']}, "
        f"costs from {plan['cost_source']}, "
        f"bandwidth {links}",
        f"{'stage':>5} {'ops':>5} {'time ms':>8} {'share':>6} {'weights':>10} {'bundle':>10} "
        f"{'sends':>10}  crossing tensors",
    ]
    for s in manifest.stages:
        names = f"{len(s.sends)} tensor(s)" + (f", on {s.device}" if s.device else "")
        lines.append(f"{s.index:>5} {s.n_ops:>5} {s.compute * 1e3:>8.2f} "
                     f"{s.compute / total:>6.1%} {format_bytes(s.weight_bytes):>10} "
                     f"{_bundle_size(manifest, s.index):>10} "
                     f"{format_bytes(s.bytes_out):>10}  {names}")
    if manifest.model.get("quantization"):
        lines.append(_quantization(manifest.model["quantization"]))
    if plan.get("hop_cost"):
        lines.append(f"hops priced at {HopCost.from_dict(plan['hop_cost']).describe()}")
    lines.append(_summary(plan["strategy"], plan))
    if plan.get("placement"):
        lines.append(_placement(plan["placement"], len(manifest.stages)))
    layers = plan.get("baselines", {}).get("layers")
    if layers:
        lines.append(_summary("layers", layers))
    return "\n".join(lines)


def _placement(placed: dict, n: int) -> str:
    """One line: which devices, exact or heuristic, and whether another count is faster."""
    rates = {int(k): v for k, v in placed["throughput_by_count"].items()}
    fastest = max(rates, key=lambda k: (rates[k], -k))
    line = (f"placed on {n} of the {len(rates)} devices of {placed['cluster']} "
            f"({'exact' if placed['exact'] else 'HEURISTIC: more than 10 devices'}): "
            + ", ".join(f"{k}: {r:.1f}" for k, r in sorted(rates.items())) + " inf/s by count")
    if rates[fastest] > rates.get(n, 0.0) * 1.001 and fastest != n:
        line += f"; {fastest} devices would be faster (see `defer plan`)"
    return line


def _bundle_size(manifest: Manifest, stage: int) -> str:
    """The bundle's size on disk (with its external data), or ? when it is not there."""
    spec, path = manifest.stages[stage], manifest.bundle_path(stage)
    files = [path] + ([path.with_name(spec.data_file)] if spec.data_file else [])
    if not all(f.is_file() for f in files):
        return "?"
    return format_bytes(sum(f.stat().st_size for f in files))


def _quantization(q: dict) -> str:
    """One line: how the quantized model compares with the float model it came from."""
    source = f"calibrated on {q['calibration']}" if q.get("calibration") else \
        "calibrated on seeded random samples: pass --calibration for accuracy"
    agreement = (f"top-1 agreement {q['top1_agreement']:.1%}, "
                 if q.get("top1_agreement") is not None else "")
    return (f"quantized {q['mode']} ({source}): {format_bytes(q['bytes'])} vs "
            f"{format_bytes(q['float_bytes'])} float, {q['ms']:.2f} ms vs {q['float_ms']:.2f} ms "
            f"float on one thread; {agreement}max relative error {q['max_rel_error']:.3g} on "
            f"{q['compared_on']} samples")


def _summary(name: str, figures: dict) -> str:
    mean = sum(figures["stage_times"]) / len(figures["stage_times"])
    return (f"{name:>8}: slowest stage {figures['bottleneck'] * 1e3:.2f} ms = "
            f"x{figures['imbalance']:.3f} the mean stage ({mean * 1e3:.2f} ms), "
            f"x{figures.get('over_ideal', figures['imbalance']):.3f} the ideal "
            f"({figures['ideal'] * 1e3:.2f} ms); predicted {figures['throughput']:.1f} inf/s, "
            f"{format_bytes(figures['wire_bytes'])} on the wire")


