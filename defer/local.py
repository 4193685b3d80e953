"""The one-machine harness (`defer run`, tests, benchmarks): it compiles AND runs, so it sits
above both the compiler and the runtime.

Start N `defer serve` processes on loopback (port 0, each pinned to a core, one engine thread),
wait for their ready lines (never a fixed sleep), dispatch, and compare with one process running
the whole model: fidelity and throughput side by side. Every process is stopped on exit, error
or Ctrl-C: SHUTDOWN, then terminate, then kill. `start_gateway` starts `defer gateway` the
same way (its ready line names its ports).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defer.codecs import max_abs_error, parse_codec
from defer.engines import load_engine
from defer.errors import StartupError, UsageError
from defer.fidelity import run_chain, stage_engines, worst
from defer.manifest import MANIFEST_NAME, Manifest, load_manifest
from defer.runtime.dispatcher import Dispatcher
from defer.runtime.node import READY_PREFIX
from defer.runtime.report import percentiles_ms
from defer.tensors import Sample, random_inputs

log = logging.getLogger(__name__)

@dataclass
class Process:
    """A started defer subprocess (`defer serve`, `defer gateway`) and its log (stderr)."""

    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (a defer process drains and exits 0), SIGKILL after `grace` s; exit code."""
        stop_processes([self], grace=grace)
        return self.process.returncode


@dataclass
class NodeProcess(Process):
    """A running `defer serve` and the address it listens on."""

    address: str = ""
    http_address: str | None = None  # with http_port: where /health and /metrics answer


@dataclass
class GatewayProcess(Process):
    """A running `defer gateway` and the addresses it serves."""

    addresses: dict[str, str] = field(default_factory=dict)  # http, grpc, metrics -> host:port

    @property
    def http(self) -> str:
        return self.addresses["http"]

    @property
    def grpc(self) -> str:
        return self.addresses["grpc"]

    @property
    def metrics(self) -> str:
        return self.addresses["metrics"]


def _spawn(args: list[str], log_path: str | Path | None, prefix: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start `args` with stdout piped (for its ready line) and stderr to `log_path` (a temp
    file by default)."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
        os.close(fd)
        log_path = name
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file,
                                   stdin=subprocess.DEVNULL, env=env)
    return process, Path(log_path)


def start_node(bundle: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 0,
               cpu: int | None = None, threads: int = 1, log_path: str | Path | None = None,
               timeout: float = 60.0, token: str | None = None, http_port: int | None = None,
               command_prefix: tuple[str, ...] = (), max_model_size: int | None = None,
               tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
               tls_ca: str | Path | None = None, heartbeat: float | None = None) -> NodeProcess:
    """Start `python -m defer serve` and return once it printed its ready line.

    `command_prefix` wraps the command, e.g. ("ip", "netns", "exec", "host1") for an emulated host.
    stderr (the node's log) goes to `log_path` (a temp file by default). StartupError, with the
    log's tail, if it exits or stays silent for `timeout` seconds. The token reaches the child
    in DEFER_TOKEN, never on its command line (which `ps` shows).
    """
    args = [*command_prefix, sys.executable, "-m", "defer", "serve", "--host", host, "--port", str(port),
            "--threads", str(threads)]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    for option, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key),
                          ("--tls-ca", tls_ca), ("--heartbeat", heartbeat),
                          ("--http-port", http_port), ("--max-model-size", max_model_size)):
        if value is not None:
            args += [option, str(value)]
    if bundle is not None:
        args.append(str(bundle))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEFER_TOKEN", "DEFER_TOKEN_FILE", "DEFER_HTTP_PORT")}
    if token is not None:
        env["DEFER_TOKEN"] = token
    node = NodeProcess(*_spawn(args, log_path, "defer-node-", env))
    try:
        line = _ready_line(node, timeout, "node")
        if not line.startswith(READY_PREFIX):
            raise StartupError(f"node (pid {node.process.pid}) printed {line!r}, not a ready "
                               "line")
        # "HOST:PORT" or "HOST:PORT http HOST:PORT"
        node.address, _, http = line[len(READY_PREFIX):].strip().partition(" http ")
        node.http_address = http or None
    except BaseException:
        stop_processes([node])
        raise
    return node


def start_gateway(manifest: str | Path, chains: list[list[str]], *, args: tuple[str, ...] = (),
                  log_path: str | Path | None = None, timeout: float = 60.0) -> GatewayProcess:
    """`python -m defer gateway` over `chains` on free ports (override with `args`); returns
    once it printed its ready line. StartupError, with the log's tail, otherwise."""
    from defer.serving.ready import parse_ready_line

    command = [sys.executable, "-m", "defer", "gateway", "--manifest", str(manifest),
               "--nodes", ",".join(chains[0])]
    for chain in chains[1:]:
        command += ["--chain", ",".join(chain)]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
    gateway = GatewayProcess(*_spawn(command, log_path, "defer-gateway-"))
    try:
        gateway.addresses = parse_ready_line(_ready_line(gateway, timeout, "gateway"))
    except BaseException as err:
        gateway.stop(grace=5.0)
        if isinstance(err, StartupError):
            raise StartupError(f"{err}\n{gateway.log_tail()}") from None
        raise
    return gateway


