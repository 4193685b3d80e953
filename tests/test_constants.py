"""No constant ever crosses a cut: weights and values computed only from weights (Identity,
Transpose, Cast, DequantizeLinear, Reshape of a weight) go with the ops that consume them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from defer.compiler import analyse, compile_model, load_model
from defer.compiler.verify import constant_sends
from defer.engines.onnx import make_session
from defer.fidelity import compare, run_chain
from tests.onnx_graphs import constant_tensors, shared_weights


def _check_chain(model: onnx.ModelProto, manifest, batch: int = 2, tolerance: float = 1e-5):
    """Only activations cross, by two independent checks, and the chain equals the model."""
    constant = constant_tensors(model)
    for stage in manifest.stages:
        assert not constant & set(stage.receives), stage.index
        if stage.index < len(manifest.stages) - 1:  # the last one returns the model outputs
            assert not constant & set(stage.sends), stage.index
    assert constant_sends(manifest) == [set()] * len(manifest.stages)
    rng = np.random.default_rng(1)
    feeds = {t.name: rng.standard_normal(t.concrete_shape(batch)).astype(np.float32)
             for t in manifest.inputs}
    names = [o.name for o in model.graph.output]
    reference = dict(zip(names, make_session(model.SerializeToString()).run(names, feeds)))
    assert compare(run_chain(manifest, feeds), reference).max_rel <= tolerance


def test_constant_only_ops_are_attached_not_ordered():
    info = analyse(load_model(shared_weights(layers=4)).model)
    assert sorted(op.op_type for op in info.const_ops) == sorted(
        ["Identity"] * 4 + ["Transpose", "Cast", "DequantizeLinear", "Reshape"])
    assert all(op.op_type not in ("Identity", "Cast") for op in info.ops)
    crossing = {t for k in range(info.n_ops + 1) for t in info.crossing(k)}
    assert not crossing & constant_tensors(info.model)
    mm1 = next(op for op in info.ops if op.name == "mm1")
    assert mm1.weights == {"shared"} and [info.const_ops[c].name for c in mm1.attached] == ["id1"]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_shared_weights_never_cross(tmp_path, n):
    model = shared_weights(layers=6)
    manifest = compile_model(model, n, tmp_path, profile=False)
    _check_chain(model, manifest)
    # The one shared weight is counted in every stage that uses it, once per stage.
    uses = [s for s in manifest.stages if s.weight_bytes >= 16 * 16 * 4]
    assert len(uses) >= 2


def test_inspect_flags_a_constant_that_crosses(tmp_path):
    from click.testing import CliRunner

    from defer.cli import main

    manifest = compile_model(shared_weights(layers=2), 3, tmp_path, profile=False)
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert shown.exit_code == 0 and "only activations cross the cuts" in shown.output
    # Tamper: make stage 0 send a weight it holds, as the old compiler did.
    bundle = onnx.load(manifest.bundle_path(0))
    bundle.graph.output.append(helper.make_tensor_value_info("shared", TensorProto.FLOAT,
                                                             [16, 16]))
    bundle.graph.node.append(helper.make_node("Identity", ["shared"], ["leak"], name="leak"))
    bundle.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, [16, 16]))
    onnx.save(bundle, manifest.bundle_path(0))
    from defer.tensors import TensorSpec

    manifest.stages[0].outputs.append(TensorSpec("leak", "float32", (16, 16)))
    manifest.save(manifest.path)
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert "leak" in shown.output and "NOT AN ACTIVATION" in shown.output
    assert "1 crossing tensor(s) are not activations" in shown.output


def test_a_constant_model_output_is_made_by_the_last_stage(tmp_path):
    model = shared_weights(layers=2)
    model.graph.output.append(helper.make_tensor_value_info("shared_t", TensorProto.FLOAT,
                                                            [16, 16]))
    manifest = compile_model(model, 3, tmp_path, profile=False)
    assert "shared_t" in [t.name for t in manifest.stages[-1].outputs]
    assert all("shared_t" not in s.receives for s in manifest.stages)


# --- property: random DAGs with constant-only subgraphs -------------------------------------

_CONST_OPS = ["Identity", "Transpose", "Neg", "Add", "Mul"]
_ACT_OPS = ["Relu", "Tanh", "Add", "Mul", "MatMul", "Sub"]


@st.composite
def random_dags(draw):
    """x (batch, 4) -> random ops over earlier activations and constant-derived tensors;
    constant-only ops sit at the top of the file (like torch's exporter) or among the rest."""
    width = 4
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.5)
                                     .astype(np.float32), f"w{i}")
             for i in range(draw(st.integers(1, 3)))]
    consts = [i.name for i in inits]
    const_nodes, act_nodes, acts = [], [], ["x"]
    for i in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(_CONST_OPS))
        args = [draw(st.sampled_from(consts)) for _ in range(2 if op in ("Add", "Mul") else 1)]
        attrs = {"perm": [1, 0]} if op == "Transpose" else {}
        const_nodes.append(helper.make_node(op, args, [f"c{i}"], name=f"const{i}", **attrs))
        consts.append(f"c{i}")
    for i in range(draw(st.integers(2, 10))):
        op = draw(st.sampled_from(_ACT_OPS))
        a = draw(st.sampled_from(acts[-4:]))
        args = [a] if op in ("Relu", "Tanh") else [
            a, draw(st.sampled_from(consts if op == "MatMul" else acts))]
        act_nodes.append(helper.make_node(op, args, [f"a{i}"], name=f"act{i}"))
        acts.append(f"a{i}")
    nodes = const_nodes + act_nodes if draw(st.booleans()) else _interleave(
        const_nodes, act_nodes, draw(st.randoms()))
    outputs = [acts[-1], *([draw(st.sampled_from(acts[1:-1]))] if len(acts) > 3 else [])]
    if draw(st.booleans()) and len(consts) > len(inits):
        outputs.append(consts[-1])  # a constant-only model output
    spec = ["batch", width]
    graph = helper.make_graph(
        nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec)],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, spec if t in acts else [width, width])
         for t in dict.fromkeys(outputs)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, draw(st.integers(1, 5)), draw(st.sampled_from(["balanced", "layers"]))


def _interleave(consts, acts, random):
    """Constant nodes placed anywhere before their first reader (the file stays topological)."""
    nodes = list(acts)
    for node in reversed(consts):
        readers = [i for i, n in enumerate(nodes) if set(node.output) & set(n.input)]
        nodes.insert(random.randint(0, readers[0] if readers else len(nodes)), node)
    return nodes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_dags())
def test_random_dags_never_carry_a_constant(tmp_path, case):
    model, n, strategy = case
    onnx.checker.check_model(model)
    n_ops = analyse(load_model(model).model).n_ops
    manifest = compile_model(model, min(n, n_ops), tmp_path / "out", profile=False,
                             strategy=strategy)
    _check_chain(model, manifest)
