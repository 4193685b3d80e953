"""The offline compiler: load -> analyse -> cost -> partition -> export.

`compile_model` reads as the recipe; each step is a small function in its own module. The
result is a folder of `bundle_<i>.onnx` files plus `manifest.json` (see defer/manifest.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from defer import __version__
from defer.compiler.export import stage_model, write_bundles
from defer.compiler.graph import GraphInfo, analyse
from defer.compiler.load import LoadedModel, load_model, sample_inputs
from defer.compiler.partition import Plan, Problem, balanced, equal_layers, evaluate
from defer.compiler.profile import Costs, estimate_costs, profile_costs
from defer.compiler.verify import Fidelity, compare, run_chain, session
from defer.compiler.wire import WireCosts, measure_wire
from defer.errors import PlanError, UsageError, VerifyError
from defer.manifest import Manifest

log = logging.getLogger(__name__)

STRATEGIES = ("balanced", "layers")

__all__ = ["STRATEGIES", "LoadedModel", "Plan", "Problem", "analyse", "build_problem",
           "check_options", "compile_model",
           "load_model", "resolve_cuts", "verify"]


def compile_model(
    model: str | Path | onnx.ModelProto | LoadedModel,
    n_stages: int | None,
    out_dir: str | Path,
    *,
    strategy: str = "balanced",
    cuts: Sequence[str] = (),
    bandwidth: float | None = None,
    speeds: Sequence[float] | None = None,
    memory: float | None = None,
    latency: float = 0.0,
    local_input: bool = False,
    overlap: bool = False,
    batch: int = 1,
    profile: bool = True,
    profile_runs: int = 10,
    codec: str = "raw",
) -> Manifest:
    """Cut `model` into `n_stages` stages and write the bundles and manifest to `out_dir`.

    `cuts` (node or tensor names, or `OpType#k` for the k-th node of that type) replaces the
    strategy with explicit cut points. `bandwidth` is in bytes/s, `memory` in bytes per node.
    """
    n_stages = check_options(n_stages, strategy, cuts, bandwidth, speeds, memory, batch)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    info = analyse(loaded.model, batch=batch)
    if n_stages > info.n_nodes:
        raise PlanError(f"-n {n_stages} is more stages than the model has nodes "
                        f"({info.n_nodes}); pass -n {info.n_nodes} or fewer")
    costs = profile_costs(info, runs=profile_runs) if profile else estimate_costs(info)
    wire = measure_wire(info, codec) if codec != "raw" else None
    problem = build_problem(info, costs, n_stages, speeds, bandwidth, latency, memory,
                            local_input, overlap, wire)
    plan = _choose_plan(info, problem, strategy, cuts)
    baseline = equal_layers(problem)
    log.info("plan: %r", plan)
    stages = [stage_model(info, a, b, i)
              for i, (a, b) in enumerate(zip(plan.bounds[:-1], plan.bounds[1:]))]
    for s, (_, spec) in enumerate(stages):
        spec.compute = _stage_compute(problem, s, plan.bounds[s], plan.bounds[s + 1])
    manifest = Manifest(
        model={"name": loaded.name, "source": loaded.source, "sha256": loaded.sha256,
               "opset": _opset(loaded.model), "n_nodes": info.n_nodes,
               "inputs": [info.specs[t].to_dict() for t in info.input_names],
               "outputs": [info.specs[t].to_dict() for t in info.output_names]},
        plan=_plan_record(plan, problem, baseline, costs.source, batch, memory),
        stages=[spec for _, spec in stages],
        codec={"default": codec, "hops": {}},
        created_by=f"defer {__version__}",
    )
    log.info("writing %d bundles to %s", n_stages, out_dir)
    write_bundles(Path(out_dir), [m for m, _ in stages], manifest)
    return manifest


def verify(manifest: Manifest, model: str | Path | onnx.ModelProto | LoadedModel, batch: int = 1,
           tolerance: float = 1e-4, seed: int = 0) -> Fidelity:
    """Run the bundles stage by stage and compare with the whole model; raise above tolerance."""
    whole = (model if isinstance(model, LoadedModel) else load_model(model)).model
    feeds = sample_inputs(whole, batch=batch, seed=seed)
    reference = dict(zip([o.name for o in whole.graph.output], session(whole).run(None, feeds)))
    fidelity = compare(run_chain(manifest, feeds), reference)
    if fidelity.max_rel > tolerance:
        raise VerifyError(f"the stages differ from the whole model: {fidelity} "
                          f"(tolerance {tolerance:g}); report this with the model attached")
    return fidelity


def build_problem(info: GraphInfo, costs: Costs | np.ndarray, n_stages: int,
                  speeds: Sequence[float] | None = None, bandwidth: float | None = None,
                  latency: float = 0.0, memory: float | None = None,
                  local_input: bool = False, overlap: bool = False,
                  wire: WireCosts | None = None) -> Problem:
    """The partitioning problem of `info`: costs, bytes at every cut, memory per segment."""
    cut_bytes = np.array([info.crossing_bytes(k) for k in range(info.n_nodes + 1)], dtype=float)
    if not isinstance(costs, Costs):
        costs = Costs.nodes_only(np.asarray(costs, dtype=float), "given")
    enter, leave = costs.enter, costs.leave
    link_bytes = cut_bytes.copy()
    if wire is not None:
        link_bytes, enter, leave = wire.cut_bytes.copy(), enter + wire.decode, leave + wire.encode
    if local_input:
        link_bytes[0] = 0.0
    return Problem(
        compute=costs.node, cut_bytes=link_bytes, enter=enter, leave=leave, overlap=overlap,
        speeds=list(speeds) if speeds else [1.0] * n_stages,
        bandwidth=bandwidth, latency=latency,
        memory=_memory_matrix(info, cut_bytes) if memory else None, memory_cap=memory,
    )


def resolve_cuts(info: GraphInfo, names: Sequence[str]) -> list[int]:
    """Cut positions for node names, tensor names or `OpType#k` (k-th node of that type)."""
    positions = []
    for name in names:
        match = re.fullmatch(r"([A-Za-z]+)#(\d+)", name)
        try:
            if match:
                of_type = [i for i, n in enumerate(info.nodes) if n.op_type == match.group(1)]
                position = of_type[int(match.group(2)) - 1] + 1
            else:
                position = info.position_of(name)
        except (KeyError, IndexError):
            raise PlanError(f"--cut {name!r}: no node or tensor of that name; "
                            "see the node names with `defer inspect` or use OpType#k") from None
        if not 0 < position < info.n_nodes:
            raise PlanError(f"--cut {name!r} is at the very end of the model; "
                            "cut after an inner node")
        positions.append(position)
    if len(set(positions)) != len(positions):
        raise PlanError(f"--cut {', '.join(names)}: two cuts fall at the same place; drop one")
    return sorted(positions)


def check_options(n_stages, strategy, cuts, bandwidth, speeds, memory, batch) -> int:
    """Validate compile options before any slow work; return the number of stages."""
    if cuts:
        if n_stages is not None and n_stages != len(cuts) + 1:
            raise UsageError(f"-n {n_stages} does not match {len(cuts)} --cut points "
                             f"(which make {len(cuts) + 1} stages); drop -n or fix the cuts")
        n_stages = len(cuts) + 1
    if n_stages is None:
        raise UsageError("how many stages? pass -n N (one per node of the chain)")
    if n_stages < 1:
        raise UsageError(f"-n {n_stages}: need at least one stage; pass -n 1 or more")
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy {strategy!r} unknown; use one of {', '.join(STRATEGIES)}")
    if speeds is not None and (len(speeds) != n_stages or min(speeds) <= 0):
        raise UsageError(f"--speeds needs {n_stages} positive numbers (one per stage), "
                         f"got {list(speeds)}")
    if bandwidth is not None and bandwidth <= 0:
        raise UsageError("--bandwidth must be positive; omit it for unlimited")
    if memory is not None and memory <= 0:
        raise UsageError("--memory must be positive; omit it for no cap")
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be 1 or more")
    return n_stages


def _choose_plan(info: GraphInfo, problem: Problem, strategy: str, cuts: Sequence[str]) -> Plan:
    if cuts:
        plan = evaluate(problem, [0, *resolve_cuts(info, cuts), info.n_nodes], "cuts")
    elif strategy == "layers":
        plan = equal_layers(problem)
    else:
        plan = balanced(problem)
    if not plan.fits_memory:
        raise PlanError(f"the {plan.strategy} plan does not fit the memory cap; "
                        "raise --memory or use --strategy balanced")
    return plan


def _stage_compute(problem: Problem, stage: int, a: int, b: int) -> float:
    """Predicted compute seconds of a stage (its share of the time that is not the network)."""
    work = float(np.sum(problem.compute[a:b]))
    work += float(problem.enter[a]) if problem.enter is not None else 0.0
    work += float(problem.leave[b]) if problem.leave is not None else 0.0
    return work / problem.speeds[stage]


def _memory_matrix(info: GraphInfo, cut_bytes: np.ndarray) -> np.ndarray:
    """Bytes a stage [a, b) holds: its weights + what it receives + everything it produces."""
    n = info.n_nodes
    produced = np.zeros(n + 1)
    for i, node in enumerate(info.nodes):
        produced[i + 1] = produced[i] + sum(info.tensor_bytes(t) for t in node.output if t)
    memory = np.zeros((n + 1, n + 1))
    for a in range(n):
        weights: set[str] = set()
        total = 0
        for b in range(a + 1, n + 1):
            for w in info.node_weights[b - 1] - weights:
                total += info.initializer_bytes[w]
                weights.add(w)
            memory[a, b] = total + cut_bytes[a] + produced[b] - produced[a]
    return memory


def _plan_record(plan: Plan, problem: Problem, baseline: Plan, cost_source: str, batch: int,
                 memory: float | None) -> dict:
    return {
        "strategy": plan.strategy, "n_stages": len(plan.stage_times), "batch": batch,
        "cost_source": cost_source,
        "bandwidth": problem.bandwidth, "latency": problem.latency, "speeds": problem.speeds,
        "local_input": bool(problem.cut_bytes[0] == 0), "overlap": problem.overlap,
        "memory_cap": memory, "bounds": plan.bounds,
        **_plan_figures(plan, batch),
        "baselines": {"layers": {"bounds": baseline.bounds, **_plan_figures(baseline, batch)}},
    }


def _plan_figures(plan: Plan, batch: int) -> dict:
    return {
        "stage_times": plan.stage_times, "bottleneck": plan.bottleneck, "ideal": plan.ideal,
        "over_ideal": plan.over_ideal, "imbalance": plan.imbalance,
        "throughput": batch / plan.bottleneck,
        "wire_bytes": plan.wire_bytes,
    }


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
