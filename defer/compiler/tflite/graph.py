"""A `.tflite` model described for the compiler, and its analysis into a GraphInfo.

`TFLiteGraph` holds what `read_tflite` (defer.compiler.tflite.read) found in the flatbuffer:
the object tree, its bytes (the whole-model reference), a unique *name* per tensor and the
spec of every tensor that is not a constant. Tensors are keyed by their index in subgraph 0:
flatbuffer names are long fused names and need not be unique. A tensor's name is the model's
signature name for its inputs and outputs, else the first part of the flatbuffer name (before
any ';'), with `#<index>` appended when that part is taken.

`analyse` hands the operators, in file order (TFLite's execution order), to the format-neutral
`defer.compiler.graph.build_graph`, like the ONNX front end does: `Op.source` is the flatbuffer
operator index. Constants are the tensors with buffer data and variable tensors (state their op
owns); an op that reads only constants (the DEQUANTIZE of each fp16 weight) is a constant-only
op, attached to every op that consumes it, never a cut point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from defer.compiler.graph import GraphInfo, Op, build_graph
from defer.errors import UsageError
from defer.tensors import TensorSpec

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
# TFLite tensor type -> numpy dtype name, for the types a crossing tensor may have.
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT8": "int8",
           "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
           "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}


@dataclass
class TFLiteGraph:
    """One parsed, checked `.tflite` model: the facts its slicer, timer and analysis need."""

    model: schema.ModelT
    data: bytes  # the file as read: the whole-model reference
    names: dict[int, str]  # tensor index -> unique name
    tensors: dict[int, TensorSpec]  # every tensor that is not a constant, by index
    input_indices: list[int]  # model inputs, signature order
    output_indices: list[int]  # model outputs, signature order
    buffer_bytes: dict[int, int]  # buffer index -> bytes

    @property
    def subgraph(self) -> schema.SubGraphT:
        return self.model.subgraphs[0]

    @cached_property
    def specs(self) -> dict[str, TensorSpec]:
        """Every non-constant tensor's spec, by unique name."""
        return {spec.name: spec for spec in self.tensors.values()}

    @cached_property
    def index_of(self) -> dict[str, int]:
        return {name: index for index, name in self.names.items()}

    @property
    def input_names(self) -> list[str]:
        return [self.names[t] for t in self.input_indices]

    @property
    def output_names(self) -> list[str]:
        return [self.names[t] for t in self.output_indices]

    def tensor_bytes(self, tensor: int | str, batch: int = 1) -> int:
        index = self.index_of[tensor] if isinstance(tensor, str) else tensor
        spec = self.tensors.get(index)
        return spec.nbytes(batch) if spec is not None else 0

    def operator_table(self) -> list[tuple[str, str, list[str], list[str], int]]:
        """Every operator in file order as (unique name = its first output's, op type, names
        of the tensors it reads, names of those it writes, operator index)."""
        table = []
        for i, operator in enumerate(self.subgraph.operators or []):
            outputs = [t for t in operator.outputs or [] if t >= 0]
            if not outputs:
                raise UsageError(f"operator {i} has no outputs; convert the model again")
            table.append((self.names[outputs[0]], op_type(self.model, operator),
                          [self.names[t] for t in reads(operator)],
                          [self.names[t] for t in outputs], i))
        return table

    @cached_property
    def constant_bytes(self) -> dict[str, int]:
        """Bytes of every constant tensor by unique name: those with buffer data (a shared
        buffer counts for each tensor) and variable tensors (state its op owns)."""
        found = {}
        for i, tensor in enumerate(self.subgraph.tensors):
            if tensor.isVariable:
                found[self.names[i]] = _spec(self.names[i], tensor).nbytes()
            elif i not in self.tensors:
                found[self.names[i]] = self.buffer_bytes.get(tensor.buffer, 0)
        return found

    def __repr__(self) -> str:
        return (f"TFLiteGraph({len(self.subgraph.operators or [])} operators, inputs "
                f"{self.input_names}, outputs {self.output_names})")


