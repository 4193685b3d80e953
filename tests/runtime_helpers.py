"""Shared helpers for the runtime tests: tiny ONNX models built with onnx.helper, compiled with
profile=False, and an in-process reference run. Node processes are started with
defer.local.start_node, which waits on the ready line (never a sleep).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from defer.codecs import decode_tensor, encode_tensor
from defer.compiler import compile_model
from defer.engines.onnx import make_session
from defer.manifest import Manifest, load_manifest

OPSET = [helper.make_opsetid("", 17)]


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def residual_mlp(width: int = 16) -> onnx.ModelProto:
    """x -> relu(x W1) = r1 -> relu(r1 W2) + r1 = s -> relu(s W3) + s = y. Cut after relu1 and
    mm2, stage 1 forwards r1 untouched to stage 2."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             node("Relu", ["h1"], ["r1"], name="relu1"),
             node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
             node("Relu", ["h2"], ["r2"], name="relu2"),
             node("Add", ["r2", "r1"], ["s"], name="res1"),
             node("MatMul", ["s", "w3"], ["h3"], name="mm3"),
             node("Relu", ["h3"], ["r3"], name="relu3"),
             node("Add", ["r3", "s"], ["y"], name="res2")]
    graph = helper.make_graph(
        nodes, "residual_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [_weight(rng, f"w{i}", (width, width)) for i in (1, 2, 3)])
    return helper.make_model(graph, opset_imports=OPSET)


def two_in_two_out() -> onnx.ModelProto:
    """Inputs a (float) and b (int64), outputs sum (float) and count (int64)."""
    rng = np.random.default_rng(1)
    node = helper.make_node
    nodes = [node("MatMul", ["a", "w"], ["aw"], name="mm"),
             node("Relu", ["aw"], ["r"], name="relu"),
             node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT, name="cast"),
             node("Add", ["r", "bf"], ["sum"], name="add"),
             node("Add", ["b", "b"], ["count"], name="double")]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [1, 8])],
        [_weight(rng, "w", (8, 8))])
    return helper.make_model(graph, opset_imports=OPSET)


def shift_chain(n: int = 3, width: int = 64) -> onnx.ModelProto:
    """y = x + 1 + 2 + ... : every stage is 1-Lipschitz, so k lossy hops of tolerance t keep
    |y - y_exact| <= k t (plus float rounding)."""
    node = helper.make_node
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(np.full((1, width), i + 1.0, np.float32), f"c{i}"))
        out = "y" if i == n - 1 else f"t{i}"
        nodes.append(node("Add", [prev, f"c{i}"], [out], name=f"add{i}"))
        prev = out
    graph = helper.make_graph(
        nodes, "shift_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=OPSET)


def compile_tiny(model: onnx.ModelProto, out_dir: Path, n_stages: int = 3,
                 cuts: tuple[str, ...] = ()) -> Manifest:
    """Compile with the FLOP estimate (fast) and save the whole model next to the bundles."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "whole.onnx"))
    compile_model(out_dir / "whole.onnx", None if cuts else n_stages, out_dir, cuts=cuts,
                  profile=False)
    return load_manifest(out_dir)


def reference(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> list[dict]:
    """Whole-model outputs, one onnxruntime session at the nodes' settings."""
    session = make_session(model.SerializeToString(), 1)
    names = [o.name for o in model.graph.output]
    return [dict(zip(names, session.run(names, s))) for s in samples]


def simulate_chain(manifest: Manifest, sample: dict[str, np.ndarray], codec: str) -> dict:
    """The chain in one process, every hop through `codec`: what the nodes must reproduce."""
    sessions = [make_session(str(manifest.bundle_path(s.index)), 1) for s in manifest.stages]
    hop = {k: decode_tensor(encode_tensor(k, v, codec)) for k, v in sample.items()}
    for stage, session in zip(manifest.stages, sessions):
        names = [t.name for t in stage.outputs]
        produced = dict(zip(names, session.run(names, {t.name: hop[t.name]
                                                       for t in stage.inputs})))
        produced = {k: decode_tensor(encode_tensor(k, v, codec)) for k, v in produced.items()}
        hop = {n: produced[n] if n in produced else hop[n] for n in stage.sends}
    return hop
