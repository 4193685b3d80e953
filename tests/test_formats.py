"""What exporters write: external data, local functions, opsets 13-21, int64/bool shape
tensors crossing cuts, dynamic batch dims, bundles past the protobuf limit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from defer.compiler import compile_model, load_model
from defer.compiler.export import write_bundles
from defer.engines.onnx import make_session
from defer.fidelity import compare, run_chain
from defer.manifest import load_manifest, sha256_file
from tests.onnx_graphs import residual_mlp, shape_ops, shared_weights


def _matches(model: onnx.ModelProto, manifest, batch: int = 3, tolerance: float = 1e-5):
    rng = np.random.default_rng(2)
    feeds = {t.name: rng.standard_normal(t.concrete_shape(batch)).astype(np.float32)
             for t in manifest.inputs}
    names = [o.name for o in model.graph.output]
    reference = dict(zip(names, make_session(model.SerializeToString()).run(names, feeds)))
    assert compare(run_chain(manifest, feeds), reference).max_rel <= tolerance


def test_external_data_model_loads_and_compiles(tmp_path):
    model = residual_mlp(blocks=3, width=64)
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), path,
                    save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    manifest = compile_model(path, 3, tmp_path / "out", profile=False)
    _matches(model, manifest)
    for stage in manifest.stages:  # small bundles are self-contained
        assert stage.data_file == "" and not (tmp_path / "out" / f"{stage.file}.data").exists()


def test_big_bundles_keep_weights_outside_and_hash_both(tmp_path):
    model = residual_mlp(blocks=3, width=64)
    manifest = compile_model(model, 2, tmp_path / "out", profile=False)
    from defer.compiler import analyse
    from defer.compiler.export import stage_model

    info = analyse(load_model(model).model)
    bundles = [stage_model(info, a, b, i)[0] for i, (a, b) in
               enumerate(zip(manifest.plan["bounds"][:-1], manifest.plan["bounds"][1:]))]
    write_bundles(tmp_path / "ext", bundles, manifest, external_above=1000)
    again = load_manifest(tmp_path / "ext")
    for stage in again.stages:
        data = tmp_path / "ext" / stage.data_file
        assert stage.data_file == f"{stage.file}.data" and data.exists()
        assert stage.data_sha256 == sha256_file(data)
        assert stage.sha256 == sha256_file(tmp_path / "ext" / stage.file)
    _matches(model, again)


def test_local_functions_are_inlined(tmp_path):
    body = [helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Relu", ["m"], ["o"])]
    fn = helper.make_function("local", "Dense", ["a", "w"], ["o"], body,
                              [helper.make_opsetid("", 17)])
    base = residual_mlp(blocks=1, width=8)
    nodes = [helper.make_node("Dense", ["x", "w0a"], [f"d{i}"], name=f"dense{i}",
                              domain="local") for i in range(1)]
    nodes += [helper.make_node("Dense", ["d0", "w0b"], ["d1"], name="dense1", domain="local"),
              helper.make_node("Dense", ["d1", "w0a"], ["y"], name="dense2", domain="local")]
    graph = helper.make_graph(nodes, "f", list(base.graph.input),
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["batch", 8])],
                              list(base.graph.initializer)[:2])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    loaded = load_model(model)
    assert not loaded.model.functions and {n.op_type for n in loaded.model.graph.node} == {
        "MatMul", "Relu"}
    manifest = compile_model(loaded, 3, tmp_path, profile=False)
    _matches(model, manifest)


@pytest.mark.parametrize("opset", [13, 15, 18, 21])
def test_opsets_13_to_21(tmp_path, opset):
    model = shared_weights(layers=3)
    model.opset_import[0].version = opset
    model.ir_version = 7 if opset < 15 else (8 if opset < 19 else 10)
    onnx.checker.check_model(model)
    manifest = compile_model(model, 3, tmp_path, profile=False)
    assert manifest.model["opset"] == opset
    _matches(model, manifest)


def test_int64_and_bool_tensors_cross_every_cut(tmp_path):
    model = shape_ops()
    n_ops = len(model.graph.node)
    manifest = compile_model(model, n_ops, tmp_path, profile=False, strategy="layers")
    crossing = {t.dtype for s in manifest.stages[:-1] for t in [*s.outputs, *s.forward]}
    assert {"int64", "bool"} <= crossing
    _matches(model, manifest, batch=3)


def test_dynamic_batch_stays_dynamic(tmp_path):
    # Shape inference cannot follow this Reshape (its shape is computed), so the compiler reads
    # shapes from runs at batch 1 and 2: the batch dim must stay dynamic in every bundle.
    manifest = compile_model(shape_ops(), 4, tmp_path, profile=False)
    for stage in manifest.stages:
        for spec in [*stage.inputs, *stage.outputs]:
            assert not isinstance(spec.shape[0], int) or spec.shape[0] != 1, spec
    _matches(shape_ops(), manifest, batch=5)
