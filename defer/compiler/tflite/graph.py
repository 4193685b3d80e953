"""The analysis of a `.tflite` model for cutting: ops in order, crossing sets, sizes.

`read_tflite` (defer.compiler.tflite.read) parses and checks a file and calls `analyse`.
Operators are stored in execution order, so that order is the op order.

Tensors are keyed by their index in subgraph 0 (flatbuffer names are long fused names and need
not be unique). Each tensor also gets a unique *name* for manifests, the wire and slice
signatures: the model's signature names for its inputs and outputs, else the first part of the
flatbuffer name (before any ';'), with `#<index>` appended when that part is taken.

Constants are tensors with buffer data, plus the outputs of *constant ops*: ops that read only
constants, such as the DEQUANTIZE of each fp16 weight. A constant op is not in the op order
and is never a cut point: it is attached to every op that consumes its outputs, and goes (and
is timed) with each of them. Position k (0..N) is a cut before op k. The crossing set of k holds
the tensors produced before k (or model inputs) and consumed at or after k (or model outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from defer.errors import UsageError
from defer.tensors import TensorSpec

log = logging.getLogger(__name__)

GRAPH_INPUT = -1
SIGNATURE = "serving_default"
OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
# TFLite tensor type -> numpy dtype name, for the types a crossing tensor may have.
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT8": "int8",
           "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
           "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}


@dataclass(frozen=True)
class TFLiteOp:
    """One cuttable operator: its display name, builtin type and flatbuffer operator index."""

    name: str  # unique: the name of its first output tensor
    op_type: str  # e.g. "CONV_2D"
    index: int  # position in subgraph 0's operator list
    attached: tuple[int, ...] = ()  # constant ops (operator indices) that go with this op


@dataclass
class TFLiteGraph:
    """The facts about one `.tflite` model that the compiler needs, and its slicer and timer."""

    model: schema.ModelT
    data: bytes  # the file as read: the whole-model reference
    ops: list[TFLiteOp]
    names: dict[int, str]  # tensor index -> unique name
    tensors: dict[int, TensorSpec]  # every non-constant tensor, by index
    producer: dict[int, int]  # tensor -> position of its producer (GRAPH_INPUT for inputs)
    last_use: dict[int, int]  # tensor -> last consuming position (N for model outputs)
    input_indices: list[int]  # model inputs, signature order
    output_indices: list[int]  # model outputs, signature order
    op_weights: list[set[int]]  # buffer indices each op reads (its constant ops' too)
    buffer_bytes: dict[int, int]  # buffer index -> bytes
    batch: int = 1
    _crossing: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    @property
    def subgraph(self) -> schema.SubGraphT:
        return self.model.subgraphs[0]

    @cached_property
    def specs(self) -> dict[str, TensorSpec]:
        """Every non-constant tensor's spec, by unique name (as the ONNX GraphInfo has them)."""
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

    def crossing_tensors(self, k: int) -> list[int]:
        """Indices of the tensors crossing a cut before op k (by producer, then index)."""
        return self._crossing[k]

    def crossing(self, k: int) -> list[str]:
        """Names of the tensors crossing a cut before op k."""
        return [self.names[t] for t in self._crossing[k]]

    def tensor_bytes(self, tensor: int | str) -> int:
        index = self.index_of[tensor] if isinstance(tensor, str) else tensor
        spec = self.tensors.get(index)
        return spec.nbytes(self.batch) if spec is not None else 0

    def crossing_bytes(self, k: int) -> int:
        return sum(self.tensor_bytes(t) for t in self._crossing[k])

    def op_outputs(self, position: int) -> list[int]:
        """The tensors op `position` produces."""
        operator = self.subgraph.operators[self.ops[position].index]
        return [t for t in operator.outputs if t >= 0]

    def operator_table(self) -> list[tuple[str, str, list[str], list[str], int]]:
        """Every operator, constant ops included, in file order, as (unique name, op type,
        names of the tensors it reads, names of those it writes, operator index): the plain
        values a format-neutral graph builder takes. Constants appear by name as inputs."""
        table = []
        for i, operator in enumerate(self.subgraph.operators):
            outputs = [t for t in operator.outputs if t >= 0]
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
                found[self.names[i]] = _spec(self.names[i], tensor).nbytes(self.batch)
            elif i not in self.tensors and self.buffer_bytes.get(tensor.buffer, 0) > 0:
                found[self.names[i]] = self.buffer_bytes[tensor.buffer]
        return found

    def operator_indices(self, a: int, b: int) -> list[int]:
        """Flatbuffer operator indices of ops [a, b) and their constant ops, in file order."""
        return sorted({i for op in self.ops[a:b] for i in (*op.attached, op.index)})

    def weight_bytes(self, a: int, b: int) -> int:
        """Bytes of the constant buffers ops [a, b) read (each counted once)."""
        buffers = set().union(*self.op_weights[a:b]) if b > a else set()
        return sum(self.buffer_bytes[w] for w in buffers)

    def position_of(self, name: str) -> int:
        """The cut position right after op `name`, or after the producer of tensor `name`."""
        for i, op in enumerate(self.ops):
            if op.name == name:
                return i + 1
        index = self.index_of.get(name)
        if index is not None and self.producer.get(index, GRAPH_INPUT) != GRAPH_INPUT:
            return self.producer[index] + 1
        raise KeyError(name)

    def slice(self, a: int, b: int, outputs: Sequence[int] | None = None) -> bytes:
        """A self-contained `.tflite` of ops [a, b); see `defer.compiler.tflite.slicer`."""
        from defer.compiler.tflite.slicer import slice_model

        return slice_model(self, a, b, outputs)

    def time_ops(self, feeds: dict[str, np.ndarray] | None = None, runs: int = 10,
                 warmup: int = 3, threads: int = 1):
        """An OpTimes: each op's seconds under LiteRT and the I/O rate at cuts; see
        `defer.compiler.tflite.costs.time_ops`."""
        from defer.compiler.tflite.costs import time_ops

        return time_ops(self, feeds, runs, warmup, threads)

    def estimate_costs(self) -> np.ndarray:
        """Seconds of each op from FLOPs and bytes; see `defer.compiler.tflite.costs`."""
        from defer.compiler.tflite.costs import estimate_costs

        return estimate_costs(self)

    def __repr__(self) -> str:
        return (f"TFLiteGraph({self.n_ops} ops, inputs {self.input_names}, "
                f"outputs {self.output_names})")


