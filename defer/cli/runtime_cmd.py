"""`defer serve`, `defer dispatch` and `defer run`: shells over defer.runtime and defer.local.

Each command builds one options object (`NodeConfig`, `DispatchOptions`, `RunOptions`) whose
fields hold the defaults shown here, and hands it to the Python API, which validates it.
"""

from __future__ import annotations

import itertools
import json
import resource
import signal
import sys
from pathlib import Path

import click

from defer.cli.common import (
    heartbeat_option,
    machine_hop_cost,
    predicted_vs_measured,
    record_measured,
    resolve_token,
    token_options,
)
from defer.codecs import CODEC_HELP
from defer.engines import FORMATS
from defer.local import RunOptions
from defer.runtime.options import DispatchOptions, NodeConfig

_NODE, _DISPATCH, _RUN = NodeConfig(), DispatchOptions(), RunOptions()


def _file(**kwargs):
    return click.Path(exists=True, dir_okay=False, path_type=Path, **kwargs)


@click.command("serve")
@click.argument("bundle", required=False, type=_file())
@click.option("--host", default=_NODE.host, show_default=True,
              help="Address to bind (0.0.0.0 exposes the node to the network).")
@click.option("--port", type=int, default=_NODE.port, show_default=True,
              help="Port to listen on; 0 picks a free one (printed in the ready line).")
@click.option("--threads", type=int, default=_NODE.threads, show_default=True,
              help="Engine (onnxruntime/LiteRT) threads.")
@click.option("--cpu", type=int, default=None,
              help="Pin this node to core K (os.sched_setaffinity).  [default: no pinning]")
@token_options
@click.option("--tls-cert", type=_file(), default=None,
              help="Serve TLS with this certificate (PEM); needs --tls-key.  [default: no TLS]")
@click.option("--tls-key", type=_file(), default=None, help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=_file(), default=None,
              help="Connect to the next node with TLS, verifying it against this CA or "
                   "self-signed certificate (PEM).  [default: plain TCP]")
@heartbeat_option
@click.option("--http-port", type=int, envvar="DEFER_HTTP_PORT", show_envvar=True, default=None,
              help="Also serve GET /health/live, /health/ready (200 once a bundle is loaded) and "
                   "/metrics (Prometheus) over HTTP on this port; 0 = any free one (printed in "
                   "the ready line).  [default: off]")
@click.option("--max-model-size", default=None, metavar="SIZE",
              help="Largest model this node accepts to profile (`defer profile`; larger models "
                   "arrive in chunks), announced in HELLO; e.g. 256MiB.  [default: a quarter of "
                   "the memory available at start, 64 MiB to 1 GiB]")
@click.option("--hop-cost", "hop_cost", type=click.Choice(["auto", "none"]), default="none",
              show_default=True,
              help="auto: measure this device's CPU per hop once (~15 s, cached in "
                   "~/.cache/defer/hop_cost.json) and announce it in HELLO, so `defer profile` "
                   "records it in cluster.json and fleet plans price it.")
def serve(token: str | None, token_file: Path | None, max_model_size: str | None,
          hop_cost: str, **fields) -> None:
    """Serve one stage BUNDLE; without it, wait for the dispatcher to push one.

    Once listening, prints one line to stdout: `defer node listening on HOST:PORT` (followed
    by ` http HOST:PORT` with --http-port).
    SIGINT/SIGTERM drain in-flight requests and exit 0.
    """
    from defer.runtime.node import READY_PREFIX, run_node

    def ready(address: str, http: str | None) -> None:
        click.echo(f"{READY_PREFIX}{address}" + (f" http {http}" if http else ""))
        sys.stdout.flush()

    from defer.units import parse_size

    size = int(parse_size(max_model_size)) if max_model_size else None
    hop = machine_hop_cost(hop_cost)  # before listening: the ready line means ready
    run_node(NodeConfig(token=resolve_token(token, token_file), max_model_size=size,
                        hop_cost=hop.to_dict() if hop else None, **fields), ready)


@click.command("dispatch")
@click.option("--manifest", "manifest_path", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="manifest.json, or the bundle folder holding it.")
@click.option("--nodes", default=None, metavar="H:P,H:P,...",
              help="Node addresses in stage order, comma-separated ([v6]:port for IPv6).  "
                   "[default: the devices the manifest's plan placed its stages on]")
