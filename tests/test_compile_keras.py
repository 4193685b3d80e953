"""Real Keras models through tf2onnx and the compiler, checked against Keras itself."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from defer import examples  # noqa: E402
from defer.compiler import compile_model, load_model, verify  # noqa: E402
from defer.compiler.partition import evaluate  # noqa: E402
from defer.fidelity import run_chain  # noqa: E402

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def built(keras_h5):
    return keras_h5


def _keras_logits(path, feeds):
    import keras

    model = keras.models.load_model(path, compile=False)
    return model.predict(list(feeds.values()) if len(feeds) > 1 else next(iter(feeds.values())),
                         verbose=0)


@pytest.mark.slow
def test_resnet50_eight_balanced_stages_match_keras(built, resnet50_onnx, tmp_path):
    path = built("resnet50")
    loaded = load_model(resnet50_onnx)  # tf2onnx's conversion of `path`, made once and cached
    manifest = compile_model(loaded, 8, tmp_path)
    assert len(manifest.stages) == 8
    assert len(list(tmp_path.glob("bundle_*.onnx"))) == 8
    assert manifest.plan["imbalance"] <= 1.10
    assert manifest.plan["imbalance"] < manifest.plan["baselines"]["layers"]["imbalance"]
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    chain = run_chain(manifest, {"input": x})
    reference = _keras_logits(path, {"input": x})
    name = manifest.outputs[0].name
    rel = np.max(np.abs(chain[name] - reference)) / np.max(np.abs(reference))
    assert rel <= 1e-4


@pytest.mark.slow
def test_mobilenetv2_compiles_and_verifies(built, tmp_path):
    loaded = load_model(built("mobilenetv2"))
    manifest = compile_model(loaded, 4, tmp_path)
    assert verify(manifest, loaded).max_rel <= 1e-4


@pytest.mark.parametrize("name, n", [("densenet_tiny", 4), ("multi_io", 3), ("tiny_cnn", 3)])
def test_small_models_match_keras(built, tmp_path, name, n):
    path = built(name)
    manifest = compile_model(path, n, tmp_path)
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.random(t.concrete_shape(2)).astype(np.float32) for t in manifest.inputs}
    chain = run_chain(manifest, feeds)
    reference = _keras_logits(path, feeds)
    reference = reference if isinstance(reference, list | tuple) else [reference]
    outputs = [chain[t.name] for t in manifest.outputs]
    for got, want in zip(outputs, reference):
        assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))
    if name == "densenet_tiny":
        assert max(len(s.receives) for s in manifest.stages) >= 3  # many tensors cross


def test_bandwidth_limit_avoids_wide_cuts(built, tmp_path):
    loaded = load_model(built("wide_skip"))
    blind = compile_model(loaded, 2, tmp_path / "blind", profile=False)
    limited = compile_model(loaded, 2, tmp_path / "limited", profile=False,
                            bandwidth=10e6 / 8)
    assert limited.plan["wire_bytes"] <= blind.plan["wire_bytes"] / 4
    # Judged at 10 Mbit/s, the bandwidth-aware plan beats the bandwidth-blind one.
    from defer.compiler import analyse, build_problem
    from defer.compiler.profile import estimate_costs

    info = analyse(loaded.model)
    problem = build_problem(info, estimate_costs(info), 2, bandwidth=10e6 / 8)
    blind_at_10 = evaluate(problem, blind.plan["bounds"])
    assert limited.plan["bottleneck"] < blind_at_10.bottleneck


def test_saved_model_directory_compiles(tmp_path):
    model = examples.EXAMPLES["tiny_cnn"](0)
    model.export(str(tmp_path / "saved"))
    loaded = load_model(tmp_path / "saved")
    manifest = compile_model(loaded, 3, tmp_path / "out")
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    chain = run_chain(manifest, {manifest.inputs[0].name: x})
    want = model.predict(x, verbose=0)
    assert np.max(np.abs(chain[manifest.outputs[0].name] - want)) <= 1e-4
