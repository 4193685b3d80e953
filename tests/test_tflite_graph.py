"""Reading, analysing and cutting .tflite models, checked against the oracle (the whole .tflite
under LiteRT): every single cut of the small examples chains back to exactly the whole model
(0.0 difference) in fp32, fp16 and int8, in every candidate op order; constant ops never
become cut points; names, crossing sets, slices and op timing hold what the compiler needs.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.tflite_helpers import (
    MODES,
    SMALL_MODELS,
    info_of,
    need_tensorflow,
    run_slices,
    run_whole,
    sample_feeds,
)

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module", autouse=True)
def _tensorflow():
    need_tensorflow()


def _chains_exactly_at_every_cut(graph, info, label: str) -> None:
    feeds = sample_feeds(graph)[0]
    reference = run_whole(graph, feeds)
    for k in range(1, info.n_ops):
        got = run_slices(info, [0, k, info.n_ops], feeds)
        for output, want in reference.items():
            assert got[output].dtype == want.dtype
            np.testing.assert_array_equal(got[output], want, err_msg=f"{label} cut {k}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_every_single_cut_chains_to_exactly_the_whole_model(name, mode):
    graph, info = info_of(name, mode)
    _chains_exactly_at_every_cut(graph, info, f"{name} {mode}")


@pytest.mark.parametrize(("name", "mode"), [("multi_io", "int8"), ("densenet_tiny", "fp16")])
def test_every_candidate_op_order_chains_exactly(name, mode):
    from defer.compiler.graph import analyse_orders
    from defer.compiler.tflite import analyse, read_tflite
    from tests.tflite_helpers import tflite_bytes

    graph = read_tflite(tflite_bytes(name, mode))
    infos = analyse_orders(graph, 1, "auto", analyse)
    assert infos[0].order == "file" and len({i.order for i in infos}) == len(infos)
    for info in infos:
        _chains_exactly_at_every_cut(graph, info, f"{name} {mode} {info.order}")


@pytest.mark.parametrize("mode", MODES)
def test_three_stage_chain_on_several_samples_equals_the_whole_model(mode):
    graph, info = info_of("densenet_tiny", mode)
    n = info.n_ops
    bounds = [0, n // 3, 2 * n // 3, n]
    for feeds in sample_feeds(graph, count=3, seed=1):
        reference = run_whole(graph, feeds)
        got = run_slices(info, bounds, feeds)
        for output, want in reference.items():
            np.testing.assert_array_equal(got[output], want)


def test_signature_names_are_the_keras_input_and_output_names():
    graph, info = info_of("multi_io")
    assert graph.input_names == info.input_names == ["image", "vector"]
    assert graph.output_names == info.output_names == ["logits", "regression"]
    assert graph.specs["logits"].shape == (None, 10)
    assert graph.specs["image"].dtype == "float32"


@pytest.mark.parametrize("mode", MODES)
def test_names_are_unique_and_crossing_sets_hold_no_constants(mode):
    graph, info = info_of("densenet_tiny", mode)
    assert len(set(graph.names.values())) == len(graph.names)
    assert info.crossing(0) == graph.input_names
    assert info.crossing(info.n_ops) == graph.output_names
    for k in range(info.n_ops + 1):
        for t in info.crossing(k):
            assert t in graph.specs and t not in graph.constant_bytes
            assert info.producer[t] < k <= info.last_use[t]
        assert info.crossing_bytes(k) == sum(info.tensor_bytes(t) for t in info.crossing(k))
    # DenseNet: each layer reads every earlier feature map of its block.
    assert max(len(info.crossing(k)) for k in range(info.n_ops)) >= 4


def test_fp16_weight_dequantize_ops_attach_to_their_consumers():
    (_, fp32), (fp16_graph, fp16) = info_of("tiny_cnn", "fp32"), info_of("tiny_cnn", "fp16")
    assert fp16.const_ops and {op.op_type for op in fp16.const_ops} == {"DEQUANTIZE"}
    assert len(fp16.const_ops) < len(fp16_graph.subgraph.operators)
    assert [op.op_type for op in fp16.ops] == [op.op_type for op in fp32.ops]
    conv = next(op for op in fp16.ops if op.op_type == "CONV_2D")
    assert conv.attached  # its fp16 filter (and bias) come with it

    def weights(info):
        return sum(info.constant_bytes[w] for w in info.stage_weights(0, info.n_ops))

    assert weights(fp16) < 0.6 * weights(fp32)


def test_int8_crossing_tensors_are_int8_with_scale_and_zero_point():
    (_, info), (_, fp32) = info_of("tiny_cnn", "int8"), info_of("tiny_cnn", "fp32")
    assert [info.specs[n].dtype for n in info.input_names] == ["float32"]
    inner = [info.specs[t] for k in range(2, info.n_ops - 1) for t in info.crossing(k)]
    activations = [s for s in inner if s.dtype != "int32"]  # int32: Flatten's Shape
    assert activations and all(s.dtype == "int8" and s.quant is not None for s in activations)
    scale, zero_point = activations[0].quant
    assert scale > 0 and -128 <= zero_point <= 127
    after_conv = [i.position_of(next(op.name for op in i.ops if op.op_type == "CONV_2D"))
                  for i in (info, fp32)]
    assert info.crossing_bytes(after_conv[0]) * 4 == fp32.crossing_bytes(after_conv[1])


def test_a_slice_keeps_only_the_buffers_it_needs():
    from defer.compiler.tflite import stage_bundle

    graph, info = info_of("tiny_cnn")
    whole = len(graph.data)
    parts = [len(stage_bundle(info, k, k + 1, k)[0]) for k in range(info.n_ops)]
    assert sum(parts) < whole * 1.1  # each weight lives in exactly one slice
    assert parts[0] < whole / 10
    bundle, spec = stage_bundle(info, 0, info.n_ops, 0)
    assert spec.format == "tflite" and spec.file == "bundle_0.tflite"
    assert spec.weight_bytes == sum(graph.constant_bytes.values())


def test_position_of_op_and_tensor_names():
    _, info = info_of("tiny_cnn")
    for k, op in enumerate(info.ops):
        assert info.position_of(op.name) == k + 1
    assert info.position_of(info.ops[1].outputs[0]) == 2
    with pytest.raises(KeyError):
        info.position_of("no such op")


def test_time_ops_and_estimate_give_a_cost_per_op():
    from defer.compiler.tflite import estimate_costs, time_ops

    _, info = info_of("tiny_cnn")
    times = time_ops(info, runs=3, warmup=1)
    timed, estimated = times.costs(info), estimate_costs(info)
    assert 0 < times.io_seconds_per_byte < 1e-8  # copies run faster than 100 MB/s
    assert timed.enter[0] == timed.leave[-1] == 0 and timed.enter[1] == timed.leave[1] > 0
    assert timed.node.shape == estimated.node.shape == (info.n_ops,)
    assert np.all(timed.node > 0) and np.all(estimated.node > 0)
    conv = [k for k, op in enumerate(info.ops) if op.op_type == "CONV_2D"]
    reshape = [k for k, op in enumerate(info.ops) if op.op_type == "RESHAPE"]
    assert min(estimated.node[conv]) > max(estimated.node[reshape])


def test_one_timing_prices_every_op_order():
    from defer.compiler.tflite import analyse, time_ops

    graph, info = info_of("multi_io")
    greedy = analyse(graph, order="greedy")
    times = time_ops(info, runs=2, warmup=1)
    by_name = dict(zip([op.name for op in info.ops], times.costs(info).node))
    assert [by_name[op.name] for op in greedy.ops] == list(times.costs(greedy).node)


def test_slice_bounds_are_checked():
    from defer.compiler.tflite import stage_bundle
    from defer.errors import PlanError

    _, info = info_of("tiny_cnn")
    for a, b in ((0, 0), (3, 2), (0, info.n_ops + 1), (-1, 2)):
        with pytest.raises(PlanError):
            stage_bundle(info, a, b, 0)


def test_operator_table_describes_every_operator_by_name():
    graph, info = info_of("tiny_cnn", "fp16")
    table = graph.operator_table()
    assert len(table) == len(graph.subgraph.operators)
    names = [name for name, *_ in table]
    assert len(set(names)) == len(names)
    written = {t for *_, outputs, _ in table for t in outputs}
    known = set(graph.specs) | set(graph.constant_bytes) | written
    assert all(t in known for _, _, inputs, _, _ in table for t in inputs)
    assert [op.name for op in info.ops] == [row[0] for row in table if row[1] != "DEQUANTIZE"]


def test_any_execution_order_of_operator_groups_slices_and_times():
    from defer.compiler.tflite.costs import time_groups
    from defer.compiler.tflite.slicer import slice_operators, stage_operators
    from defer.engines.litert import LiteRTEngine

    graph, info = info_of("multi_io")
    branch = next(k for k, op in enumerate(info.ops) if "vector" in op.inputs)
    assert branch > 0
    order = [branch, *(k for k in range(info.n_ops) if k != branch)]  # vector branch first
    groups = [stage_operators(info, k, k + 1) for k in order]
    costs, io_rate = time_groups(graph, groups, runs=2, warmup=1)
    assert costs.shape == (info.n_ops,) and np.all(costs > 0) and io_rate > 0
    out = info.ops[branch].outputs[0]
    engine = LiteRTEngine(slice_operators(graph, groups[0], ["vector"], [out]))
    assert [s.name for s in engine.inputs] == ["vector"] and engine.outputs[0].name == out
    feeds = sample_feeds(graph)[0]
    alone = engine.run([out], {"vector": feeds["vector"]})[0]
    prefix = stage_operators(info, 0, branch + 1)
    in_chain = LiteRTEngine(slice_operators(graph, prefix, graph.input_names, [out]))
    np.testing.assert_array_equal(alone, in_chain.run([out], feeds)[0])
