"""Cut a `.tflite` into self-contained `.tflite` stages.

`slice_operators` keeps any set of operators, in the model's own execution order (any subset of
an execution order is one); the tensors they use, renumbered; only the buffers those tensors
(and the model's metadata) reference; only the operator codes used. Its inputs and outputs are
the tensors asked for, and its `serving_default` signature names them with the tensors' unique
names. The same kernels run on the same inputs, so a chain of slices computes exactly what the
whole model computes.

`stage_bundle` is the TFLite twin of `defer.compiler.export.stage_model`: the slice of ops
[a, b) of an analysed model (a GraphInfo) with the constant ops attached to them, taking the
tensors crossing cut a that it consumes and giving those crossing cut b that it produces, plus
the manifest's StageSpec of that stage (format "tflite").
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from defer.compiler.export import stage_spec
from defer.compiler.tflite.graph import reads
from defer.errors import PlanError
from defer.manifest import StageSpec

if TYPE_CHECKING:
    from defer.compiler.graph import GraphInfo
    from defer.compiler.tflite.graph import TFLiteGraph

SIGNATURE = "serving_default"


def stage_operators(info: GraphInfo, a: int, b: int) -> list[int]:
    """Flatbuffer operator indices of ops [a, b) and their constant ops, in file order."""
    return sorted({op.source for op in [*info.ops[a:b], *info.attached_ops(a, b)]})


def stage_bundle(info: GraphInfo, a: int, b: int, index: int) -> tuple[bytes, StageSpec]:
    """The `.tflite` bytes of ops [a, b) of `info` (a TFLite model's analysis) and its spec
    (`sha256` and `compute` filled in by the caller)."""
    if not 0 <= a < b <= info.n_ops:
        raise PlanError(f"cannot slice ops [{a}, {b}) of a model with {info.n_ops} ops")
    spec = stage_spec(info, a, b, index, "tflite")
    bundle = slice_operators(info.model, stage_operators(info, a, b),
                             [t.name for t in spec.inputs], [t.name for t in spec.outputs],
                             f"defer: ops {a}..{b - 1} of {info.n_ops} ({info.order} order)")
    return bundle, spec


def slice_operators(graph: TFLiteGraph, indices: Iterable[int], inputs: Sequence[int | str],
                    outputs: Sequence[int | str], description: str = "defer stage") -> bytes:
    """The `.tflite` bytes of any set of operators (flatbuffer indices; run in file order),
    taking `inputs` and giving `outputs` (tensor indices or unique names, signature order)."""
    operators = [graph.subgraph.operators[i] for i in sorted(set(indices))]
    inputs, outputs = ([graph.index_of[t] if isinstance(t, str) else t for t in tensors]
                       for tensors in (inputs, outputs))
    used = sorted(set(inputs) | set(outputs) | {t for op in operators
                                                for t in (*reads(op), *op.outputs) if t >= 0})
    tensor_map = {old: new for new, old in enumerate(used)}
    buffer_map = _buffer_map(graph, used)
    opcode_map = {old: new for new, old in enumerate(sorted({op.opcodeIndex for op in operators}))}

    sliced = schema.ModelT()
    sliced.version = graph.model.version or 3
    sliced.description = description
    sliced.operatorCodes = [graph.model.operatorCodes[old] for old in opcode_map]
    sliced.buffers = [schema.BufferT()] + [graph.model.buffers[old] for old in buffer_map
                                           if old != 0]
    sliced.metadata = _metadata(graph, buffer_map)
    sliced.subgraphs = [_subgraph(graph, used, operators, inputs, outputs, tensor_map,
                                  buffer_map, opcode_map)]
    sliced.signatureDefs = [_signature(graph, inputs, outputs, tensor_map)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(sliced))


def _buffer_map(graph: TFLiteGraph, used: list[int]) -> dict[int, int]:
    """Old buffer index -> new, for the buffers with data that the slice needs (0 stays 0)."""
    tensors = graph.subgraph.tensors
    needed = {tensors[t].buffer for t in used if tensors[t].buffer > 0}
    needed |= {m.buffer for m in graph.model.metadata or []}
    needed = {i for i in needed if graph.buffer_bytes.get(i, 0) > 0}
    return {0: 0} | {old: new for new, old in enumerate(sorted(needed), start=1)}


def _metadata(graph: TFLiteGraph, buffer_map: dict[int, int]) -> list[schema.MetadataT]:
    kept = []
    for entry in graph.model.metadata or []:
        if entry.buffer in buffer_map:
            entry = copy.copy(entry)
            entry.buffer = buffer_map[entry.buffer]
            kept.append(entry)
    return kept


def _subgraph(graph: TFLiteGraph, used: list[int], operators: list[schema.OperatorT],
              inputs: list[int], outputs: Sequence[int], tensor_map: dict[int, int],
              buffer_map: dict[int, int], opcode_map: dict[int, int]) -> schema.SubGraphT:
    original = graph.subgraph
    subgraph = schema.SubGraphT()
    subgraph.name = original.name
    subgraph.tensors = []
    for old in used:
        tensor = copy.copy(original.tensors[old])
        tensor.buffer = buffer_map.get(tensor.buffer, 0)
        subgraph.tensors.append(tensor)
    subgraph.inputs = [tensor_map[t] for t in inputs]
    subgraph.outputs = [tensor_map[t] for t in outputs]
    subgraph.operators = []
    for operator in operators:
        op = copy.copy(operator)
        op.opcodeIndex = opcode_map[operator.opcodeIndex]
        op.inputs = [tensor_map[t] if t >= 0 else -1 for t in operator.inputs or []]
        op.outputs = [tensor_map[t] if t >= 0 else -1 for t in operator.outputs or []]
        if operator.intermediates:
            op.intermediates = [tensor_map[t] if t >= 0 else -1 for t in operator.intermediates]
        subgraph.operators.append(op)
    return subgraph


def _signature(graph: TFLiteGraph, inputs: list[int], outputs: Sequence[int],
               tensor_map: dict[int, int]) -> schema.SignatureDefT:
    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map(graph.names[t], tensor_map[t]) for t in inputs]
    signature.outputs = [_tensor_map(graph.names[t], tensor_map[t]) for t in outputs]
    return signature


def _tensor_map(name: str, index: int) -> schema.TensorMapT:
    entry = schema.TensorMapT()
    entry.name = name
    entry.tensorIndex = index
    return entry
