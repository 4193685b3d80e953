"""Reading and cutting .tflite models, checked against the oracle (the whole .tflite under
LiteRT): every single cut of the small examples chains back to exactly the whole model (0.0
difference) in fp32, fp16 and int8; constant ops never become cut points; what defer cannot
cut is refused with one clear line.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.tflite_helpers import (
    MODES,
    SMALL_MODELS,
    need_tensorflow,
    run_slices,
    run_whole,
    sample_feeds,
    tflite_bytes,
)

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module", autouse=True)
def _tensorflow():
    need_tensorflow()


def _graph(name: str, mode: str):
    from defer.compiler.tflite import read_tflite

    return read_tflite(tflite_bytes(name, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_every_single_cut_chains_to_exactly_the_whole_model(name, mode):
    graph = _graph(name, mode)
    feeds = sample_feeds(graph)[0]
    reference = run_whole(graph, feeds)
    for k in range(1, graph.n_ops):
        got = run_slices(graph, [0, k, graph.n_ops], feeds)
        for output, want in reference.items():
            assert got[output].dtype == want.dtype
            np.testing.assert_array_equal(got[output], want, err_msg=f"{name} {mode} cut {k}")


@pytest.mark.parametrize("mode", MODES)
def test_three_stage_chain_on_several_samples_equals_the_whole_model(mode):
    graph = _graph("densenet_tiny", mode)
    n = graph.n_ops
    bounds = [0, n // 3, 2 * n // 3, n]
    for feeds in sample_feeds(graph, count=3, seed=1):
        reference = run_whole(graph, feeds)
        got = run_slices(graph, bounds, feeds)
        for output, want in reference.items():
            np.testing.assert_array_equal(got[output], want)


def test_signature_names_are_the_keras_input_and_output_names():
    graph = _graph("multi_io", "fp32")
    assert graph.input_names == ["image", "vector"]
    assert graph.output_names == ["logits", "regression"]
    assert graph.specs["logits"].shape == (None, 10)
    assert graph.specs["image"].dtype == "float32"


@pytest.mark.parametrize("mode", MODES)
def test_names_are_unique_and_crossing_sets_hold_no_constants(mode):
    graph = _graph("densenet_tiny", mode)
    assert len(set(graph.names.values())) == len(graph.names)
    assert graph.crossing(0) == graph.input_names
    assert graph.crossing(graph.n_ops) == graph.output_names
    for k in range(graph.n_ops + 1):
        for t in graph.crossing_tensors(k):
            assert t in graph.tensors  # constants and constant-op outputs have no spec
            assert graph.producer[t] < k <= graph.last_use[t]
        assert graph.crossing_bytes(k) == sum(graph.tensor_bytes(t) for t in graph.crossing(k))
    # DenseNet: each layer reads every earlier feature map of its block.
    assert max(len(graph.crossing(k)) for k in range(graph.n_ops)) >= 4


def test_fp16_weight_dequantize_ops_attach_to_their_consumers():
    fp32, fp16 = _graph("tiny_cnn", "fp32"), _graph("tiny_cnn", "fp16")
    operators = fp16.subgraph.operators
    dequantize = [i for i, op in enumerate(operators)
                  if fp16.model.operatorCodes[op.opcodeIndex].builtinCode == 6]  # DEQUANTIZE
    assert dequantize, "the fp16 model should dequantize its weights"
    assert [op.op_type for op in fp16.ops] == [op.op_type for op in fp32.ops]
    assert sorted(i for op in fp16.ops for i in op.attached) == dequantize
    conv = next(op for op in fp16.ops if op.op_type == "CONV_2D")
    assert conv.attached  # its fp16 filter (and bias) come with it
    assert fp16.weight_bytes(0, fp16.n_ops) < 0.6 * fp32.weight_bytes(0, fp32.n_ops)


def test_int8_crossing_tensors_are_int8_with_scale_and_zero_point():
    graph = _graph("tiny_cnn", "int8")
    assert [graph.specs[n].dtype for n in graph.input_names] == ["float32"]
    inner = [graph.tensors[t] for k in range(2, graph.n_ops - 1)
             for t in graph.crossing_tensors(k)]
    activations = [s for s in inner if s.dtype != "int32"]  # int32: Flatten's Shape
    assert activations and all(s.dtype == "int8" and s.quant is not None for s in activations)
    scale, zero_point = activations[0].quant
    assert scale > 0 and -128 <= zero_point <= 127
    fp32 = _graph("tiny_cnn", "fp32")
    after_conv = [g.position_of(next(op.name for op in g.ops if op.op_type == "CONV_2D"))
                  for g in (graph, fp32)]
    assert graph.crossing_bytes(after_conv[0]) * 4 == fp32.crossing_bytes(after_conv[1])


def test_a_slice_keeps_only_the_buffers_it_needs():
    graph = _graph("tiny_cnn", "fp32")
    whole = len(graph.data)
    parts = [len(graph.slice(k, k + 1)) for k in range(graph.n_ops)]
    assert sum(parts) < whole * 1.1  # each weight lives in exactly one slice
    assert len(graph.slice(0, 1)) < whole / 10
    assert graph.weight_bytes(0, graph.n_ops) == sum(graph.buffer_bytes[b] for b in
                                                     set().union(*graph.op_weights))


def test_position_of_op_and_tensor_names():
    graph = _graph("tiny_cnn", "fp32")
    for k, op in enumerate(graph.ops):
        assert graph.position_of(op.name) == k + 1
    first_output = graph.names[graph.op_outputs(1)[0]]
    assert graph.position_of(first_output) == 2
    with pytest.raises(KeyError):
        graph.position_of("no such op")


def test_time_ops_and_estimate_give_a_cost_per_op():
    graph = _graph("tiny_cnn", "fp32")
    times = graph.time_ops(runs=3, warmup=1)
    timed = times.seconds
    estimated = graph.estimate_costs()
    assert 0 < times.io_seconds_per_byte < 1e-8  # copies run faster than 100 MB/s
    cut_bytes = np.array([graph.crossing_bytes(k) for k in range(graph.n_ops + 1)])
    enter, leave = times.boundary(cut_bytes)
    assert enter[0] == leave[-1] == 0 and enter[1] == leave[1] > 0
    assert timed.shape == estimated.shape == (graph.n_ops,)
    assert np.all(timed > 0) and np.all(estimated > 0)
    conv = [k for k, op in enumerate(graph.ops) if op.op_type == "CONV_2D"]
    reshape = [k for k, op in enumerate(graph.ops) if op.op_type == "RESHAPE"]
    assert min(estimated[conv]) > max(estimated[reshape])


def test_slice_bounds_are_checked():
    from defer.errors import PlanError

    graph = _graph("tiny_cnn", "fp32")
    for a, b in ((0, 0), (3, 2), (0, graph.n_ops + 1), (-1, 2)):
        with pytest.raises(PlanError):
            graph.slice(a, b)


def test_operator_table_describes_every_operator_by_name():
    graph = _graph("tiny_cnn", "fp16")
    table = graph.operator_table()
    assert len(table) == len(graph.subgraph.operators)
    names = [name for name, *_ in table]
    assert len(set(names)) == len(names)
    written = {t for *_, outputs, _ in table for t in outputs}
    known = set(graph.specs) | set(graph.constant_bytes) | written
    assert all(t in known for _, _, inputs, _, _ in table for t in inputs)
    regular = {op.index for op in graph.ops}
    assert [row[0] for row in table if row[4] in regular] == [op.name for op in graph.ops]
    assert {row[1] for row in table if row[4] not in regular} == {"DEQUANTIZE"}
    assert sum(graph.constant_bytes.values()) == graph.weight_bytes(0, graph.n_ops)


def test_any_execution_order_of_operator_groups_slices_and_times():
    from defer.compiler.tflite.costs import time_groups
    from defer.compiler.tflite.slicer import slice_operators
    from defer.engines.litert import LiteRTEngine

    graph = _graph("multi_io", "fp32")
    vector = graph.index_of["vector"]
    branch = next(k for k, op in enumerate(graph.ops)
                  if vector in graph.subgraph.operators[op.index].inputs)
    assert branch > 0
    order = [branch, *(k for k in range(graph.n_ops) if k != branch)]  # vector branch first
    groups = [graph.operator_indices(k, k + 1) for k in order]
    costs = time_groups(graph, groups, runs=2, warmup=1).seconds
    assert costs.shape == (graph.n_ops,) and np.all(costs > 0)
    out = graph.names[graph.op_outputs(branch)[0]]
    engine = LiteRTEngine(slice_operators(graph, groups[0], ["vector"], [out]))
    assert [s.name for s in engine.inputs] == ["vector"] and engine.outputs[0].name == out
    feeds = sample_feeds(graph)[0]
    alone = engine.run([out], {"vector": feeds["vector"]})[0]
    in_chain = LiteRTEngine(graph.slice(0, branch + 1, outputs=[graph.index_of[out]]))
    np.testing.assert_array_equal(alone, in_chain.run([out], feeds)[0])
