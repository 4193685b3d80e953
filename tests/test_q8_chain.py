"""q8 on a real chain: the trained digits CNN (3 node processes, TCP) keeps >= 99% top-1
agreement with raw hops, per tensor and per channel, while sending about a quarter of the bytes
between the nodes."""

from __future__ import annotations

import numpy as np
import pytest

from defer.local import LocalCluster
from defer.runtime.dispatcher import Dispatcher

CODECS = ("raw", "q8", "q8c+lz4")


@pytest.mark.keras
def test_q8_keeps_top1_on_the_trained_digits_cnn(digits, tmp_path, record_property):
    from defer.compiler import compile_model

    keras_path, x_test, _ = digits
    manifest = compile_model(keras_path, 3, tmp_path / "bundles", profile=False)
    samples = [x[None].astype(np.float32) for x in x_test]
    runs = {}
    with LocalCluster(manifest) as cluster:
        for codec in CODECS:
            with Dispatcher(manifest, cluster.addresses, codec=codec, timeout=30) as dispatcher:
                logits = np.concatenate([next(iter(o.values())) for o in
                                         dispatcher.map(samples)])
                runs[codec] = (logits, dispatcher.stats())
    top1 = runs["raw"][0].argmax(1)
    sent = {c: sum(h["bytes_per_inference"] for h in s["hops"][1:-1]) for c, (_, s) in runs.items()}
    for codec in CODECS[1:]:
        agreement = float(np.mean(runs[codec][0].argmax(1) == top1))
        ratio = sent[codec] / sent["raw"]
        record_property(f"{codec}_top1_agreement", agreement)
        record_property(f"{codec}_inter_node_bytes_ratio", ratio)
        print(f"digits CNN, {len(samples)} test images: {codec} top-1 agreement "
              f"{agreement:.2%}, inter-node bytes {sent['raw']:.0f} -> {sent[codec]:.0f} "
              f"per inference ({ratio:.1%})")
        assert agreement >= 0.99
        assert ratio < 0.3
        assert all(h["codec"] == codec for h in runs[codec][1]["hops"])
