"""What the recipe asks of a model format, behind one small interface: `front_end(format)`.

    analyse(model, batch, order) -> GraphInfo        one candidate op order (graph.build_graph)
    profile(info, runs) -> measured                   once, on the first candidate order
    costs(info, measured) -> Costs                    the same model in any op order
    estimate(info) -> Costs                           the fallback without profiling
    crossing_values(info) -> {tensor: array}          a sample run, for pricing a codec
    stage(info, a, b, index) -> (bundle, StageSpec)   an onnx.ModelProto or a .tflite's bytes
    facts(model) -> dict                              the format's own facts for the manifest

ONNX: onnxruntime's profiler and onnx.utils-style extraction (graph, profile, wire, export).
TFLite: LiteRT one-op timing and the flatbuffer slicer (defer.compiler.tflite), imported only
when a TFLite model is compiled, so ONNX compiles never need LiteRT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defer.compiler.graph import GraphInfo
from defer.compiler.profile import Costs
from defer.engines import FORMATS
from defer.errors import UsageError
from defer.manifest import StageSpec


@dataclass(frozen=True)
class FrontEnd:
    format: str
    analyse: Callable[[Any, int, str], GraphInfo]
    profile: Callable[..., Any]
    costs: Callable[[GraphInfo, Any], Costs]
    estimate: Callable[[GraphInfo], Costs]
    crossing_values: Callable[[GraphInfo], dict]
    stage: Callable[[GraphInfo, int, int, int], tuple[Any, StageSpec]]
    facts: Callable[[Any], dict]


def front_end(format: str) -> FrontEnd:
    """The front end of `format` ("onnx" or "tflite")."""
    if format == "onnx":
        return _onnx()
    if format == "tflite":
        return _tflite()
    raise UsageError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")


def _onnx() -> FrontEnd:
    from defer.compiler import export, graph, profile, wire

    def facts(model) -> dict:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return {"opset": opset}

    return FrontEnd("onnx", graph.analyse, profile.profile, profile.costs_from_profile,
                    profile.estimate_costs, wire.crossing_values, export.stage_model, facts)


def _tflite() -> FrontEnd:
    from defer.compiler.tflite import costs, graph, slicer

    def profile(info: GraphInfo, runs: int = 10) -> costs.OpTimes:
        return costs.time_ops(info, runs=runs)

    def facts(model) -> dict:
        return {"tflite_schema": int(model.model.version or 3)}

    return FrontEnd("tflite", graph.analyse, profile, lambda info, times: times.costs(info),
                    costs.estimate_costs, costs.crossing_values, slicer.stage_bundle, facts)
