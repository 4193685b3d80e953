"""`defer profile`: measure a fleet for the planner and write cluster.json (defer/cluster.py).

    cluster = profile_fleet("model.onnx", ProfileOptions(nodes=("h1:7000", "h2:7000")))
    cluster.save("cluster.json")

1. The model is loaded and analysed as `defer compile` does (`work.prepare`).
2. A probe connection is opened to every running `defer serve` node (HELLO as "probe", token
   proof, TLS with `tls_ca`): its facts come with the HELLO (engines, max model size).
3. Every node profiles the model with its own engine and thread count (PROFILE; in parallel,
   or one node at a time with `sequential` when nodes share CPUs). A model over the node's
   `max_model_size` goes in chunks. The replies become per-op seconds (`work.read`). The
   node's CPU per hop is the one it announced (`defer serve --hop-cost auto`), else read off
   its own clock around timed transfers (`hop_probe.measure_hop_cost`); either way divided by
   the share of a core the node got while it profiled (`hop_probe.core_share`), as its op
   seconds were measured at that share.
4. Links are timed one at a time, after all profiling: dispatcher -> node and node ->
   dispatcher for every node, and node -> node for every ordered pair the planner may chain
   (`links.measure_link`).

A node that is unreachable, refuses our token, cannot run the model's format, is too small for
even one op, dies mid-profile or sends a profile that is malformed or not of this model is a
problem: one line naming it. Any problem fails the run (FleetError, nothing is written) unless
`skip_bad`, which leaves bad nodes, their links and failed links out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defer import __version__, progress
from defer.address import parse_address
from defer.cluster import DISPATCHER, Cluster, Link, NodeProfile
from defer.errors import DeferError, NodeError, UsageError
from defer.fleet.hop_probe import clock, core_share, measure_hop_cost
from defer.fleet.work import BadProfile, TooSmall, Work, prepare
from defer.hop import HopCost
from defer.runtime.channel import client_tls
from defer.runtime.links import DEFAULT_MAX_SIZE, DEFAULT_SECONDS, measure_link
from defer.runtime.probe import Probe, open_probe
from defer.runtime.probing import MAX_MODEL_CEILING
from defer.runtime.protocol import MAX_TRANSFER, ProfileResult

log = logging.getLogger(__name__)


class FleetError(NodeError):
    """One or more nodes (or links) failed; `problems` maps each to its line."""

    def __init__(self, message: str, problems: dict[str, str]):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile. `nodes`: host:port of running `defer serve` nodes. `runs`/`warmup`:
    timed and untimed runs per op (medians). `timeout`: seconds a node may take to answer one
    PROFILE; `connect_timeout`: for connect + HELLO. `links`: also time the links (each
    transfer grows until it takes `link_seconds` or reaches `link_max_size` bytes)."""

    nodes: tuple[str, ...]
    token: str | None = dataclasses.field(default=None, repr=False)
    tls_ca: Path | None = None
    runs: int = 10
    warmup: int = 3
    batch: int = 1
    skip_bad: bool = False
    sequential: bool = False
    links: bool = True
    timeout: float = 600.0
    connect_timeout: float = 5.0
    link_seconds: float = DEFAULT_SECONDS
    link_max_size: int = DEFAULT_MAX_SIZE

    def checked(self) -> ProfileOptions:
        if not self.nodes:
            raise UsageError("no nodes: pass --nodes H:P,H:P,...")
        for address in self.nodes:
            parse_address(address)
        if len(set(self.nodes)) != len(self.nodes):
            raise UsageError("a node is listed twice in --nodes")
        if self.runs < 1 or self.warmup < 0 or self.batch < 1:
            raise UsageError("--runs and --batch must be >= 1, --warmup >= 0")
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.link_seconds <= 0:
            raise UsageError("timeouts and --link-seconds must be > 0 seconds")
        if not 0 < self.link_max_size <= MAX_TRANSFER:
            raise UsageError(f"link test transfers must be 1..{MAX_TRANSFER} bytes")
        return dataclasses.replace(self, nodes=tuple(self.nodes), token=self.token or None)


