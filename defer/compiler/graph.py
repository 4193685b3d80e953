"""Graph analysis: topological order, crossing sets and tensor sizes of an ONNX model.

Position k (0..N) is a cut before node k of the order. The crossing set of k holds the tensors
produced before k (or graph inputs) and consumed at or after k (or graph outputs). Initializers
never cross: each stage owns the weights it uses. The crossing set of 0 is the used graph inputs,
the crossing set of N the graph outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from defer.errors import UsageError
from defer.tensors import TensorSpec, itemsize

GRAPH_INPUT = -1


@dataclass
class GraphInfo:
    """The facts about one model that every later compiler step needs."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]  # in topological order
    specs: dict[str, TensorSpec]  # every non-initializer tensor with a known type
    initializer_bytes: dict[str, int]
    node_weights: list[set[str]]  # initializers each node uses (subgraphs included)
    producer: dict[str, int]  # tensor -> position of its producer (GRAPH_INPUT for inputs)
    last_use: dict[str, int]  # tensor -> last consumer position (N for graph outputs)
    input_names: list[str]
    output_names: list[str]
    batch: int = 1
    _crossing: list[list[str]] = field(default_factory=list, repr=False)

    @property
    def n_ops(self) -> int:
        return len(self.nodes)

    def crossing(self, k: int) -> list[str]:
        """Names of the tensors that cross a cut before node k (sorted by producer, then name)."""
        return self._crossing[k]

    def tensor_bytes(self, name: str) -> int:
        spec = self.specs.get(name)
        if spec is None:
            return 0
        return int(np.prod(spec.concrete_shape(self.batch), dtype=np.int64)) * itemsize(spec.dtype)

    def crossing_bytes(self, k: int) -> int:
        return sum(self.tensor_bytes(t) for t in self.crossing(k))

    def position_of(self, name: str) -> int:
        """The cut position right after node `name`, or after the producer of tensor `name`."""
        for i, node in enumerate(self.nodes):
            if node.name == name:
                return i + 1
        if name in self.producer and self.producer[name] != GRAPH_INPUT:
            return self.producer[name] + 1
        raise KeyError(name)


def analyse(model: onnx.ModelProto, batch: int = 1) -> GraphInfo:
    """Order the nodes and compute producers, last uses and crossing sets of `model`."""
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    nodes = _topological_order(list(graph.node), {i.name for i in graph.input} | init_names)
    specs = _tensor_specs(model, init_names)
    producer: dict[str, int] = {i.name: GRAPH_INPUT for i in graph.input if i.name not in init_names}
    last_use: dict[str, int] = {}
    node_weights: list[set[str]] = []
    for pos, node in enumerate(nodes):
        used = node_inputs(node)
        node_weights.append({t for t in used if t in init_names})
        for t in used:
            if t and t not in init_names:
                last_use[t] = pos
        for t in node.output:
            if t:
                producer[t] = pos
    n = len(nodes)
    output_names = [o.name for o in graph.output]
    for t in output_names:
        last_use[t] = n
    input_names = [i.name for i in graph.input if i.name not in init_names]
    info = GraphInfo(
        model=model, nodes=nodes, specs=specs,
        initializer_bytes={i.name: _initializer_bytes(i) for i in graph.initializer},
        node_weights=node_weights, producer=producer, last_use=last_use,
        input_names=input_names, output_names=output_names, batch=batch,
    )
    info._crossing = _crossing_sets(producer, last_use, n)
    return info


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope tensors its subgraphs (If/Loop/Scan) read."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names.extend(_outer_references(sub))
    return names


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
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


def _topological_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable: keeps the file's order wherever it is already valid."""
    produced_by = {t: i for i, node in enumerate(nodes) for t in node.output if t}
    deps = [
        {produced_by[t] for t in node_inputs(node) if t in produced_by and t not in available}
        for node in nodes
    ]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    import heapq

    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise UsageError("the model graph has a cycle; export it again from its framework")
    return [nodes[i] for i in order]


def _crossing_sets(producer: dict[str, int], last_use: dict[str, int], n: int) -> list[list[str]]:
    # A tensor crosses every cut k with producer < k <= last_use.
    cross: list[list[str]] = [[] for _ in range(n + 1)]
    for t, p in sorted(producer.items(), key=lambda kv: (kv[1], kv[0])):
        last = last_use.get(t)
        if last is None:
            continue
        for k in range(p + 1, last + 1):
            cross[k].append(t)
    return cross


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