@click.option("--cluster", "cluster_path", type=_file(), default=None,
              help="cluster.json the plan was made for: its nodes outside the chain become "
                   "--spares, and the chain's nodes must be in it.  [default: none]")
@click.option("--input", "input_path", type=_file(), default=None,
              help="x.npy or x.npz (one array per input name); one input or a stack along a "
                   "new first axis, read one sample at a time.  [default: seeded random inputs]")
@click.option("--count", type=int, default=None,
              help="Inferences to run; cycles through --input.  [default: the --input count, "
                   "else 100]")
@click.option("--inflight", type=int, default=None,
              help="Requests in flight.  [default: max(8, 2 x stages)]")
@click.option("--codec", default=None,
              help=f"Codec on every hop ({CODEC_HELP}).  [default: the manifest's]")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Save outputs to this .npz (one stacked array per output), "
                                 "written as they arrive.  [default: keep only statistics]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report as JSON here.")
@click.option("--timeout", type=float, default=_DISPATCH.timeout, show_default=True,
              help="Seconds any wait may take before failing with a named node.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@click.option("--spares", default="", metavar="H:P,H:P,...",
              help="Idle nodes that take over a lost stage (bundle pushed, chain rewired, "
                   "in-flight requests replayed).  [default: none]")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every request's receive, queue, compute and send on "
                                 "every node and link as Chrome trace-event JSON here (open in "
                                 "ui.perfetto.dev or chrome://tracing).  [default: no trace]")
@token_options
@click.option("--tls-ca", type=_file(), default=None,
              help="Connect to nodes with TLS, verifying them against this CA or self-signed "
                   "certificate (PEM).  [default: plain TCP]")