def op_type(model: schema.ModelT, operator: schema.OperatorT) -> str:
    """The builtin name of an operator (CUSTOM ops: their custom code)."""
    code = model.operatorCodes[operator.opcodeIndex]
    builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return _text(code.customCode) or "CUSTOM"
    return OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def analyse(model: schema.ModelT, data: bytes, batch: int = 1) -> TFLiteGraph:
    """The TFLiteGraph of a parsed, checked model (`read_tflite` is the way in)."""
    subgraph = model.subgraphs[0]
    operators = subgraph.operators or []
    constant = _constant_tensors(model, subgraph)
    const_ops = _constant_ops(operators, constant, set(subgraph.outputs or []))
    constant |= {t for i in const_ops for t in operators[i].outputs if t >= 0}
    inputs, outputs, io_names = _signature(model, subgraph)
    names = _unique_names(subgraph, io_names)
    real = [i for i in range(len(operators)) if i not in const_ops]
    attached = _attach(operators, real, const_ops)
    ops = [TFLiteOp(names[_first_output(operators[i], i)], op_type(model, operators[i]), i,
                    attached[i]) for i in real]
    producer = {t: GRAPH_INPUT for t in inputs}
    last_use: dict[int, int] = {}
    op_weights: list[set[int]] = []
    for pos, op in enumerate(ops):
        op_weights.append(_op_buffers(model, subgraph, [*op.attached, op.index]))
        operator = operators[op.index]
        for t in reads(operator):
            if t not in constant:
                last_use[t] = pos
        for t in operator.outputs:
            if t >= 0:
                producer[t] = pos
    for t in outputs:
        last_use[t] = len(ops)
    tensors = {i: _spec(names[i], tensor) for i, tensor in enumerate(subgraph.tensors)
               if i not in constant}
    buffer_bytes = {i: len(b.data) if b.data is not None else 0
                    for i, b in enumerate(model.buffers or [])}
    graph = TFLiteGraph(model, data, ops, names, tensors, producer, last_use, inputs, outputs,
                        op_weights, buffer_bytes, batch)
    graph._crossing = _crossing_sets(producer, last_use, len(ops))
    log.info("%r: %d ops (%d constant ops attached)", graph, len(ops), len(const_ops))
    return graph


