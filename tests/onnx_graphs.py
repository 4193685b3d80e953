"""Tiny ONNX models built with onnx.helper, seeded, for compiler and runtime tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def residual_mlp(width: int = 16, blocks: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x -> [MatMul, Relu, MatMul, Add(skip)] * blocks -> MatMul -> y. Skips cross cuts."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for b in range(blocks):
        inits += [_weight(f"w{b}a", (width, width), rng), _weight(f"w{b}b", (width, width), rng)]
        nodes += [
            helper.make_node("MatMul", [x, f"w{b}a"], [f"h{b}a"], name=f"mm{b}a"),
            helper.make_node("Relu", [f"h{b}a"], [f"r{b}"], name=f"relu{b}"),
            helper.make_node("MatMul", [f"r{b}", f"w{b}b"], [f"h{b}b"], name=f"mm{b}b"),
            helper.make_node("Add", [f"h{b}b", x], [f"s{b}"], name=f"add{b}"),
        ]
        x = f"s{b}"
    inits.append(_weight("wout", (width, 4), rng))
    nodes.append(helper.make_node("MatMul", [x, "wout"], ["y"], name="head"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)


def multi_io(seed: int = 0) -> onnx.ModelProto:
    """Two inputs, two outputs; output `early` is produced in the first layer (forwarded)."""
    rng = np.random.default_rng(seed)
    inits = [_weight("wa", (8, 8), rng), _weight("wb", (6, 8), rng), _weight("wc", (8, 3), rng)]
    nodes = [
        helper.make_node("MatMul", ["a", "wa"], ["ha"], name="mma"),
        helper.make_node("Tanh", ["ha"], ["early"], name="tanh"),
        helper.make_node("MatMul", ["b", "wb"], ["hb"], name="mmb"),
        helper.make_node("Relu", ["hb"], ["rb"], name="relub"),
        helper.make_node("Mul", ["early", "rb"], ["m"], name="mul"),
        helper.make_node("Sigmoid", ["m"], ["sm"], name="sig"),
        helper.make_node("MatMul", ["sm", "wc"], ["late"], name="mmc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("late", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("early", TensorProto.FLOAT, ["batch", 8])],
        inits)


def dense_chain(layers: int = 5, width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """DenseNet-style: every layer reads the concat of the input and all previous outputs."""
    rng = np.random.default_rng(seed)
    nodes, inits, features = [], [], ["x"]
    for i in range(layers):
        concat = f"cat{i}"
        nodes.append(helper.make_node("Concat", features, [concat], name=f"concat{i}", axis=1))
        inits.append(_weight(f"w{i}", (width * (i + 1), width), rng))
        nodes.append(helper.make_node("MatMul", [concat, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"f{i}"], name=f"relu{i}"))
        features.append(f"f{i}")
    nodes.append(helper.make_node("Concat", features, ["y"], name="concat_out", axis=1))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                 ["batch", width * (layers + 1)])], inits)
