"""Graph analysis, format-neutral: ops in a chosen order, crossing sets, bytes and weights.

A front end (ONNX: `analyse` below; TFLite: its own module) describes its model with plain
values and calls `build_graph`:

    ops          list[Op] in the file's order. Op(name, op_type, inputs, outputs, source):
                 `inputs` = every tensor it reads, constants included (and, for ops with
                 subgraphs, the outer tensors those read); `source` = the front end's own
                 handle (an onnx.NodeProto), used only by that front end's exporter.
    constants    {name: bytes} of every constant tensor (ONNX initializers, TFLite buffers).
    specs        {name: TensorSpec} of the other tensors (graph inputs, op outputs).
    inputs, outputs   the model's input and output tensor names.

`build_graph` then:
1. drops ops no model output depends on, orders the rest topologically and finds the
   *constant-only* ops: every input a constant or
   the output of another constant-only op (Identity/Transpose/Cast/DequantizeLinear/Reshape of a
   weight, TFLite's weight DEQUANTIZE). They are no position of the order. Each stays attached
   to the ops that consume it: `Op.attached` lists them (indices into GraphInfo.const_ops, in
   topological order) and `Op.weights` the constants it needs through them, so every stage
   that uses one duplicates it (onnxruntime folds it at load). Their outputs never cross a cut.
   One whose output is a model output attaches to the last op.
2. picks an op order (see order.py): of a few valid topological orders, the one with the
   fewest bytes alive summed over all positions.
3. records producers and last uses. Position k (0..N) is a cut before op k. The crossing set of
   k holds the tensors produced before k (or graph inputs) and consumed at or after k (or graph
   outputs): of 0, the used graph inputs; of N, the graph outputs. Only activations cross.

GraphInfo gives the partitioner and exporters: `ops`, `n_ops`, `crossing(k)` (on demand,
O(tensors)), `cut_bytes()` ((N+1,) array, O(N + tensors)), `tensor_bytes`, `stage_weights(a,
b)` (each shared weight once), `attached_ops(a, b)`, `memory()` (a StageMemory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx
from onnx import helper

from defer.compiler.memory import StageMemory
from defer.compiler.order import choose_order, topological
from defer.tensors import TensorSpec, itemsize

log = logging.getLogger(__name__)

GRAPH_INPUT = -1
# Ops whose output differs run to run: never constant, never duplicated into several stages.
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "Multinomial", "Bernoulli"})


@dataclass(eq=False)
class Op:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    source: Any = None  # the front end's handle (onnx.NodeProto)
    index: int = -1  # position in the file
    weights: frozenset[str] = frozenset()  # constants it needs, through attached ops too
    attached: tuple[int, ...] = ()  # constant-only ops it needs (GraphInfo.const_ops)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.op_type})"


@dataclass
class GraphInfo:
    """The facts about one model that every later compiler step needs."""

    ops: list[Op]  # in the chosen order
    const_ops: list[Op]  # constant-only ops, topological order
    specs: dict[str, TensorSpec]
    constant_bytes: dict[str, int]
    input_names: list[str]
    output_names: list[str]
    producer: dict[str, int]  # tensor -> position of its producer (GRAPH_INPUT for inputs)
    last_use: dict[str, int]  # tensor -> last consumer position (N for graph outputs)
    batch: int = 1
    model: Any = None  # the front end's model (onnx.ModelProto)
    order: str = "file"  # which candidate order was chosen
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    @property
    def nodes(self) -> list[Any]:
        """The front end's ops (onnx.NodeProto) in the chosen order."""
        return [op.source for op in self.ops]

    def tensor_bytes(self, name: str) -> int:
        spec = self.specs.get(name)
        if spec is None:
            return 0
        return int(np.prod(spec.concrete_shape(self.batch), dtype=np.int64)) * itemsize(spec.dtype)

    @cached_property
    def _lifetimes(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        live = sorted(((p, t) for t, p in self.producer.items() if t in self.last_use))
        names = [t for _, t in live]
        first = np.array([p for p, _ in live], dtype=np.int64)
        last = np.array([self.last_use[t] for t in names], dtype=np.int64)
        return names, first, last

    def crossing(self, k: int) -> list[str]:
        """Names of the tensors that cross a cut before op k (sorted by producer, then name)."""
        names, first, last = self._lifetimes
        count = int(np.searchsorted(first, k, side="left"))  # producer < k
        return [names[i] for i in np.flatnonzero(last[:count] >= k)]

    def cut_bytes(self) -> np.ndarray:
        """(N+1,) bytes crossing each cut, from one difference array."""
        if "cut_bytes" not in self._cache:
            names, first, last = self._lifetimes
            sizes = np.array([self.tensor_bytes(t) for t in names], dtype=np.float64)
            diff = np.zeros(self.n_ops + 2)
            keep = last > first
            np.add.at(diff, first[keep] + 1, sizes[keep])
            np.add.at(diff, last[keep] + 1, -sizes[keep])
            self._cache["cut_bytes"] = np.round(np.cumsum(diff)[: self.n_ops + 1])
        return self._cache["cut_bytes"]

    def crossing_bytes(self, k: int) -> int:
        return int(self.cut_bytes()[k])

    def crossing_tensors(self) -> list[str]:
        """Every tensor that crosses at least one cut."""
        names, first, last = self._lifetimes
        return [names[i] for i in np.flatnonzero(last > first)]

    def stage_weights(self, a: int, b: int) -> set[str]:
        return set().union(*(op.weights for op in self.ops[a:b]))

    def attached_ops(self, a: int, b: int) -> list[Op]:
        ids = sorted(set().union(*(op.attached for op in self.ops[a:b])))
        return [self.const_ops[i] for i in ids]

    def memory(self) -> StageMemory:
        """What each stage holds: weights (once each), received and produced bytes."""
        ids = {name: i for i, name in enumerate(self.constant_bytes)}
        return StageMemory(
            op_weights=[sorted(ids[w] for w in op.weights) for op in self.ops],
            weight_bytes=np.array(list(self.constant_bytes.values()), dtype=np.int64),
            produced=np.array([sum(self.tensor_bytes(t) for t in op.outputs) for op in self.ops],
                              dtype=np.int64),
            received=self.cut_bytes().astype(np.int64))

    def position_of(self, name: str) -> int:
        """The cut position right after op `name`, or after the producer of tensor `name`."""
        for i, op in enumerate(self.ops):
            if op.name == name:
                return i + 1
        if self.producer.get(name, GRAPH_INPUT) != GRAPH_INPUT:
            return self.producer[name] + 1
        raise KeyError(name)


def build_graph(ops: Sequence[Op], constants: dict[str, int], specs: dict[str, TensorSpec],
                inputs: Sequence[str], outputs: Sequence[str], batch: int = 1, model: Any = None,
                order: str = "auto") -> GraphInfo:
    """Attach constant-only ops, choose the op order and record producers and last uses."""
    for i, op in enumerate(ops):
        op.index = i
    ops = _live(ops, outputs)
    regular, const_ops, needs = _attach_constants(ops, constants, set(inputs))
    sizes = _tensor_sizes(specs, batch)
    chosen, name = choose_order(regular, set(inputs), list(outputs), sizes, order)
    ordered = [regular[i] for i in chosen]
    outputs = list(outputs)
    if ordered:  # constant model outputs are computed by the last stage
        last = ordered[-1]
        for t in outputs:
            if t in needs:
                ids, weights = needs[t]
                last.attached = tuple(sorted(set(last.attached) | ids))
                last.weights = last.weights | weights
    producer: dict[str, int] = {t: GRAPH_INPUT for t in inputs}
    last_use: dict[str, int] = {}
    for pos, op in enumerate(ordered):
        for t in op.inputs:
            if t not in constants and t not in needs:
                last_use[t] = pos
        for t in op.outputs:
            producer[t] = pos
    n = len(ordered)
    for t in outputs:
        last_use[t] = n
        if t in needs:
            producer[t] = n - 1
    return GraphInfo(ordered, const_ops, specs, dict(constants), list(inputs), outputs,
                     producer, last_use, batch, model, name)


def _live(ops: Sequence[Op], outputs: Sequence[str]) -> list[Op]:
    """The ops that contribute to some model output (dead ones would make empty stages)."""
    needed = set(outputs)
    live = []
    for op in reversed(ops):  # any order: repeat until nothing changes
        if needed & set(op.outputs):
            needed.update(op.inputs)
            live.append(op)
    live.reverse()
    if len(live) < len(ops):
        keep = {id(op) for op in live}
        missing = [op for op in ops if id(op) not in keep]
        if any(needed & set(op.outputs) for op in missing):  # file not in topological order
            return _live_by_fixpoint(ops, outputs)
        log.info("dropping %d ops that no model output depends on", len(missing))
    return live


def _live_by_fixpoint(ops: Sequence[Op], outputs: Sequence[str]) -> list[Op]:
    needed, live = set(outputs), set()
    changed = True
    while changed:
        changed = False
        for i, op in enumerate(ops):
            if i not in live and needed & set(op.outputs):
                live.add(i)
                needed.update(op.inputs)
                changed = True
    return [op for i, op in enumerate(ops) if i in live]


def _attach_constants(ops: Sequence[Op], constants: dict[str, int], inputs: set[str]):
    """Split ops into regular ones and constant-only ones; fill Op.attached and Op.weights."""
    needs: dict[str, tuple[frozenset[int], frozenset[str]]] = {}
    const_ops: list[Op] = []
    regular: list[Op] = []
    for i in topological(ops, inputs | set(constants)):
        op = ops[i]
        ids: set[int] = set()
        weights: set[str] = set()
        for t in op.inputs:
            if t in constants:
                weights.add(t)
            elif t in needs:
                ids |= needs[t][0]
                weights |= needs[t][1]
        if op.op_type not in RANDOM_OPS and all(t in constants or t in needs for t in op.inputs):
            ids.add(len(const_ops))
            const_ops.append(op)
            for t in op.outputs:
                needs[t] = (frozenset(ids), frozenset(weights))
        else:
            op.attached, op.weights = tuple(sorted(ids)), frozenset(weights)
            regular.append(op)
    return regular, const_ops, needs


def _tensor_sizes(specs: dict[str, TensorSpec], batch: int) -> dict[str, int]:
    return {name: int(np.prod(spec.concrete_shape(batch), dtype=np.int64)) * itemsize(spec.dtype)
            for name, spec in specs.items()}


# --- the ONNX front end ---------------------------------------------------------------------


def analyse(model: onnx.ModelProto, batch: int = 1, order: str = "auto") -> GraphInfo:
    """The GraphInfo of an ONNX model (normalised by load.load_model)."""
    graph = model.graph
    constants = {i.name: _initializer_bytes(i) for i in graph.initializer}
    ops = [Op(node.name, node.op_type, node_inputs(node), [t for t in node.output if t],
              source=node) for node in graph.node]
    inputs = [i.name for i in graph.input if i.name not in constants]
    return build_graph(ops, constants, _tensor_specs(model, set(constants)), inputs,
                       [o.name for o in graph.output], batch, model, order)


def analyse_orders(model: onnx.ModelProto, batch: int = 1, order: str = "auto") -> list[GraphInfo]:
    """One GraphInfo per candidate op order (`auto`: file, depth, greedy; duplicates dropped),
    so the compiler can plan each and keep the best; else just the one asked for."""
    names = ["file", "depth", "greedy"] if order == "auto" else [order]
    infos, seen = [], set()
    for name in names:
        info = analyse(model, batch, name)
        key = tuple(op.name for op in info.ops)
        if key not in seen:
            seen.add(key)
            infos.append(info)
    return infos


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope tensors its subgraphs (If/Loop/Scan) read."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names.extend(_outer_references(sub))
    return names


def _subgraphs(attr: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _outer_references(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    refs: list[str] = []
    for node in graph.node:
        for t in node_inputs(node):
            if t not in local:
                refs.append(t)
        local.update(node.output)
    return refs


def _tensor_specs(model: onnx.ModelProto, init_names: set[str]) -> dict[str, TensorSpec]:
    graph = model.graph
    specs: dict[str, TensorSpec] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name in init_names or not vi.type.HasField("tensor_type"):
            continue
        spec = value_info_spec(vi)
        if spec is not None:
            specs[vi.name] = spec
    return specs


def value_info_spec(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    tt = vi.type.tensor_type
    if tt.elem_type == 0:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    if not tt.HasField("shape"):
        return TensorSpec(vi.name, dtype, ())
    shape: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or None)
    return TensorSpec(vi.name, dtype, tuple(shape))


def _initializer_bytes(t: onnx.TensorProto) -> int:
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
