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


def shared_weights(layers: int = 4, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """What torch.onnx.export (dynamo=False) makes of shared layer weights: `Identity` nodes at
    the top of the graph hand one weight to every layer. Also weights reached only through
    Transpose, Cast (fp16 -> fp32), DequantizeLinear (int8) and Reshape: all constant-only ops."""
    rng = np.random.default_rng(seed)
    shared = _weight("shared", (width, width), rng)
    half = numpy_helper.from_array((rng.standard_normal((width, width)) * 0.3)
                                   .astype(np.float16), "half")
    quant = numpy_helper.from_array(rng.integers(-100, 100, (width, width)).astype(np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.003, dtype=np.float32), "q_scale")
    flat = numpy_helper.from_array((rng.standard_normal(width * width) * 0.3)
                                   .astype(np.float32), "flat")
    shape = numpy_helper.from_array(np.array([width, width], dtype=np.int64), "shape")
    nodes = [helper.make_node("Identity", ["shared"], [f"shared_{i}"], name=f"id{i}")
             for i in range(layers)]
    nodes += [
        helper.make_node("Transpose", ["shared"], ["shared_t"], name="transpose_w", perm=[1, 0]),
        helper.make_node("Cast", ["half"], ["half_f"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["q_f"], name="dequant_w"),
        helper.make_node("Reshape", ["flat", "shape"], ["flat_2d"], name="reshape_w"),
    ]
    x = "x"
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [x, f"shared_{i}"], [f"h{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Add", [f"r{i}", x], [f"s{i}"], name=f"add{i}"),
        ]
        x = f"s{i}"
    for j, w in enumerate(["shared_t", "half_f", "q_f", "flat_2d"]):
        nodes.append(helper.make_node("MatMul", [x, w], [f"t{j}"], name=f"tail{j}"))
        x = f"t{j}"
    nodes.append(helper.make_node("Tanh", [x], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                  [shared, half, quant, scale, flat, shape])


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Every tensor of `model` that depends on no graph input, found independently of the
    compiler: initializers, and outputs of nodes whose inputs are all such tensors."""
    constant = {i.name for i in model.graph.initializer}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if all(t in constant for t in node.input if t) and not set(node.output) <= constant:
                constant.update(node.output)
                changed = True
    return constant


def shape_ops(width: int = 8, seed: int = 0) -> onnx.ModelProto:
    """int64 shape tensors and a bool mask computed from the input, used several ops later, so
    cuts carry them: Shape -> Gather -> Concat -> Reshape, Greater -> Where."""
    rng = np.random.default_rng(seed)
    w = _weight("w", (width, width), rng)
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              [("zero", 0), ("minus1", [-1]), ("axes", [0])]]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["flat_shape"], name="concat", axis=0),
        helper.make_node("Greater", ["x", "zero_f"], ["mask"], name="greater"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["h2"], name="mm2"),
        helper.make_node("Where", ["mask", "h2", "x"], ["sel"], name="where"),
        helper.make_node("Reshape", ["sel", "flat_shape"], ["flat"], name="reshape"),
        helper.make_node("Relu", ["flat"], ["y"], name="relu_out"),
    ]
    consts.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["batch", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                  [w, *consts])
