"""`run_stage` in memory: the exact tensors a stage must receive, checks before the engine,
codec on what leaves, forwarded tensors passed through as the received bytes, RESULT on the
last stage; and the engine interface it runs on (`defer.engines`)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import compile_tiny, residual_mlp

from defer.codecs import decode_tensor, encode_tensor
from defer.engines import detect_format, load_engine
from defer.errors import InputError, ManifestError, NodeError
from defer.runtime.protocol import Configure, Infer, Result
from defer.runtime.stage import StageCounters, run_stage


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    model = residual_mlp()
    manifest = compile_tiny(model, tmp_path_factory.mktemp("stage"), cuts=("relu1", "mm2"))
    engines = [load_engine(manifest.bundle_path(s.index)) for s in manifest.stages]
    return model, manifest, engines


def _plan(manifest, index, codec="raw"):
    stage, n = manifest.stages[index], len(manifest.stages)
    return Configure(stage=index, n_stages=n,
                     next_hop="dispatcher" if index == n - 1 else "127.0.0.1:9",
                     codec=codec, receives=tuple(stage.receives),
                     forward=tuple(t.name for t in stage.forward),
                     outputs=tuple(t.name for t in stage.outputs))


def test_three_stages_in_memory_equal_the_whole_model(stages):
    model, manifest, engines = stages
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    whole = load_engine(model.SerializeToString())
    want = whole.run(["y"], {"x": x})[0]
    msg = Infer(request_id=7, tensors=(encode_tensor("x", x),))
    counters = StageCounters()
    for index, engine in enumerate(engines):
        msg, times = run_stage(_plan(manifest, index), engine, msg)
        counters.add(times)
        if index == 1:  # stage 1 forwards r1 as the very bytes it received
            assert isinstance(msg, Infer) and [t.name for t in msg.tensors] == ["h2", "r1"]
    assert isinstance(msg, Result) and msg.request_id == 7
    assert np.array_equal(decode_tensor(msg.tensors[0]), want)
    assert counters.requests == 3 and counters.busy_s > 0


def test_forwarded_tensors_are_the_received_objects(stages):
    _, manifest, engines = stages
    r1 = encode_tensor("r1", np.ones((1, 16), np.float32))
    h2 = encode_tensor("h2", np.ones((1, 16), np.float32))
    out, _ = run_stage(_plan(manifest, 2), engines[2], Infer(request_id=1, tensors=(h2, r1)))
    assert isinstance(out, Result)
    msg, _ = run_stage(_plan(manifest, 1, codec="lz4"), engines[1],
                       Infer(request_id=2, tensors=(r1,)))
    forwarded = {t.name: t for t in msg.tensors}["r1"]
    assert forwarded is r1  # untouched: no decode, no re-encode
    assert {t.name: t.codec for t in msg.tensors}["h2"] == "lz4"


@pytest.mark.parametrize("tensors, match", [
    ((encode_tensor("z", np.zeros((1, 16), np.float32)),), r"expects tensors \['x'\], got \['z'\]"),
    ((encode_tensor("x", np.zeros((1, 15), np.float32)),), r"arrived with shape \[1, 15\]"),
    ((encode_tensor("x", np.zeros((1, 16), np.float64)),), "arrived as float64"),
])
def test_wrong_tensors_are_refused_before_the_engine(stages, tensors, match):
    _, manifest, engines = stages
    with pytest.raises(InputError, match=match):
        run_stage(_plan(manifest, 0), engines[0], Infer(request_id=1, tensors=tensors))


def test_an_engine_failure_names_the_stage_and_node(stages):
    _, manifest, engines = stages

    class Broken:
        format, inputs, outputs = "onnx", engines[0].inputs, engines[0].outputs

        def run(self, outputs, feeds):
            raise RuntimeError("boom")

    x = encode_tensor("x", np.zeros((1, 16), np.float32))
    with pytest.raises(NodeError, match="onnx engine failed at stage 0: boom") as err:
        run_stage(_plan(manifest, 0), Broken(), Infer(request_id=1, tensors=(x,)), "n:1")
    assert err.value.node == "n:1"


def test_engines_report_specs_and_refuse_garbage(stages, tmp_path):
    _, manifest, engines = stages
    assert [s.name for s in engines[0].inputs] == ["x"] and engines[0].format == "onnx"
    assert engines[0].inputs[0].dtype == "float32" and engines[0].inputs[0].shape == (1, 16)
    assert detect_format(manifest.bundle_path(0)) == "onnx"
    assert detect_format(b"\x1c\x00\x00\x00TFL3rest") == "tflite"
    with pytest.raises(ManifestError, match="cannot load"):
        load_engine(b"not a model", format="onnx")
