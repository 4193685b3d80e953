"""The op order: every candidate is a valid topological order; `auto` keeps the most compact;
OpType#k names the k-th op of the file whatever the order."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from defer.compiler import analyse, compile_model, load_model, resolve_cuts
from defer.compiler.order import ORDERS
from tests.onnx_graphs import dense_chain, multi_io


def branches(n_branches: int = 3, depth: int = 3, width: int = 32) -> onnx.ModelProto:
    """Inception-like: branches written breadth first in the file (layer 1 of every branch,
    then layer 2 ...), so the file order keeps every branch alive at once."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((width, width)) * 0.2).astype(np.float32),
                                "w")
    nodes, heads = [], ["x"] * n_branches
    for d in range(depth):
        for b in range(n_branches):
            nodes.append(helper.make_node("MatMul", [heads[b], "w"], [f"b{b}_{d}"],
                                          name=f"b{b}_{d}"))
            heads[b] = f"b{b}_{d}"
    nodes.append(helper.make_node("Concat", heads, ["y"], name="concat", axis=1))
    graph = helper.make_graph(
        nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width * n_branches])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _valid(info) -> bool:
    seen = set(info.input_names) | set(info.constant_bytes)
    for op in info.ops:
        for c in op.attached:
            seen.update(info.const_ops[c].outputs)
        if not all(t in seen for t in op.inputs):
            return False
        seen.update(op.outputs)
    return True


def test_every_order_is_topological_and_auto_is_the_most_compact():
    for make in (branches, dense_chain, multi_io):
        model = load_model(make()).model
        infos = {name: analyse(model, order=name) for name in ORDERS}
        assert all(_valid(info) for info in infos.values())
        area = {name: float(info.cut_bytes().sum()) for name, info in infos.items()}
        assert area["auto"] == min(area.values())


def test_depth_first_beats_a_breadth_first_file():
    model = load_model(branches()).model
    file, auto = analyse(model, order="file"), analyse(model, order="auto")
    assert auto.order != "file"
    assert auto.cut_bytes().sum() < file.cut_bytes().sum()
    assert auto.cut_bytes()[2] < file.cut_bytes()[2]  # one branch at a time: x + 1 live


def test_the_chosen_order_is_recorded_and_verifies(tmp_path):
    manifest = compile_model(branches(), 3, tmp_path, profile=False, order="auto")
    assert manifest.plan["op_order"] in ("depth", "greedy")
    file_plan = compile_model(branches(), 3, tmp_path / "file", profile=False, order="file")
    assert manifest.plan["wire_bytes"] <= file_plan.plan["wire_bytes"]


def test_op_type_k_counts_in_file_order():
    model = load_model(branches()).model
    info = analyse(model, order="depth")
    # The 2nd MatMul of the file is b1_0, wherever the chosen order put it.
    assert resolve_cuts(info, ["MatMul#2"]) == [info.position_of("b1_0")]
