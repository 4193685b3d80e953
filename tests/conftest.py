"""Session-wide fixtures: models that take seconds to build are built once per test run.

`keras_h5(name)` is an example model's cached .h5 (defer.examples: ~/.cache/defer/models, built
once per machine); `resnet50_onnx` its ResNet50 converted by tf2onnx once and cached; `digits`
the digits CNN trained once per session on scikit-learn's bundled digits. Markers: `slow`
(ResNet50-sized models, many processes, soak; `pytest -m "not slow"` is the quick loop) and
`keras` (needs TensorFlow + tf2onnx).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def keras_h5():
    pytest.importorskip("tensorflow")
    from defer import examples

    return examples.example_model


@pytest.fixture(scope="session")
def resnet50_onnx():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from defer import examples

    return examples.example_onnx("resnet50")


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """(keras .h5 path, x_test, y_test) of the digits CNN, trained once per session."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("sklearn")
    from defer.examples import digits_cnn

    return digits_cnn(tmp_path_factory.mktemp("digits") / "digits.h5", seed=0)


@pytest.fixture(autouse=True)
def hop_cost_cache(tmp_path_factory, monkeypatch):
    """Every test sees a calibrated hop cost of zero (defer.hop's cache in a temp folder), so
    plans do not depend on this machine's cache and no CLI test measures one; a test that
    prices hops injects its own (CompileOptions.hop_cost) or rewrites this file."""
    from defer import hop

    path = tmp_path_factory.getbasetemp() / "hop_cost.json"
    if not path.exists():
        hop.save(hop.HopCost(), path)
    monkeypatch.setattr(hop, "CACHE_PATH", path)
    return path