@heartbeat_option
def dispatch(manifest_path: Path, nodes: str | None, cluster_path: Path | None,
             input_path: Path | None, count: int | None, output_path: Path | None,
             report_path: Path | None, seed: int, spares: str, trace_path: Path | None,
             token: str | None, token_file: Path | None, **fields) -> None:
    """Stream inputs through a chain of running `defer serve` nodes and report.

    The chain is --nodes, or the devices `defer compile --cluster` placed the stages on.
    Progress goes to stderr (a bar on a terminal, a line every 5 s otherwise); the report to
    stdout.
    """
    from defer import progress
    from defer.address import parse_address_list
    from defer.errors import UsageError
    from defer.manifest import load_manifest
    from defer.runtime.dispatcher import Dispatcher
    from defer.runtime.inputs import InputFile, OutputWriter, random_stream
    from defer.runtime.report import format_report
    from defer.runtime.trace import TraceFile

    manifest = load_manifest(manifest_path)
    chain, spare_nodes = _chain(manifest, nodes, cluster_path, parse_address_list(spares))
    if count is not None and count < 1:
        raise UsageError(f"--count {count}: need at least 1")
    if input_path is not None:
        source = InputFile(input_path, manifest)
        count = count or len(source)
        samples = source.samples(count)
    else:
        count = count or 100
        samples = random_stream(manifest.inputs, count, seed)
    first = next(samples)  # a wrong input fails before any connection
    options = DispatchOptions(spares=tuple(spare_nodes), token=resolve_token(token, token_file),
                              **fields)
    writer = OutputWriter(output_path, count) if output_path is not None else None
    trace = TraceFile(trace_path) if trace_path is not None else None
    try:
        with progress.reporting(progress.TerminalReporter(prefix="dispatch: ")), \
                Dispatcher(manifest, chain, options,
                           tracer=trace.chain() if trace else None) as dispatcher, \
                progress.phase("infer", total=count) as step:
            for outputs in dispatcher.map(itertools.chain([first], samples)):
                if writer is not None:
                    writer.append(outputs)
                step()
            stats = dispatcher.stats()
    finally:
        if trace is not None:
            trace.close()
    if writer is not None:
        writer.close()
    stats["dispatcher_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    click.echo(format_report(stats))
    click.echo(f"  {predicted_vs_measured(manifest.plan, stats['throughput'])}")
    record_measured(manifest, stats["throughput"], "defer dispatch", len(chain))
    click.echo(f"  dispatcher peak RSS {stats['dispatcher_peak_rss_mb']:.0f} MB")
    if report_path is not None:
        report_path.write_text(json.dumps(stats, indent=2) + "\n")
    if trace_path is not None:
        click.echo(f"  trace: {trace_path} (open in ui.perfetto.dev or chrome://tracing)")


def _chain(manifest, nodes: str | None, cluster_path: Path | None,
           spares: list[str]) -> tuple[list[str], list[str]]:
    """The chain's addresses and the spares, from --nodes or the manifest's placed devices;
    with a cluster.json, its other nodes are spares too."""
    from defer.address import parse_address_list
    from defer.cluster import load_cluster
    from defer.errors import UsageError

    chain = parse_address_list(nodes) if nodes else manifest.devices
    if not chain:
        raise UsageError("which nodes? pass --nodes H:P,... (the manifest's plan was not placed "
                         "on devices: compile with --cluster to record them)")
    if cluster_path is None:
        return chain, spares
    cluster = load_cluster(cluster_path)
    known = [n.address for n in cluster.nodes]
    strangers = [a for a in chain if a not in known]
    if strangers:
        raise UsageError(f"{', '.join(strangers)} not in {cluster_path}; profile them with "
                         "`defer profile`, or drop --cluster")
    return chain, [*spares, *(a for a in known if a not in chain and a not in spares)]


@click.command("run")
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("-n", "--stages", "n_stages", type=int, default=None,
              help="Stages = local nodes to start.  [default: one per core this process may "
                   "use, or the bundle folder's count]")
@click.option("--count", type=int, default=_RUN.count, show_default=True,
              help="Inferences to run.")
@click.option("--codec", default=None,
              help=f"Codec on every hop ({CODEC_HELP}).  [default: the manifest's, raw]")
@click.option("--inflight", type=int, default=None,
              help="Requests in flight.  [default: max(8, 2 x stages)]")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Keep the compiled bundles here.  [default: a temp folder]")
@click.option("--profile/--no-profile", default=_RUN.profile, show_default=True,
              help="Cost the model with onnxruntime's profiler, or a FLOP estimate.")
@click.option("--format", "format", type=click.Choice(FORMATS), default=None,
              help="Format of the stages when compiling (tflite: LiteRT nodes, the whole "
                   ".tflite as the reference).  [default: tflite for a .tflite model, else "
                   "onnx]")
@click.option("--timeout", type=float, default=_RUN.timeout, show_default=True,
              help="Seconds any wait may take before failing with a named node.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the report as JSON here.")
def run(model: Path | None, report_path: Path | None, **fields) -> None:
    """Run MODEL (a model file or bundle folder; default: the built-in ResNet50, as ONNX or
    with --format tflite as TFLite) on a local chain of nodes, one per core, and compare with
    one process."""
    from defer.local import run_local
    from defer.runtime.report import format_report

    options = RunOptions(**fields).checked()
    if model is None or not model.is_dir():
        machine_hop_cost()  # measured once per machine; the compile prices it
    # SIGTERM unwinds like Ctrl-C, so the cluster's cleanup stops every node process.
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        report = run_local(model, options, on_plan=lambda line: click.echo(line, err=True))
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(format_report(report["chain"], title=f"chain of {report['n_stages']} nodes"))
    single, fid = report["single"], report["fidelity"]
    click.echo(f"single process ({single['reference']}, 1 thread): "
               f"{single['throughput']:.1f} inferences/s, latency p50 "
               f"{single['latency_ms']['p50']:.2f} ms")
    click.echo(f"chain: {predicted_vs_measured(report['plan'], report['chain']['throughput'])}")
    if options.out_dir is not None:
        from defer.manifest import load_manifest

        record_measured(load_manifest(options.out_dir), report["chain"]["throughput"],
                        "defer run", report["n_stages"])
    click.echo(f"speed-up {report['speedup']:.2f}x; fidelity: max abs error "
               f"{fid['max_abs']:.3g}, max relative error {fid['max_rel']:.3g} "
               f"(codec bound per hop {fid['codec_bound_per_hop']:g})")
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2) + "\n")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