def describe(model: schema.ModelT, data: bytes) -> TFLiteGraph:
    """The TFLiteGraph of a parsed, checked model (`read_tflite` is the way in)."""
    subgraph = model.subgraphs[0]
    buffer_bytes = {i: len(b.data) if b.data is not None else 0
                    for i, b in enumerate(model.buffers or [])}
    inputs, outputs, io_names = _signature(model, subgraph)
    names = _unique_names(subgraph, io_names)
    tensors = {i: _spec(names[i], t) for i, t in enumerate(subgraph.tensors)
               if not t.isVariable and not buffer_bytes.get(t.buffer, 0)}
    return TFLiteGraph(model, data, names, tensors, inputs, outputs, buffer_bytes)


def analyse(graph: TFLiteGraph, batch: int = 1, order: str = "auto") -> GraphInfo:
    """The GraphInfo of a `.tflite` model: its ops in the chosen order (`info.model` is the
    TFLiteGraph, `Op.source` the flatbuffer operator index)."""
    ops = [Op(name, kind, inputs, outputs, source=index)
           for name, kind, inputs, outputs, index in graph.operator_table()]
    info = build_graph(ops, graph.constant_bytes, graph.specs, graph.input_names,
                       graph.output_names, batch, graph, order)
    log.debug("%r: %d ops (%d constant ops attached), %s order", graph, info.n_ops,
             len(info.const_ops), info.order)
    return info


def op_type(model: schema.ModelT, operator: schema.OperatorT) -> str:
    """The builtin name of an operator (CUSTOM ops: their custom code)."""
    code = model.operatorCodes[operator.opcodeIndex]
    builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return _text(code.customCode) or "CUSTOM"
    return OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def reads(operator: schema.OperatorT) -> list[int]:
    """The tensors an operator reads: its inputs and intermediates (optional ones skipped)."""
    return [t for t in [*(operator.inputs or []), *(operator.intermediates or [])] if t >= 0]


def _signature(model: schema.ModelT,
               subgraph: schema.SubGraphT) -> tuple[list[int], list[int], dict[int, str]]:
    """Model input and output tensors in signature order, and their signature names."""
    signatures = [s for s in model.signatureDefs or [] if s.subgraphIndex == 0]
    chosen = next((s for s in signatures if _text(s.signatureKey) == SIGNATURE),
                  signatures[0] if signatures else None)
    if chosen is None:
        return list(subgraph.inputs or []), list(subgraph.outputs or []), {}
    ins = [(m.tensorIndex, _text(m.name)) for m in chosen.inputs or []]
    outs = [(m.tensorIndex, _text(m.name)) for m in chosen.outputs or []]
    return [t for t, _ in ins], [t for t, _ in outs], dict(ins + outs)


def _unique_names(subgraph: schema.SubGraphT, io_names: dict[int, str]) -> dict[int, str]:
    names = dict(io_names)
    taken = set(names.values())
    for i, tensor in enumerate(subgraph.tensors):
        if i in names:
            continue
        base = _text(tensor.name).split(";")[0] or f"tensor{i}"
        name = base if base not in taken else f"{base}#{i}"
        names[i] = name
        taken.add(name)
    return names


def _spec(name: str, tensor: schema.TensorT) -> TensorSpec:
    signature = tensor.shapeSignature if tensor.shapeSignature is not None else tensor.shape
    dims = list(signature if signature is not None else [])
    shape = tuple(int(d) if d >= 0 else None for d in dims)
    dtype = _DTYPES.get(_TYPE_NAMES.get(tensor.type, ""), _TYPE_NAMES.get(tensor.type, "?"))
    q = tensor.quantization
    quant = None
    if q is not None and q.scale is not None and len(q.scale) == 1 and q.scale[0] != 0:
        quant = (float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None else 0)
    return TensorSpec(name, dtype.lower(), shape, quant)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