Observer = Callable[[str, str], None]  # (node address, what starts: "profile" or "links")


def profile_fleet(model: str | Path, options: ProfileOptions,
                  on_step: Observer | None = None) -> Cluster:
    """Profile every node and link (see the module docstring); the Cluster, not yet saved."""
    options = options.checked()
    work = prepare(model, options.runs, options.warmup, options.batch)
    log.info("profiling %s (%d ops, %s) on %d nodes", work.model["name"], len(work.op_names),
             work.format, len(options.nodes))
    return asyncio.run(_profile(work, options, on_step or (lambda node, what: None)))


async def _profile(work: Work, opts: ProfileOptions, on_step: Observer) -> Cluster:
    problems: dict[str, str] = {}
    tls = client_tls(opts.tls_ca) if opts.tls_ca is not None else None
    async with contextlib.AsyncExitStack() as stack:
        probes: dict[str, Probe] = {}
        for address in opts.nodes:
            try:
                probes[address] = await stack.enter_async_context(open_probe(
                    address, opts.token, tls, opts.connect_timeout, "defer profile"))
                _check_facts(probes[address], work)
            except (DeferError, BadProfile) as err:
                problems[address] = _line(address, err)
        profiles = await _profile_nodes(probes, problems, work, opts, on_step)
        links = await _time_links([probes[a] for a in opts.nodes if a in profiles], problems,
                                  opts, on_step) if opts.links else []
    return _assemble(work, opts, profiles, links, problems)


def _check_facts(probe: Probe, work: Work) -> None:
    engines = probe.info.get("engines") or []
    if work.format not in engines:
        raise BadProfile(f"it cannot run {work.format} models (it has {engines or 'none'}); "
                         f"install defer-edge{'[tflite]' if work.format == 'tflite' else ''} "
                         "there")
    theirs = probe.info.get("defer")
    if theirs != __version__:
        log.warning("node %s runs defer %s, this is defer %s", probe.address, theirs,
                    __version__)


async def _profile_nodes(probes: dict[str, Probe], problems: dict[str, str], work: Work,
                         opts: ProfileOptions, on_step: Observer) -> dict[str, NodeProfile]:
    profiles: dict[str, NodeProfile] = {}

    async def one(probe: Probe) -> None:
        try:
            profiles[probe.address] = await _profile_node(probe, work, opts, on_step)
        except (DeferError, BadProfile, TooSmall) as err:
            problems[probe.address] = _line(probe.address, err)
        step()

    with progress.phase("profile nodes", total=len(probes)) as step:
        if opts.sequential:
            for probe in probes.values():
                await one(probe)
        else:
            async with asyncio.TaskGroup() as tg:
                for probe in probes.values():
                    tg.create_task(one(probe))
    return {a: profiles[a] for a in opts.nodes if a in profiles}  # in --nodes order