def _ready_line(started: Process, timeout: float, what: str) -> str:
    """The first line `started` prints on stdout: a defer process's ready line (never a sleep)."""
    process = started.process
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(f"{what} (pid {process.pid}) printed no ready line within "
                                   f"{timeout:g} s")
            if not selector.select(left):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
                raise StartupError(f"{what} (pid {process.pid}) exited with code "
                                   f"{process.returncode} before it was ready")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


def stop_processes(started: list[Process], wait: float = 0.0, grace: float = 10.0) -> None:
    """Stop defer processes: give them `wait` s to exit on their own (after SHUTDOWN), then
    SIGTERM (they drain and exit 0) for up to `grace` s, then SIGKILL. None outlives this."""
    for step, seconds in (("exit", wait), ("terminate", grace), ("kill", 5.0)):
        deadline = time.monotonic() + seconds
        for item in started:
            if item.process.poll() is not None:
                continue
            if step == "terminate":
                item.process.terminate()
            elif step == "kill":
                log.warning("pid %d ignored SIGTERM; killing it", item.process.pid)
                item.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                item.process.wait(max(0.0, deadline - time.monotonic()))
    for item in started:
        if item.process.stdout is not None:
            item.process.stdout.close()


@dataclass
class LocalCluster:
    """N node processes serving a manifest's stages on loopback; a context manager.

    Node i is pinned to core i % cpu_count with `threads` onnxruntime threads each.
    """

    manifest: Manifest
    threads: int = 1
    pin: bool = True
    log_dir: Path | None = None
    nodes: list[NodeProcess] = field(default_factory=list)

    def __enter__(self) -> LocalCluster:
        cores = sorted(os.sched_getaffinity(0))
        try:
            for stage in self.manifest.stages:
                log_path = (self.log_dir / f"node_{stage.index}.log") if self.log_dir else None
                self.nodes.append(start_node(
                    self.manifest.bundle_path(stage.index), threads=self.threads,
                    cpu=cores[stage.index % len(cores)] if self.pin else None,
                    log_path=log_path))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def close(self, dispatcher: Dispatcher | None = None) -> None:
        """SHUTDOWN through `dispatcher` if given, then wait/terminate/kill every process."""
        if dispatcher is not None:
            dispatcher.shutdown_nodes()
        stop_processes(self.nodes, wait=10.0 if dispatcher else 0.0)


@dataclass(frozen=True)
class RunOptions:
    """How `defer run` runs: `n_stages` None = one node per core this process may use."""

    n_stages: int | None = None
    count: int = 100
    codec: str | None = None
    inflight: int | None = None
    timeout: float = 60.0
    seed: int = 0
    out_dir: Path | None = None
    profile: bool = True
    warmup: int = 5
    format: str | None = None  # stages' format when compiling (None: by the model file)

    def checked(self) -> RunOptions:
        if self.count < 1:
            raise UsageError(f"--count {self.count}: need at least 1")
        if self.n_stages is not None and self.n_stages < 1:
            raise UsageError(f"-n {self.n_stages}: need at least one stage")
        if self.codec is not None:
            parse_codec(self.codec)
        return self


def default_stages() -> tuple[int, str]:
    """One node per core this process may use (more would share cores and mislead), and why."""
    cores = len(os.sched_getaffinity(0))
    return cores, (f"-n {cores}: one node per core this process may use ({cores}); more nodes "
                   "than cores would share them; pass -n to choose")


def resolve_model(model: str | Path | None, n_stages: int | None, out_dir: Path,
                  profile: bool = True, on_plan: Callable[[str], None] | None = None,
                  format: str | None = None) -> tuple[Manifest, Any]:
    """(manifest, whole ModelProto / .tflite bytes / None) for a model, bundle dir or example."""
    if model is None:
        from defer.examples import example_onnx, example_tflite

        model = example_tflite("resnet50") if format == "tflite" else example_onnx("resnet50")
    path = Path(model)
    if (path / MANIFEST_NAME).exists() or path.name == MANIFEST_NAME:
        manifest = load_manifest(path)
        if n_stages is not None and n_stages != len(manifest.stages):
            raise UsageError(f"{path} holds {len(manifest.stages)} stages, not -n {n_stages}; "
                             "drop -n or recompile")
        if format is not None and {s.format for s in manifest.stages} != {format}:
            raise UsageError(f"{path} holds {manifest.stages[0].format} stages, not --format "
                             f"{format}; drop --format or recompile")
        return manifest, _find_whole_model(manifest)
    if not path.exists():
        raise UsageError(f"{path}: no such model file or bundle directory")
    from defer.compiler import compile_model, load_model

    if n_stages is None:
        n_stages, why = default_stages()
        if on_plan is not None:
            on_plan(f"defer run: {why}")
    loaded = load_model(path, format=format)
    compile_model(loaded, n_stages, out_dir, profile=profile)
    return load_manifest(out_dir), loaded.model.data if loaded.format == "tflite" else loaded.model


