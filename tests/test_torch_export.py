"""Models as PyTorch exports them, checked against PyTorch itself: a 12-layer transformer
encoder that shares one layer's weights (the TorchScript exporter hands them to every layer
through Identity nodes at the top of the graph), exported with dynamo=False and dynamo=True
(external data, opset 18+, dynamic batch). Skipped without torch (pip install torch==2.13.0)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from defer.compiler import compile_model  # noqa: E402
from defer.compiler.verify import constant_sends  # noqa: E402
from defer.fidelity import run_chain  # noqa: E402

D_MODEL, SEQ = 256, 64
ACTIVATION = SEQ * D_MODEL * 4  # 64 KiB: one (1, 64, 256) float32 activation


class SharedEncoder(torch.nn.Module):
    """One TransformerEncoderLayer applied `layers` times (ALBERT-style weight sharing)."""

    def __init__(self, layers: int = 12):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(D_MODEL, 4, 512, dropout=0.0,
                                                      batch_first=True)
        self.layers = layers

    def forward(self, x):
        for _ in range(self.layers):
            x = self.layer(x)
        return x


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SharedEncoder().eval()


def _export(model, path, dynamo: bool):
    x = torch.randn(2 if dynamo else 1, SEQ, D_MODEL)  # batch 1 would be specialised
    if dynamo:
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"],
                          output_names=["y"], external_data=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return path


def _check(model, manifest, batch: int):
    hops = [s.bytes_out for s in manifest.stages[:-1]]
    assert all(b <= 3 * ACTIVATION for b in hops), hops  # activations only, no weights
    assert constant_sends(manifest) == [set()] * len(manifest.stages)
    x = np.random.default_rng(0).standard_normal((batch, SEQ, D_MODEL)).astype(np.float32)
    got = run_chain(manifest, {"x": x})["y"]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4


def test_torchscript_export_only_activations_cross(encoder, tmp_path):
    path = _export(encoder, tmp_path / "encoder.onnx", dynamo=False)
    manifest = compile_model(path, 4, tmp_path / "out", profile=False)
    _check(encoder, manifest, batch=1)


@pytest.mark.filterwarnings("ignore")
def test_dynamo_export_external_data_dynamic_batch(encoder, tmp_path):
    path = _export(encoder, tmp_path / "encoder.onnx", dynamo=True)
    assert (tmp_path / "encoder.onnx.data").exists()
    manifest = compile_model(path, 4, tmp_path / "out", profile=False)
    assert manifest.model["opset"] >= 18
    _check(encoder, manifest, batch=3)