async def _profile_node(probe: Probe, work: Work, opts: ProfileOptions,
                        on_step: Observer) -> NodeProfile:
    max_size = int(probe.info.get("max_model_size") or MAX_MODEL_CEILING)
    try:
        requests = work.requests(max_size)
    except TooSmall as err:
        raise TooSmall(f"it accepts models up to {max_size / 2**20:.1f} MiB (--max-model-size) "
                       f"but {err}; raise its --max-model-size or leave it out") from None
    results, before = [], await clock(probe, opts.timeout)
    for request in requests:
        on_step(probe.address, "profile")
        reply = await probe.ask(request, opts.timeout)
        if not isinstance(reply, ProfileResult):
            raise BadProfile(f"it answered PROFILE with {reply.TYPE.name}")
        results.append(reply)
    try:
        op_costs, extra = work.read(results)
    except (BadProfile, KeyError, ValueError) as err:
        raise BadProfile(f"its profile does not fit the model: {err}") from None
    facts = results[-1]
    # Hop costs are CPU seconds; the planner needs the node's seconds at the share of a core
    # its op costs were measured at (a cgroup quota, a busy device).
    share = core_share(before, await clock(probe, opts.timeout))
    announced = announced_hop_cost(probe.address, probe.info)
    hop_cost = (announced.scaled(1 / share).to_dict() if announced is not None
                else await measure_hop_cost(probe, opts.timeout, share))
    log.info("node %s: %d ops, %.2f ms in all (%s, %d thread(s)), profiled in %.1f s",
             probe.address, len(op_costs), 1e3 * sum(op_costs.values()), facts.engine,
             facts.threads, sum(r.seconds for r in results))
    return NodeProfile(probe.address, facts.engine, facts.threads, facts.cores,
                       facts.memory_free, op_costs,
                       {**extra, "max_model_size": max_size, "defer": probe.info.get("defer"),
                        "profile_seconds": sum(r.seconds for r in results),
                        **({"hop_cost": hop_cost} if hop_cost else {})})


def announced_hop_cost(address: str, info: dict) -> HopCost | None:
    """The hop cost (CPU seconds) the node announced in its HELLO (`defer serve --hop-cost
    auto`), or None if it announced none or a malformed one (logged)."""
    if not info.get("hop_cost"):
        return None
    try:
        return HopCost.from_dict(info["hop_cost"], "the node")
    except (TypeError, ValueError) as err:
        log.warning("node %s announced a malformed hop cost (%s); planning without it",
                    address, err)
        return None


async def _time_links(probes: list[Probe], problems: dict[str, str], opts: ProfileOptions,
                      on_step: Observer) -> list[Link]:
    pairs: list[tuple[Probe | None, Probe | None]] = []
    for probe in probes:
        pairs += [(None, probe), (probe, None)]
    pairs += [(a, b) for a in probes for b in probes if a is not b]
    links = []
    with progress.phase("time links", total=len(pairs)) as step:
        for source, target in pairs:
            names = (source.address if source else DISPATCHER,
                     target.address if target else DISPATCHER)
            if any(n in problems for n in names):
                step()
                continue  # a node that failed on an earlier link
            on_step(names[0] if source else names[1], "links")
            try:
                estimate = await measure_link(source, target, opts.link_max_size,
                                              opts.link_seconds, opts.timeout)
            except DeferError as err:
                key = f"link {names[0]} -> {names[1]}"
                lost = [n for n, p in zip(names, (source, target)) if p and p.channel.closing]
                for name in lost:  # the node itself is gone: name it, not just the link
                    problems[name] = _line(name, err)
                if not lost:
                    problems[key] = f"{key}: {err}"
            else:
                log.info("link %s -> %s: %s", *names, estimate)
                links.append(Link(*names, estimate.bandwidth, estimate.rtt))
            step()
    return links


def _assemble(work: Work, opts: ProfileOptions, profiles: dict[str, NodeProfile],
              links: list[Link], problems: dict[str, str]) -> Cluster:
    if problems and not opts.skip_bad:
        raise FleetError(f"{len(problems)} problem(s); nothing was written (--skip-bad leaves "
                         "bad nodes out):\n  " + "\n  ".join(problems.values()), problems)
    for line in problems.values():
        log.warning("left out: %s", line)
    nodes = [p for a, p in profiles.items() if a not in problems]
    if not nodes:
        raise FleetError("no node could be profiled:\n  " + "\n  ".join(problems.values()),
                         problems)
    kept = {n.address for n in nodes} | {DISPATCHER}
    links = [link for link in links if link.source in kept and link.target in kept]
    return Cluster(work.model, nodes, links, f"defer {__version__}")


def _line(address: str, err: Exception) -> str:
    """One line naming the node: the error's own words when they already name it."""
    text = " ".join(str(err).split())
    return text if address in text else f"node {address}: {text}"
