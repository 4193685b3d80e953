"""The offline compiler: load -> analyse -> cost -> partition -> export.

`compile_model` reads as the recipe; each step is a small function in its own module, and what
differs between ONNX and TFLite sits behind `frontend.front_end(format)`. The result is a
folder of `bundle_<i>.onnx` (or `.tflite`) files plus `manifest.json` (see defer/manifest.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from defer import __version__, progress
from defer.cluster import Cluster, load_cluster
from defer.compiler.export import write_bundles
from defer.compiler.frontend import front_end
from defer.compiler.graph import GraphInfo, analyse, analyse_orders
from defer.compiler.load import LoadedModel, load_model, sample_inputs
from defer.compiler.options import STRATEGIES, CompileOptions, as_options
from defer.compiler.partition import Plan, Problem, balanced, equal_layers, evaluate
from defer.compiler.placement import Placement, place_on_cluster
from defer.compiler.profile import Costs
from defer.compiler.verify import verify
from defer.compiler.wire import WireCosts, measure_wire
from defer.errors import PlanError, UsageError
from defer.hop import HopCost, hop_cut_costs
from defer.manifest import Manifest

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "CompileOptions", "LoadedModel", "Plan", "Problem", "analyse",
           "build_problem", "compile_model", "load_model", "resolve_cuts", "sample_inputs",
           "verify"]


def compile_model(model: str | Path | onnx.ModelProto | LoadedModel, n_stages: int | None = None,
                  out_dir: str | Path = "bundles", options: CompileOptions | None = None,
                  **overrides) -> Manifest:
    """Cut `model` into `n_stages` stages and write the bundles and manifest to `out_dir`.

    `options` (a CompileOptions) and keyword `overrides` of its fields say how, e.g.
    `compile_model("m.onnx", 4, "out", bandwidth=12.5e6, profile=False)`.
    """
    opts = as_options(options, n_stages, **overrides)
    cluster = load_cluster(opts.cluster) if opts.cluster else None  # bad files fail first
    loaded = _load(model, opts)
    front = front_end(loaded.format)
    with progress.phase("analyse"):
        infos = analyse_orders(loaded.model, opts.batch, opts.order, front.analyse)
    info = infos[0]
    log.info("%d ops (%d constant-only ops attached to their consumers)",
             info.n_ops, len(info.const_ops))
    if opts.n_stages is not None and opts.n_stages > info.n_ops:
        raise PlanError(f"-n {opts.n_stages} is more stages than the model has ops "
                        f"({info.n_ops}); pass -n {info.n_ops} or fewer")
    measured = front.profile(info, runs=opts.profile_runs) if opts.profile else None
    candidates = []
    with progress.phase("plan", total=len(infos)) as step:
        for info in infos:  # one plan per candidate op order: keep the best
            costs = front.costs(info, measured) if measured else front.estimate(info)
            wire = (measure_wire(info, opts.codec, values=front.crossing_values(info))
                    if opts.codec != "raw" else None)
            candidates.append((*_plan(info, costs, wire, opts, cluster), info, costs))
            step()
    plan, problem, placed, info, costs = min(candidates,
                                             key=lambda c: _rank(c[0], candidates[0][0]))
    baseline = equal_layers(problem)
    orders = {c[3].order: {"bottleneck": c[0].bottleneck, "wire_bytes": c[0].wire_bytes}
              for c in candidates}
    log.info("plan: %r (%s op order)", placed or plan, info.order)
    with progress.phase("export", total=len(plan.stage_times)) as step:
        stages = []
        for i, (a, b) in enumerate(zip(plan.bounds[:-1], plan.bounds[1:])):
            stages.append(front.stage(info, a, b, i))
            stages[-1][1].compute = _stage_compute(problem, i, a, b)
            stages[-1][1].device = placed.devices[i] if placed else ""
            step()
        manifest = Manifest(
            model={"name": loaded.name, "source": loaded.source, "sha256": loaded.sha256,
                   "format": loaded.format, **front.facts(loaded.model), "n_ops": info.n_ops,
                   "inputs": [info.specs[t].to_dict() for t in info.input_names],
                   "outputs": [info.specs[t].to_dict() for t in info.output_names],
                   **({"quantization": loaded.quantization} if loaded.quantization else {})},
            plan={**_plan_record(plan, problem, baseline, costs.source, opts.batch,
                                 opts.memory, info.order), "op_orders": orders,
                  "hop_cost": opts.hop_cost.to_dict() if opts.hop_cost and not cluster
                  else None,
                  **_placement_record(placed, opts)},
            stages=[spec for _, spec in stages],
            codec=opts.codec,
            created_by=f"defer {__version__}",
        )
        log.info("writing %d bundles to %s", len(stages), out_dir)
        write_bundles(Path(out_dir), [m for m, _ in stages], manifest)
    return manifest


def _plan(info: GraphInfo, costs: Costs, wire: WireCosts | None, opts: CompileOptions,
          cluster: Cluster | None) -> tuple[Plan, Problem, Placement | None]:
    """The plan of one op order: placed on `cluster`'s devices, or for `n_stages` devices
    described by the options (speeds, one bandwidth)."""
    if cluster is not None:
        placed = place_on_cluster(info, cluster, costs, wire, opts.n_stages, codec=opts.codec,
                                  memory=opts.memory, bandwidth=opts.bandwidth,
                                  latency=opts.latency, local_input=opts.local_input,
                                  overlap=opts.overlap)
        return placed.plan, placed.problem, placed
    problem = build_problem(info, costs, opts.n_stages, opts.speeds, opts.bandwidth,
                            opts.latency, opts.memory, opts.local_input, opts.overlap, wire,
                            opts.hop_cost)
    return _choose_plan(info, problem, opts.strategy, opts.cuts), problem, None


def _placement_record(placed: Placement | None, opts: CompileOptions) -> dict:
    if placed is None:
        return {}
    return {"placement": {"cluster": str(opts.cluster), "devices": placed.devices,
                          "exact": placed.exact,
                          "throughput_by_count": {str(k): opts.batch / b if b else 0.0
                                                  for k, b in placed.counts.items()}}}


def _load(model: str | Path | onnx.ModelProto | LoadedModel, opts: CompileOptions
          ) -> LoadedModel:
    """`model` loaded as the options say (format, quantization), or already so loaded."""
    if not isinstance(model, LoadedModel):
        return load_model(model, format=opts.format, quantize=opts.quantize,
                          calibration=opts.calibration)
    mode = (model.quantization or {}).get("mode")
    if (opts.format or model.format) != model.format or (opts.quantize or mode) != mode:
        raise UsageError(f"the model was loaded as {model.format} ({mode or 'float'}); load it "
                         "with load_model(path, format=..., quantize=...) as it is to compile")
    return model


def _rank(plan: Plan, first: Plan) -> tuple:
    """Order plans by slowest stage (ties within 1e-9), then wire bytes, then total time."""
    close = abs(plan.bottleneck - first.bottleneck) <= 1e-9 * first.bottleneck
    return (first.bottleneck if close else plan.bottleneck, plan.wire_bytes, plan.total)


def build_problem(info: GraphInfo, costs: Costs | np.ndarray, n_stages: int,
                  speeds: Sequence[float] | None = None, bandwidth: float | None = None,
                  latency: float = 0.0, memory: float | None = None,
                  local_input: bool = False, overlap: bool = False,
                  wire: WireCosts | None = None, hop_cost: HopCost | None = None) -> Problem:
    """The partitioning problem of `info`: costs, bytes at every cut, memory per segment;
    `hop_cost` adds a device's CPU per hop to each stage (on the bytes on the wire)."""
    cut_bytes = info.cut_bytes()
    if not isinstance(costs, Costs):
        costs = Costs.nodes_only(np.asarray(costs, dtype=float), "given")
    enter, leave = costs.enter, costs.leave
    link_bytes = cut_bytes.copy()
    if wire is not None:
        link_bytes, enter, leave = wire.cut_bytes.copy(), enter + wire.decode, leave + wire.encode
    if hop_cost is not None:
        hop_enter, hop_leave = hop_cut_costs(link_bytes, hop_cost)
        enter, leave = enter + hop_enter, leave + hop_leave
    if local_input:
        link_bytes[0] = 0.0
    return Problem(
        compute=costs.node, cut_bytes=link_bytes, enter=enter, leave=leave, overlap=overlap,
        speeds=list(speeds) if speeds else [1.0] * n_stages,
        bandwidth=bandwidth, latency=latency,
        memory=info.memory() if memory else None, memory_cap=memory,
    )


