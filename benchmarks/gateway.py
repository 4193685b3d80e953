"""Scenario 6: `defer gateway` under load (16 concurrent gRPC clients, tritonclient, loopback).

(a) failover: ResNet50 cut in 2, two chains of 2 nodes (4 nodes on the 2 cores), 16 clients for
    60 s (quick: 20 s); chain 1's last node is killed -9 half-way, with no spares. Throughput
    and latency before and after the kill, requests replayed (gateway metrics), and every
    answer checked against the chain run in one process (bit for bit, raw codec).
(b) scale-out: ResNet50 fits one node, so compare 2 chains x 1 node (the whole model per node)
    with 1 chain x 2 nodes (the model cut in 2), each node pinned to its own core.
(c) batching: tiny_cnn (dynamic batch dimension) cut in 2, one chain, with and without
    `--max-batch 8 --max-delay-ms 2`.
The clients, the gateway and the nodes share the machine's 2 cores: figures are ratios in one
run, on a machine others may be using.

`python -m benchmarks --only gateway [--quick]`, or `python -m benchmarks.gateway [--quick]
[--runs R] [--only failover scale batching]`; (b) and (c) alternate their setups R times.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import Context, fmt_spread, single_device, spread, table, write_result

CLIENTS = 16
PARTS = ("failover", "scale", "batching")


@dataclass
class Load:
    """What the clients saw: one (submitted, answered, chain) per answer, and the failures."""

    answers: list[tuple[float, float, int]] = field(default_factory=list)
    mismatches: int = 0
    max_abs_error: float = 0.0
    errors: list[str] = field(default_factory=list)

    def window(self, start: float, end: float) -> dict:
        from defer.runtime.report import percentiles_ms

        inside = [(s, d) for s, d, _ in self.answers if start <= d < end]
        latency = percentiles_ms([d - s for s, d in inside])
        return {"answers": len(inside), "throughput": len(inside) / (end - start),
                "p50_ms": latency["p50"], "p99_ms": latency["p99"]}


def drive(address: str, model: str, samples: list[dict], references: list[dict] | None,
          seconds: float, clients: int = CLIENTS,
          events: tuple[tuple[float, object], ...] = ()) -> tuple[Load, float]:
    """`clients` threads, each with its own tritonclient gRPC client, send requests (cycling
    through `samples`) for `seconds`; `events` are (at seconds, callable) run meanwhile."""
    import tritonclient.grpc as grpcclient

    load, lock = Load(), threading.Lock()
    requests = []  # built once and shared (read-only): the clients spend CPU on sending only
    for sample in samples:
        requests.append([])
        for name, array in sample.items():
            requests[-1].append(grpcclient.InferInput(name, list(array.shape), _datatype(array)))
            requests[-1][-1].set_data_from_numpy(array)
    started = time.perf_counter()
    deadline = started + seconds

    def client(k: int) -> None:
        connection = grpcclient.InferenceServerClient(address)
        i = k
        while time.perf_counter() < deadline:
            tensors = requests[i % len(samples)]
            submitted = time.perf_counter()
            try:
                result = connection.infer(model, tensors)
            except Exception as err:  # noqa: BLE001 - counted: the figure is "no errors"
                with lock:
                    load.errors.append(str(err))
                continue
            answered = time.perf_counter()
            chain = result.get_response().parameters["defer_chain"].int64_param
            error = 0.0
            if references is not None:
                for name, want in references[i % len(samples)].items():
                    error = max(error, float(np.max(np.abs(result.as_numpy(name) - want))))
            with lock:
                load.answers.append((submitted, answered, chain))
                load.mismatches += error != 0.0
                load.max_abs_error = max(load.max_abs_error, error)
            i += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for at, action in events:
        time.sleep(max(0.0, started + at - time.perf_counter()))  # a benchmark's schedule
        action()
    for thread in threads:
        thread.join(seconds + 120)
    return load, started


def _datatype(array: np.ndarray) -> str:
    from defer.serving.oip import datatype_of

    return datatype_of(array.dtype.name)


def scrape(gateway) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{gateway.metrics}/metrics") as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _nodes(manifest, cores: list[int]) -> list:
    from defer.local import start_node

    return [start_node(manifest.bundle_path(i % len(manifest.stages)), cpu=core)
            for i, core in enumerate(cores)]


def _serve(manifest, nodes, per_chain: int, work: Path, args: tuple[str, ...] = ()):
    from defer.local import start_gateway

    chains = [[n.address for n in nodes[i:i + per_chain]]
              for i in range(0, len(nodes), per_chain)]
    return start_gateway(manifest.path, chains, args=("--name", "m", *args),
                         log_path=work / f"gateway-{time.monotonic_ns()}.log")


def failover(ctx: Context, manifest, samples, references) -> dict:
    from defer.local import stop_processes

    seconds = 20.0 if ctx.quick else 60.0
    nodes = _nodes(manifest, [0, 1, 0, 1])
    gateway = None
    try:
        gateway = _serve(manifest, nodes, 2, ctx.work_dir)
        kill_at = seconds / 2
        killed: list[float] = []
        load, start = drive(gateway.grpc, "m", samples, references, seconds, events=(
            (kill_at, lambda: (nodes[3].process.kill(), killed.append(time.perf_counter()))),))
        metrics = scrape(gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        stop_processes(nodes)
    settle = 2.0  # leave the first seconds out of each window: warm-up, then the failover
    after = load.window(killed[0] + settle, start + seconds)
    return {"seconds": seconds, "clients": CLIENTS, "kill_at_s": kill_at,
            "answers": len(load.answers), "errors": len(load.errors), "error_samples":
            load.errors[:3], "not_bit_exact": load.mismatches, "max_abs_error": load.max_abs_error,
            "before": load.window(start + settle, killed[0]), "after": after,
            "around_kill": load.window(killed[0], killed[0] + settle),
            "replayed": metrics.get(("defer_replays_total", (("chain", "1"),)), 0.0),
            "failovers": metrics.get(("defer_failovers_total", (("chain", "1"),)), 0.0),
            "answered_by_chain": {c: sum(1 for *_, k in load.answers if k == c) for c in (0, 1)}}


def compare(ctx: Context, label: str, manifest, cores: list[int], per_chain: int, samples,
            args: tuple[str, ...] = ()) -> dict:
    from defer.local import stop_processes

    seconds = 10.0 if ctx.quick else 20.0
    nodes = _nodes(manifest, cores)
    gateway = None
    try:
        gateway = _serve(manifest, nodes, per_chain, ctx.work_dir, args)
        load, start = drive(gateway.grpc, "m", samples, None, seconds)
    finally:
        if gateway is not None:
            gateway.stop()
        stop_processes(nodes)
    return {"setup": label, "errors": len(load.errors),
            **load.window(start + min(2.0, seconds / 5), start + seconds)}


def alternate(ctx: Context, setups: list[tuple]) -> list[dict]:
    """Each setup (compare's arguments after ctx) measured `ctx.runs` times, in turn, so every
    round sees the same machine load; per setup the runs and their median."""
    runs: list[list[dict]] = [[] for _ in setups]
    for _ in range(ctx.runs):
        for k, setup in enumerate(setups):
            runs[k].append(compare(ctx, *setup))
    return [{"setup": r[0]["setup"], "runs": r,
             **{key: spread([x[key] for x in r]) for key in ("throughput", "p50_ms", "p99_ms")},
             "errors": sum(x["errors"] for x in r)} for r in runs]


def run(ctx: Context, loaded, parts: tuple[str, ...] = PARTS) -> dict:
    from defer.compiler import compile_model, load_model
    from defer.examples import example_onnx
    from defer.fidelity import run_chain, stage_engines
    from defer.tensors import random_inputs

    result: dict = {}
    r50_2 = compile_model(loaded, 2, ctx.work_dir / "gw-r50-n2")
    samples = random_inputs(r50_2.inputs, 16, seed=6)
    if "failover" in parts:
        engines = stage_engines(r50_2)
        references = [run_chain(r50_2, s, engines) for s in samples]
        del engines
        result["failover"] = failover(ctx, r50_2, samples, references)
    if "scale" in parts:
        r50_1 = compile_model(loaded, 1, ctx.work_dir / "gw-r50-n1")
        single = single_device(r50_1, loaded.model, samples * 2)
        result["single_device"] = {"throughput": single["throughput"],
                                   "p50_ms": single["latency_ms"]["p50"]}
        result["scale_out"] = alternate(ctx, [
            ("2 chains x 1 node (whole model)", r50_1, [0, 1], 1, samples),
            ("1 chain x 2 nodes (cut in 2)", r50_2, [0, 1], 2, samples)])
    if "batching" in parts:
        tiny = compile_model(load_model(example_onnx("tiny_cnn")), 2, ctx.work_dir / "gw-tiny")
        tiny_samples = random_inputs(tiny.inputs, 64, seed=7)
        result["batching"] = alternate(ctx, [
            ("tiny_cnn n=2, no batching", tiny, [0, 1], 2, tiny_samples),
            ("tiny_cnn n=2, --max-batch 8 --max-delay-ms 2", tiny, [0, 1], 2, tiny_samples,
             ("--max-batch", "8", "--max-delay-ms", "2"))])
    return result


def render(result: dict) -> str:
    lines = []
    if "failover" in result:
        f = result["failover"]
        rows = [[name, f"{w['throughput']:.1f}", f"{w['p50_ms']:.0f}", f"{w['p99_ms']:.0f}"]
                for name, w in (("before the kill", f["before"]),
                                ("first 2 s after", f["around_kill"]), ("after", f["after"]))]
        lines += [f"6a. Gateway failover: ResNet50 n=2, 2 chains, {f['clients']} gRPC clients, "
                  f"{f['seconds']:.0f} s, kill -9 of chain 1's node at {f['kill_at_s']:.0f} s",
                  table(["window", "answers/s", "p50 ms", "p99 ms"], rows),
                  f"{f['answers']} answers, {f['errors']} errors, {f['not_bit_exact']} not "
                  f"bit-exact (max abs error {f['max_abs_error']:.3g}); {f['replayed']:.0f} "
                  f"requests replayed on chain 0; answered by chain: {f['answered_by_chain']}",
                  ""]
    titles = {"scale_out": "6b. Scale-out, ResNet50 (fits one node)",
              "batching": "6c. Dynamic batching (median, min..max over runs)"}
    if "single_device" in result:
        titles["scale_out"] += (f"; one device alone, in this process, one core: "
                                f"{result['single_device']['throughput']:.1f} inferences/s")
    for key, title in titles.items():
        if key in result:
            lines += [title, table(["setup", "answers/s", "p50 ms", "p99 ms", "errors"], [
                [r["setup"], fmt_spread(r["throughput"], 1), fmt_spread(r["p50_ms"], 1),
                 fmt_spread(r["p99_ms"], 1), r["errors"]] for r in result[key]]), ""]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging
    import tempfile

    from defer.compiler import load_model
    from defer.examples import example_onnx

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 s failover run, 10 s others")
    parser.add_argument("--runs", type=int, default=None,
                        help="rounds of (b) and (c) (default 3, quick 1)")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gateway.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="defer-bench-gw-") as tmp:
        ctx = Context(quick=args.quick, runs=args.runs or (1 if args.quick else 3),
                      work_dir=Path(tmp), count=0)
        result = run(ctx, load_model(example_onnx("resnet50")), tuple(args.only))
    return write_result(args.out, result, render(result))


if __name__ == "__main__":
    raise SystemExit(main())
