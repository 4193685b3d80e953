"""Crossing sets, bundle extraction and forwarding on tiny helper-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

from defer.compiler import analyse, compile_model, load_model, resolve_cuts
from defer.engines.onnx import make_session
from defer.errors import PlanError
from defer.fidelity import compare, run_chain
from tests.onnx_graphs import dense_chain, multi_io, residual_mlp


def _info(model):
    return analyse(load_model(model).model)


def test_residual_cut_crosses_skip_and_branch():
    info = _info(residual_mlp(blocks=2))
    # Cut between mm0a and relu0: the branch (h0a) and the skip (x) both cross.
    assert info.crossing(1) == ["x", "h0a"]
    # After a block's Add only its sum crosses.
    assert info.crossing(4) == ["s0"]
    assert info.crossing(0) == ["x"]
    assert info.crossing(info.n_ops) == ["y"]


def test_dense_cuts_cross_many_tensors():
    info = _info(dense_chain(layers=5))
    widest = max(len(info.crossing(k)) for k in range(info.n_ops + 1))
    assert widest == 6  # the input and all five layer outputs feed the last concat
    assert info.crossing_bytes(info.n_ops - 1) == 6 * 4 * 4  # 6 tensors of batch 1 x 4 floats


def test_early_output_is_forwarded(tmp_path):
    manifest = compile_model(multi_io(), 3, tmp_path, strategy="layers", profile=False)
    last = manifest.stages[-1]
    assert "early" in [t.name for t in last.forward]
    assert set(last.sends) == {"late", "early"}


@pytest.mark.parametrize("make, n", [(residual_mlp, 4), (multi_io, 3), (dense_chain, 5)])
def test_every_partition_equals_whole_model(tmp_path, make, n):
    model = make()
    manifest = compile_model(model, n, tmp_path, profile=False)
    rng = np.random.default_rng(1)
    feeds = {t.name: rng.standard_normal(t.concrete_shape(2)).astype(np.float32)
             for t in manifest.inputs}
    reference = dict(zip([o.name for o in model.graph.output], make_session(model.SerializeToString()).run(None, feeds)))
    fidelity = compare(run_chain(manifest, feeds), reference)
    assert fidelity.max_rel < 1e-5
    for stage in manifest.stages:  # each bundle is a valid model that loads on its own
        make_session(manifest.bundle_path(stage.index))


def test_cut_names_resolve_to_positions():
    info = _info(residual_mlp(blocks=3))
    assert resolve_cuts(info, ["add0"]) == [4]
    assert resolve_cuts(info, ["s1"]) == [8]  # a tensor: cut after its producer
    assert resolve_cuts(info, ["Add#1", "Add#2"]) == [4, 8]
    with pytest.raises(PlanError, match="no op or tensor"):
        resolve_cuts(info, ["nope"])
    with pytest.raises(PlanError, match="same place"):
        resolve_cuts(info, ["add0", "s0"])


def test_explicit_cuts_make_the_stages(tmp_path):
    manifest = compile_model(residual_mlp(blocks=3), None, tmp_path, cuts=["add0", "add1"],
                             profile=False)
    assert manifest.plan["strategy"] == "cuts"
    assert [s.last_op for s in manifest.stages] == ["add0", "add1", "head"]


def test_wire_costs_price_the_codec():
    from defer.compiler.wire import measure_wire

    info = _info(dense_chain(layers=4, width=64))
    raw = np.array([info.crossing_bytes(k) for k in range(info.n_ops + 1)], dtype=float)
    lossy = measure_wire(info, "zfp:1e-1")
    assert np.all(lossy.cut_bytes[1:] < raw[1:])  # every cut is cheaper on the wire
    assert np.all(lossy.encode[1:] > 0) and np.all(lossy.decode[1:] > 0)  # codec time priced


def test_codec_and_overlap_are_recorded_in_the_plan(tmp_path):
    manifest = compile_model(residual_mlp(blocks=3), 2, tmp_path, profile=False, codec="lz4",
                             bandwidth=1e6, overlap=True)
    assert manifest.plan["overlap"] is True and manifest.codec == "lz4"