def resolve_cuts(info: GraphInfo, names: Sequence[str]) -> list[int]:
    """Cut positions for op names, tensor names or `OpType#k` (the k-th op of that type, e.g.
    Conv#3 or CONV_2D#3); a name that is an op's or a tensor's own wins over the pattern."""
    positions = []
    for name in names:
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)#(\d+)", name)
        try:
            try:
                position = info.position_of(name)
            except KeyError:
                if not match:
                    raise
                # The k-th of that type in the file: the same op whatever order was chosen.
                of_type = sorted((op.index, i) for i, op in enumerate(info.ops)
                                 if op.op_type == match.group(1))
                position = of_type[int(match.group(2)) - 1][1] + 1
        except (KeyError, IndexError):
            raise PlanError(f"--cut {name!r}: no op or tensor of that name; "
                            "see the op names with `defer inspect` or use OpType#k") from None
        if not 0 < position < info.n_ops:
            raise PlanError(f"--cut {name!r} is at the very end of the model; "
                            "cut after an inner op")
        positions.append(position)
    if len(set(positions)) != len(positions):
        raise PlanError(f"--cut {', '.join(names)}: two cuts fall at the same place; drop one")
    return sorted(positions)


def _choose_plan(info: GraphInfo, problem: Problem, strategy: str, cuts: Sequence[str]) -> Plan:
    if cuts:
        plan = evaluate(problem, [0, *resolve_cuts(info, cuts), info.n_ops], "cuts")
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
    return float(problem.work(stage, a, b)) / problem.speeds[stage]


def _plan_record(plan: Plan, problem: Problem, baseline: Plan, cost_source: str, batch: int,
                 memory: float | None, order: str) -> dict:
    return {
        "strategy": plan.strategy, "op_order": order, "n_stages": len(plan.stage_times), "batch": batch,
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