def reads(operator: schema.OperatorT) -> list[int]:
    """The tensors an operator reads: its inputs and intermediates (optional ones skipped)."""
    return [t for t in [*(operator.inputs or []), *(operator.intermediates or [])] if t >= 0]


def _first_output(operator: schema.OperatorT, index: int) -> int:
    outputs = [t for t in operator.outputs or [] if t >= 0]
    if not outputs:
        raise UsageError(f"operator {index} has no outputs; convert the model again")
    return outputs[0]


def _constant_tensors(model: schema.ModelT, subgraph: schema.SubGraphT) -> set[int]:
    """Tensors with data in a buffer, and variable tensors (state owned by their op)."""
    buffers = model.buffers or []
    return {i for i, t in enumerate(subgraph.tensors)
            if t.isVariable or (0 < t.buffer < len(buffers) and buffers[t.buffer].data is not None
                                and len(buffers[t.buffer].data))}


def _constant_ops(operators: list[schema.OperatorT], constant: set[int],
                  model_outputs: set[int]) -> set[int]:
    """Operators that read only constants (transitively) and produce no model output."""
    known = set(constant)
    found: set[int] = set()
    for i, operator in enumerate(operators):
        reads = [t for t in operator.inputs or [] if t >= 0]
        outs = [t for t in operator.outputs or [] if t >= 0]
        if reads and all(t in known for t in reads) and not set(outs) & model_outputs:
            found.add(i)
            known.update(outs)
    return found


def _attach(operators: list[schema.OperatorT], real: list[int],
            const_ops: set[int]) -> dict[int, tuple[int, ...]]:
    """For every real op, the constant ops its inputs come from (transitively), in order."""
    made_by = {t: i for i in const_ops for t in operators[i].outputs if t >= 0}
    attached: dict[int, tuple[int, ...]] = {}
    for i in real:
        found: set[int] = set()
        stack = [t for t in reads(operators[i]) if t in made_by]
        while stack:
            j = made_by[stack.pop()]
            if j not in found:
                found.add(j)
                stack.extend(t for t in reads(operators[j]) if t in made_by)
        attached[i] = tuple(sorted(found))
    return attached


def _op_buffers(model: schema.ModelT, subgraph: schema.SubGraphT,
                operator_indices: list[int]) -> set[int]:
    found = set()
    for i in operator_indices:
        for t in reads(subgraph.operators[i]):
            buffer = subgraph.tensors[t].buffer
            if buffer > 0 and model.buffers[buffer].data is not None:
                found.add(buffer)
    return found


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


def _crossing_sets(producer: dict[int, int], last_use: dict[int, int], n: int) -> list[list[int]]:
    # A tensor crosses every cut k with producer < k <= last_use.
    cross: list[list[int]] = [[] for _ in range(n + 1)]
    for t, p in sorted(producer.items(), key=lambda kv: (kv[1], kv[0])):
        for k in range(p + 1, last_use.get(t, p) + 1):
            cross[k].append(t)
    return cross


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