def _find_whole_model(manifest: Manifest) -> Any:
    source = manifest.model.get("source", "")
    base = manifest.path.parent if manifest.path else Path(".")
    for candidate in (base / source, base.parent / source):
        if source and candidate.suffix == ".onnx" and candidate.is_file():
            import onnx

            return onnx.load(str(candidate))
        if source and candidate.suffix == ".tflite" and candidate.is_file():
            return candidate.read_bytes()
    return None


def run_local(model: str | Path | None = None, options: RunOptions | None = None,
              on_plan: Callable[[str], None] | None = None, **overrides: Any) -> dict[str, Any]:
    """Compile (if needed), run a local chain, compare with one process; return the report.

    Options are `RunOptions` fields, as `options=` or keywords; `on_plan` hears one line on
    how the stage count was chosen."""
    opts = dataclasses.replace(options or RunOptions(), **overrides).checked()
    warmup = opts.warmup
    with tempfile.TemporaryDirectory(prefix="defer-run-") as tmp:
        bundles = Path(opts.out_dir) if opts.out_dir else Path(tmp) / "bundles"
        manifest, whole = resolve_model(model, opts.n_stages, bundles, opts.profile, on_plan,
                                        opts.format)
        samples = random_inputs(manifest.inputs, opts.count + warmup, opts.seed)
        single = single_process(manifest, whole, samples, warmup)
        with LocalCluster(manifest, log_dir=Path(tmp)) as cluster:
            dispatcher = Dispatcher(manifest, cluster.addresses, codec=opts.codec,
                                    inflight=opts.inflight, timeout=opts.timeout)
            try:
                list(dispatcher.map(samples[:warmup]))
                dispatcher.reset_stats()
                outputs = list(dispatcher.map(samples[warmup:]))
                chain = dispatcher.stats()
            finally:
                cluster.close(dispatcher)
                dispatcher.close()
    worst_abs, worst_rel = fidelity(outputs, single.pop("outputs"))
    hop_codecs = dispatcher.hop_codecs
    return {"model": manifest.model.get("name", ""), "n_stages": len(manifest.stages),
        "count": opts.count, "codecs": hop_codecs, "chain": chain, "single": single,
        "plan": {key: manifest.plan.get(key) for key in ("throughput", "hop_cost")},
        "speedup": chain["throughput"] / single["throughput"] if single["throughput"] else 0.0,
        "fidelity": {"max_abs": worst_abs, "max_rel": worst_rel,
                     "codec_bound_per_hop": max(max_abs_error(c) for c in hop_codecs)},
    }


def single_process(manifest: Manifest, whole: Any, samples: list[Sample],
                   warmup: int) -> dict[str, Any]:
    """One session, one thread, pinned to one core like a node: the reference and baseline.

    `whole`: an onnx.ModelProto or a model's bytes (ONNX or TFLite); without it (None) the
    bundles run in sequence in this process.
    """
    names = [s.name for s in manifest.outputs]
    if whole is not None:
        data = whole if isinstance(whole, bytes) else whole.SerializeToString()
        engines, label = [load_engine(data)], "whole model"
    else:
        engines = stage_engines(manifest)
        label = "bundles in sequence (whole model not found)"
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        outputs, latencies = [], []
        for i, sample in enumerate(samples):
            if i == warmup:
                cpu_start = time.process_time()
            start = time.perf_counter()
            out = run_chain(manifest, sample, engines) if whole is None else \
                dict(zip(names, engines[0].run(names, sample)))
            if i >= warmup:
                latencies.append(time.perf_counter() - start)
                outputs.append(out)
        cpu = time.process_time() - cpu_start if latencies else 0.0
    finally:
        os.sched_setaffinity(0, cores)
    total = sum(latencies)
    return {"reference": label, "throughput": len(latencies) / total if total else 0.0,
            "latency_ms": percentiles_ms(latencies),
            "cpu_s_per_inference": cpu / len(latencies) if latencies else 0.0,
            "outputs": outputs}


def fidelity(outputs: list[Sample], reference: list[Sample]) -> tuple[float, float]:
    """Worst absolute error and worst error relative to the output's largest magnitude."""
    result = worst(list(zip(outputs, reference)))
    return result.max_abs, result.max_rel
