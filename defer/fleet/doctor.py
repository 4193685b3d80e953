"""`defer doctor`: can this chain start on these nodes, and will it run as planned?

    report = check_chain(load_manifest("out"), ["h1:7000", "h2:7000"], DoctorOptions(token=...))
    report.can_start, report.problems, report.findings      # one Finding per check

For each stage's node, over a probe connection (which never disturbs a running chain):
- reach: it accepts a connection and completes HELLO with our token (a wrong or missing
  token, TLS trouble and another protocol version each say so); the defer versions agree;
- engine: it can run the stage's format;
- bundle: it serves the stage's bundle, or serves none and the bundle file here hashes right,
  so the dispatcher can push it; another bundle is an error (the dispatcher refuses it);
- memory: its free memory (HELLO info) holds the stage: weights + activations in and out,
  plus the pushed bundle's bytes while it loads (not checked when the bundle is loaded);
- heartbeat: a PING/PONG round trip, well inside the time after which peers call it dead;
- link: dispatcher -> stage 0, stage i -> stage i+1 (timed by node i, which must reach node
  i+1 with its own token) and last stage -> dispatcher, against the plan's `bandwidth` and
  `latency`, and against its bottleneck: a hop whose transfer takes longer than the slowest
  stage makes the link the bottleneck.
Errors mean the chain cannot start; warnings mean it starts but will not run as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from defer import __version__
from defer.address import parse_address
from defer.cluster import DISPATCHER
from defer.errors import AuthError, DeferError, UsageError
from defer.manifest import Manifest, sha256_file
from defer.runtime.channel import DEAD_AFTER, client_tls
from defer.runtime.links import LinkEstimate, measure_link
from defer.runtime.options import DEFAULT_HEARTBEAT
from defer.runtime.probe import Probe, open_probe
from defer.units import format_bytes

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class Finding:
    where: str  # a node's address, or "A -> B" for a link
    stage: int | None
    check: str
    status: str  # ok, warning or error
    detail: str


@dataclass(frozen=True)
class DoctorOptions:
    """`timeout`: connect + HELLO and each request. `links`: time the chain's links (each test
    transfer grows until it takes `link_seconds` or reaches `link_max_size`); a link slower
    than `bandwidth_margin` x the plan's bandwidth is a warning. `heartbeat`: the interval the
    chain will run with (a round trip near DEAD_AFTER x it is a warning)."""

    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    timeout: float = 5.0
    links: bool = True
    link_seconds: float = 0.1
    link_max_size: int = 4 << 20
    bandwidth_margin: float = 0.8
    heartbeat: float = DEFAULT_HEARTBEAT


@dataclass
class DoctorReport:
    findings: list[Finding]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status != OK]

    @property
    def can_start(self) -> bool:
        return not any(f.status == ERROR for f in self.findings)


def check_chain(manifest: Manifest, nodes: list[str], options: DoctorOptions) -> DoctorReport:
    """Every check above, for the node of each stage (in stage order)."""
    if len(nodes) != len(manifest.stages):
        raise UsageError(f"the manifest has {len(manifest.stages)} stages but {len(nodes)} "
                         f"nodes were given; pass exactly {len(manifest.stages)} host:port "
                         "addresses, in stage order")
    for address in nodes:
        parse_address(address)
    if len(set(nodes)) != len(nodes):
        raise UsageError("a node is listed twice; each stage needs its own node")
    return DoctorReport(asyncio.run(_check(manifest, nodes, options)))


async def _check(manifest: Manifest, nodes: list[str], opts: DoctorOptions) -> list[Finding]:
    findings: list[Finding] = []
    tls = client_tls(opts.tls_ca) if opts.tls_ca is not None else None
    async with contextlib.AsyncExitStack() as stack:
        probes: list[Probe | None] = []
        for stage, address in enumerate(nodes):
            try:
                probe = await stack.enter_async_context(
                    open_probe(address, opts.token, tls, opts.timeout, "defer doctor"))
            except DeferError as err:
                findings.append(Finding(address, stage, _failed_check(err), ERROR, str(err)))
                probes.append(None)
                continue
            probes.append(probe)
            findings += await _check_node(manifest, stage, probe, opts)
        if opts.links:
            findings += await _check_links(manifest, nodes, probes, opts)
    return findings


def _failed_check(err: DeferError) -> str:
    text = str(err)
    if isinstance(err, AuthError) or "token" in text:
        return "auth"
    return "version" if "protocol version" in text else "reach"


async def _check_node(manifest: Manifest, stage: int, probe: Probe,
                      opts: DoctorOptions) -> list[Finding]:
    info, spec, at = probe.info, manifest.stages[stage], probe.address
    theirs = info.get("defer")
    found = [Finding(at, stage, "reach", OK if theirs == __version__ else WARNING,
                     f"authenticated, protocol {probe.hello.version}, defer {theirs}"
                     + ("" if theirs == __version__ else f" (this is defer {__version__}: "
                        "run the same version everywhere)"))]
    engines = info.get("engines") or []
    found.append(Finding(at, stage, "engine", OK if spec.format in engines else ERROR,
                         f"runs {spec.format}" if spec.format in engines else
                         f"cannot run {spec.format} bundles (it has {engines or 'none'}); "
                         f"install defer-edge{'[tflite]' if spec.format == 'tflite' else ''}"))
    bundle = _check_bundle(manifest, stage, probe.hello.bundle_sha256)
    found.append(Finding(at, stage, "bundle", *bundle))
    found.append(Finding(at, stage, "memory", *_check_memory(
        manifest, stage, info.get("memory_available"), probe.hello.bundle_sha256 == spec.sha256)))
    found.append(await _check_heartbeat(probe, stage, opts))
    return found


def _check_bundle(manifest: Manifest, stage: int, serves: str | None) -> tuple[str, str]:
    spec, path = manifest.stages[stage], manifest.bundle_path(stage)
    if serves == spec.sha256:
        return OK, f"serves {spec.file} ({spec.sha256[:12]})"
    if serves is not None:
        return ERROR, (f"serves bundle {serves[:12]}, but stage {stage} is {spec.file} "
                       f"({spec.sha256[:12]}); restart it with `defer serve {path}`, or "
                       "without a bundle so the dispatcher pushes it")
    try:
        sha = sha256_file(path)
    except OSError as err:
        return ERROR, (f"serves no bundle, and {path} cannot be read to push it ({err}); "
                       "copy the bundle folder here or start the node with its bundle")
    if sha != spec.sha256:
        return ERROR, (f"serves no bundle, and {path} hashes to {sha[:12]}, not "
                       f"{spec.sha256[:12]}: the bundle is from another compile; recompile")
    return OK, f"serves no bundle yet; the dispatcher will push {spec.file}"


def _check_memory(manifest: Manifest, stage: int, available: int | None,
                  loaded: bool) -> tuple[str, str]:
    spec = manifest.stages[stage]
    activations = spec.bytes_in + spec.bytes_out
    try:
        pushed = 0 if loaded else manifest.bundle_path(stage).stat().st_size
    except OSError:
        pushed = 0
    need = spec.weight_bytes + activations + pushed
    what = (f"needs ~{format_bytes(need)} (weights {format_bytes(spec.weight_bytes)}, "
            f"activations {format_bytes(activations)}"
            + (f", the pushed bundle {format_bytes(pushed)})" if pushed else ")"))
    if available is None:
        return WARNING, f"{what}; the node does not report its free memory"
    if loaded:
        return OK, f"bundle loaded; {format_bytes(available)} free"
    if available < need:
        return ERROR, (f"{what} but has {format_bytes(available)} free; free memory there, "
                       "or recompile with --memory to make the stages smaller")
    return OK, f"{what}; {format_bytes(available)} free"


async def _check_heartbeat(probe: Probe, stage: int, opts: DoctorOptions) -> Finding:
    try:
        rtt = statistics.median([await probe.ping(opts.timeout) for _ in range(3)])
    except DeferError as err:
        return Finding(probe.address, stage, "heartbeat", ERROR, str(err))
    dead_after = DEAD_AFTER * opts.heartbeat
    if opts.heartbeat and rtt > dead_after / 2:
        return Finding(probe.address, stage, "heartbeat", WARNING,
                       f"PING round trip {rtt * 1e3:.1f} ms, near the {dead_after:g} s after "
                       "which a silent peer is dead; raise --heartbeat")
    return Finding(probe.address, stage, "heartbeat", OK, f"PING round trip {rtt * 1e3:.2f} ms")


async def _check_links(manifest: Manifest, nodes: list[str], probes: list[Probe | None],
                       opts: DoctorOptions) -> list[Finding]:
    ends = [None, *probes, None]  # None at either end: the dispatcher
    names = [DISPATCHER, *nodes, DISPATCHER]
    found = []
    for hop in range(len(nodes) + 1):
        source, target = ends[hop], ends[hop + 1]
        where = f"{names[hop]} -> {names[hop + 1]}"
        stage = hop - 1 if hop > 0 else None
        if (hop > 0 and source is None) or (hop < len(nodes) and target is None):
            continue  # a node already failed: its links cannot be timed
        try:
            estimate = await measure_link(source, target, opts.link_max_size,
                                          opts.link_seconds, max(opts.timeout, 30.0))
        except DeferError as err:
            found.append(Finding(where, stage, "link", ERROR, str(err)))
            continue
        found.append(Finding(where, stage, "link", *_judge_link(manifest, hop, estimate, opts)))
    return found


def _judge_link(manifest: Manifest, hop: int, estimate: LinkEstimate,
                opts: DoctorOptions) -> tuple[str, str]:
    plan, batch = manifest.plan, manifest.plan.get("batch", 1)
    carried = sum(t.nbytes(batch) for t in manifest.inputs) if hop == 0 else \
        manifest.stages[hop - 1].bytes_out
    transfer = carried / estimate.bandwidth
    text = f"{estimate}; {format_bytes(carried)} per inference take {transfer * 1e3:.2f} ms"
    assumed = plan.get("bandwidth")
    if assumed and estimate.bandwidth < opts.bandwidth_margin * assumed:
        return WARNING, (f"{text}, but the plan assumed {assumed * 8 / 1e6:.1f} Mbit/s: fix "
                         "the link, or recompile with --bandwidth at what it really carries "
                         "(`defer profile` measures it)")
    latency = plan.get("latency") or 0.0
    if latency and estimate.rtt / 2 > 2 * latency + 1e-3:
        return WARNING, (f"{text}, but the plan assumed {latency * 1e3:.2f} ms of latency per "
                         "hop; recompile with --latency at the measured half round trip")
    bottleneck = plan.get("bottleneck") or 0.0
    if bottleneck and transfer > bottleneck and not (hop == 0 and plan.get("local_input")):
        return WARNING, (f"{text}, more than the slowest stage ({bottleneck * 1e3:.2f} ms): "
                         "this link, not a stage, will limit throughput; recompile with "
                         "--bandwidth, or use a lighter --codec on it")
    return OK, text

