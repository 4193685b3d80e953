"""Scenario 7: what tracing costs, and a picture of a trace.

(a) ResNet50 cut in 2 on a local cluster (`LocalCluster`: one onnxruntime thread per node,
    node i pinned to core i), raw codec. Streams of `count` inferences alternate tracing off
    and on (off, on, on, off, ...; `runs` of each); per node and inference, the node process's
    CPU from its kernel clock (as `hopcost` reads it), and the dispatcher's own CPU (it writes
    the file). The figure is the ratio on / off measured in one run.
(b) The same extra work in this process, timed over many repetitions: a stage appending its
    span to a request, encoding the frame's metadata and the next hop decoding it, with and
    without spans (microseconds per hop: below what (a) can resolve on a shared machine).
(c) One traced stream of a few requests rendered as a Gantt chart (matplotlib): a row per
    node phase (receive, queue, compute, send) and per link, a colour per request.

`python -m benchmarks --only trace`, or `python -m benchmarks.trace [--quick] [--png PATH]`;
`python -m benchmarks.trace --render TRACE.json --png OUT.png` draws any trace `defer
dispatch --trace` or `defer gateway --trace` wrote (the first chain in it).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.common import Context, fmt_spread, spread, table, write_result
from benchmarks.hopcost import process_cpu

PICTURE_REQUESTS = 8


def run(ctx: Context, loaded, samples: list[dict], png: Path | None = None) -> dict:
    from defer.compiler import compile_model
    from defer.local import LocalCluster

    manifest = compile_model(loaded, 2, ctx.work_dir / "r50-trace")
    result: dict = {"span_cost": span_cost()}
    with LocalCluster(manifest) as cluster:
        pids = [node.process.pid for node in cluster.nodes]
        _stream(manifest, cluster.addresses, pids, samples[:5], None)  # warm every node
        rounds: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(ctx.runs):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                path = ctx.work_dir / f"trace-{r}.json" if mode == "on" else None
                rounds[mode].append(_stream(manifest, cluster.addresses, pids,
                                            samples[: ctx.count], path))
        picture = ctx.work_dir / "picture.json"
        _stream(manifest, cluster.addresses, pids, samples[:PICTURE_REQUESTS], picture,
                inflight=4)
    result["runs"] = rounds
    for key in ("node_cpu_ms", "dispatcher_cpu_ms", "throughput"):
        ratios = [on[key] / off[key] for on, off in zip(rounds["on"], rounds["off"])]
        result[f"{key}_on_over_off"] = spread(ratios)
    if png is not None:
        try:
            render_gantt(picture, png, model="ResNet50")
            result["png"] = str(png)
        except ImportError:
            ctx.log("  (matplotlib not installed: no picture; pip install 'defer-edge[plot]')")
    ctx.log(f"  tracing on / off: node CPU x{result['node_cpu_ms_on_over_off']['median']:.4f}, "
            f"span cost {result['span_cost']['extra_us_per_hop']:.1f} us per hop")
    return result


def _stream(manifest, addresses: list[str], pids: list[int], samples: list[dict],
            trace_path: Path | None, inflight: int | None = None) -> dict:
    """One stream through running nodes (a new Dispatcher: tracing as asked); CPU per inference."""
    from defer.runtime.dispatcher import Dispatcher
    from defer.runtime.trace import TraceFile

    trace = TraceFile(trace_path) if trace_path is not None else None
    try:
        with Dispatcher(manifest, addresses, inflight=inflight, timeout=60,
                        tracer=trace.chain() if trace else None) as dispatcher:
            before = [process_cpu(pid) for pid in pids]
            own, started = time.process_time(), time.perf_counter()
            for _ in dispatcher.map(samples):
                pass
            seconds = time.perf_counter() - started
            own = time.process_time() - own
            after = [process_cpu(pid) for pid in pids]
    finally:
        if trace is not None:
            trace.close()
    n = len(samples)
    per_node = [(a - b) / n * 1e3 for a, b in zip(after, before)]
    return {"node_cpu_ms": sum(per_node), "per_node_cpu_ms": per_node,
            "dispatcher_cpu_ms": own / n * 1e3, "throughput": n / seconds}


def span_cost(repeats: int = 20_000) -> dict:
    """Microseconds a hop spends on spans: append one, encode the frame, decode it."""
    import numpy as np

    from defer.codecs import encode_tensor
    from defer.runtime.pipeline import _with_span
    from defer.runtime.protocol import Decoder, Infer, Span, encode_parts
    from defer.runtime.stage import StageTimes

    # a small tensor: the payload's cost is the same with spans or without
    activation = encode_tensor("h", np.zeros((1, 8), np.float32), "raw")
    plain = Infer(request_id=7, tensors=(activation,))
    traced = Infer(request_id=7, tensors=(activation,),
                   spans=(Span(0, *(time.time() + i for i in range(5)), 0.001, 0.02, 0.001),))
    times = StageTimes(0.001, 0.02, 0.001, time.time())

    def hop(msg: Infer, span: bool) -> None:
        if span:  # the stage's clock readings, its span appended
            msg = _with_span(msg, 1, time.time(), time.time(), times)
        decoder = Decoder()
        decoder.feed(b"".join(encode_parts(msg)))
        decoder.next()

    cost = {}
    for name, msg, span in (("off", plain, False), ("on", traced, True)):
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats // 5):
                hop(msg, span)
            runs.append((time.perf_counter() - started) / (repeats // 5) * 1e6)
        cost[f"{name}_us"] = statistics.median(runs)
    cost["extra_us_per_hop"] = cost["on_us"] - cost["off_us"]
    return cost


# --- the picture ----------------------------------------------------------------------------

def load_events(path: Path) -> list[dict]:
    text = Path(path).read_text().rstrip()
    return json.loads(text if text.endswith("]") else text.rstrip(",") + "]")


def _short(process: str) -> str:
    """"chain 0  stage 1  HOST:PORT" -> "stage 1"; link and dispatcher names as they are."""
    if process.startswith("chain "):
        process = process.split("  ", 1)[1]
    return process.split("  ")[0]


def gantt_rows(events: list[dict], chain: int = 0) -> tuple[list[str], dict]:
    """Row labels in chain order and {row: [(request, start µs, end µs)]} for chain `chain`."""
    from defer.runtime.trace import PHASE_THREADS, PIDS_PER_CHAIN

    base = (chain + 1) * PIDS_PER_CHAIN
    mine = [e for e in events if base <= e.get("pid", 0) < base + PIDS_PER_CHAIN]
    names = {e["pid"]: _short(e["args"]["name"]) for e in mine
             if e["ph"] == "M" and e["name"] == "process_name"}
    labels = []
    for pid in sorted(names):
        if (pid - base) % 2 or pid == base:  # the dispatcher, a link: one row
            labels.append(names[pid] + (" request" if pid == base else ""))
        else:
            labels += [f"{names[pid]} {phase}" for phase in ("receive", "queue", "compute",
                                                             "send")]
    bars: dict[str, list] = {label: [] for label in labels}
    threads = {tid: phase for phase, tid in PHASE_THREADS.items()}
    begins = {}
    for e in mine:
        if e["ph"] == "X":
            bars[f"{names[e['pid']]} {threads[e['tid']]}"].append(
                (e["args"]["request"], e["ts"], e["ts"] + e["dur"]))
        elif e["ph"] == "b":
            begins[e["cat"], e["id"]] = e
        elif e["ph"] == "e":
            b = begins.pop((e["cat"], e["id"]))
            label = names[e["pid"]] + {"request": " request", "queue": " queue"}.get(b["cat"],
                                                                                   "")
            bars[label].append((b["args"]["request"], b["ts"], e["ts"]))
    return labels, bars


def render_gantt(trace_path: Path, png: Path, chain: int = 0, model: str = "") -> None:
    """Draw chain `chain` of a trace: a row per node phase and link, a colour per request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = gantt_rows(load_events(trace_path), chain)
    requests = sorted({r for row in bars.values() for r, _, _ in row})
    zero = min(s for row in bars.values() for _, s, _ in row)
    colours = {r: plt.cm.tab10(i % 10) for i, r in enumerate(requests)}
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(labels) + 1.2))
    for y, label in enumerate(labels):
        lanes: list[float] = []  # overlapping bars (queues, links) share the row in lanes
        placed = []
        for request, start, end in sorted(bars[label], key=lambda b: b[1]):
            lane = next((i for i, free in enumerate(lanes) if free <= start), len(lanes))
            lanes[lane:lane + 1] = [end]
            placed.append((request, start, end, lane))
        height = 0.8 / max(1, len(lanes))
        for request, start, end, lane in placed:
            ax.broken_barh([((start - zero) / 1e3, max((end - start) / 1e3, 0.05))],
                           (y - 0.4 + lane * height, height), color=colours[request])
            if label.endswith("compute") and end - start > 6e3:
                ax.text((start + end) / 2e3 - zero / 1e3, y, f"{request}", ha="center",
                        va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first request was sent (dispatcher's clock)")
    stages = sum(label.endswith("compute") for label in labels)
    ax.set_title(f"defer trace: {len(requests)} requests through {model or 'a model'} cut in "
                 f"{stages} stages (a colour per request)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def render(result: dict) -> str:
    cost = result["span_cost"]
    rows = []
    for mode in ("off", "on"):
        runs = result["runs"][mode]
        rows.append([mode, fmt_spread(spread([r["node_cpu_ms"] for r in runs])),
                     fmt_spread(spread([r["dispatcher_cpu_ms"] for r in runs])),
                     fmt_spread(spread([r["throughput"] for r in runs]), 1)])
    rows.append(["on / off", "x" + fmt_spread(result["node_cpu_ms_on_over_off"], 4),
                 "x" + fmt_spread(result["dispatcher_cpu_ms_on_over_off"], 3),
                 "x" + fmt_spread(result["throughput_on_over_off"], 3)])
    return "\n".join([
        "7. Tracing's cost, ResNet50 n=2 (per inference; median, min..max over runs)",
        table(["tracing", "node CPU ms (both nodes)", "dispatcher CPU ms", "inferences/s"],
              rows),
        f"in process, per hop: {cost['off_us']:.1f} us without spans, {cost['on_us']:.1f} us "
        f"with (append a span, encode, decode): +{cost['extra_us_per_hop']:.1f} us"
        + (f"\npicture: {result['png']}" if "png" in result else "")])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run of each, 60 inferences")
    parser.add_argument("--runs", type=int, default=None, help="streams of each (default 3)")
    parser.add_argument("--count", type=int, default=None, help="inferences per stream (200)")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/results/trace.png"))
    parser.add_argument("--render", type=Path, default=None, metavar="TRACE.json",
                        help="only draw this trace file to --png")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trace.json"))
    args = parser.parse_args(argv)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        render_gantt(args.render, args.png)
        print(f"picture: {args.png}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from defer.compiler import load_model
    from defer.compiler.load import sample_inputs
    from defer.examples import example_onnx

    with tempfile.TemporaryDirectory(prefix="defer-bench-trace-") as tmp:
        count = args.count or (60 if args.quick else 200)
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=count, log=lambda line: print(line, flush=True))
        loaded = load_model(example_onnx("resnet50"))
        samples = [sample_inputs(loaded.model, 1, seed=i) for i in range(count)]
        result = run(ctx, loaded, samples, png=args.png)
    return write_result(args.out, result, render(result))


if __name__ == "__main__":
    raise SystemExit(main())
