"""Cut ops [a, b) of an analysed `.tflite` into a self-contained `.tflite`.

The slice keeps, in the model's own execution order, the ops [a, b) and the constant ops
attached to them; the tensors those ops use, renumbered; only the buffers those tensors (and the
model's metadata) reference; only the operator codes used. Its inputs are the tensors crossing
cut a that it consumes, its outputs the tensors crossing cut b that it produces (or the tensors
asked for), each in crossing order, and its `serving_default` signature names them with the
tensors' unique names. The same kernels run on the same inputs, so a chain of slices computes
exactly what the whole model computes.

`stage_bundle` is the TFLite twin of `defer.compiler.export.stage_model`: a slice plus the
manifest's StageSpec of that stage (format "tflite", compute left for the caller).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from defer.compiler.tflite.graph import reads
from defer.errors import PlanError
from defer.manifest import StageSpec, sha256_bytes

if TYPE_CHECKING:
    from defer.compiler.tflite.graph import TFLiteGraph

SIGNATURE = "serving_default"


def slice_model(graph: TFLiteGraph, a: int, b: int,
                outputs: Sequence[int] | None = None) -> bytes:
    """The `.tflite` bytes of ops [a, b); `outputs` (tensor indices) overrides its outputs."""
    if not 0 <= a < b <= graph.n_ops:
        raise PlanError(f"cannot slice ops [{a}, {b}) of a model with {graph.n_ops} ops")
    indices = graph.operator_indices(a, b)
    produced, consumed = _produced_consumed(graph, indices)
    inputs = [t for t in graph.crossing_tensors(a) if t in consumed]
    if outputs is None:
        outputs = [t for t in graph.crossing_tensors(b) if t in produced]
    return slice_operators(graph, indices, inputs, outputs,
                           f"defer: ops {a}..{b - 1} of {graph.n_ops}")


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


def stage_bundle(graph: TFLiteGraph, a: int, b: int, index: int) -> tuple[bytes, StageSpec]:
    """The bundle of ops [a, b) and its spec (its sha256 filled in, `compute` 0)."""
    bundle = slice_model(graph, a, b)
    produced, consumed = _produced_consumed(graph, graph.operator_indices(a, b))
    receives, sends = graph.crossing_tensors(a), graph.crossing_tensors(b)
    spec = StageSpec(
        index=index, file=f"bundle_{index}.tflite", sha256=sha256_bytes(bundle),
        inputs=[graph.tensors[t] for t in receives if t in consumed],
        outputs=[graph.tensors[t] for t in sends if t in produced],
        forward=[graph.tensors[t] for t in sends if t not in produced],
        receives=[graph.names[t] for t in receives], n_ops=b - a, compute=0.0,
        weight_bytes=graph.weight_bytes(a, b), bytes_in=graph.crossing_bytes(a),
        bytes_out=graph.crossing_bytes(b), first_op=graph.ops[a].name,
        last_op=graph.ops[b - 1].name, format="tflite")
    return bundle, spec


def _produced_consumed(graph: TFLiteGraph, indices: list[int]) -> tuple[set[int], set[int]]:
    """The tensors some of these operators write, and those some of them read."""
    operators = [graph.subgraph.operators[i] for i in indices]
    produced = {t for op in operators for t in op.outputs if t >= 0}
    consumed = {t for op in operators for t in reads(op)}
    return produced, consumed


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
