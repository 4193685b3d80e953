"""Run the bundles in order in one process and compare with the whole model.

Tensors are routed by name exactly as the runtime does: each stage is fed the tensors it
consumes, and everything it sends (its outputs plus forwards) is what the next stage receives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from defer.manifest import Manifest


@dataclass
class Fidelity:
    max_abs: float
    max_rel: float  # max abs error / max abs reference value, worst output
    per_output: dict[str, tuple[float, float]]

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, max relative error {self.max_rel:.3g}"


def session(model: onnx.ModelProto | str, threads: int = 1):
    """The deploy session nodes use (ORT_ENABLE_ALL, `threads` intra-op threads)."""
    from defer.runtime.node import make_session

    return make_session(model if isinstance(model, str) else model.SerializeToString(), threads)


def run_chain(manifest: Manifest, feeds: dict[str, np.ndarray], sessions=None,
              stage_feeds: list | None = None) -> dict[str, np.ndarray]:
    """The chain's outputs for `feeds`, one stage after the other, in this process.

    If `stage_feeds` is a list, each stage's onnxruntime feed is appended to it.
    """
    if sessions is None:
        sessions = [session(str(manifest.bundle_path(s.index))) for s in manifest.stages]
    received = dict(feeds)
    for stage, sess in zip(manifest.stages, sessions):
        feed = {t.name: received[t.name] for t in stage.inputs}
        if stage_feeds is not None:
            stage_feeds.append(feed)
        values = sess.run([t.name for t in stage.outputs], feed)
        produced = dict(zip((t.name for t in stage.outputs), values))
        received = {name: produced[name] if name in produced else received[name]
                    for name in stage.sends}
    return received


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> Fidelity:
    per_output = {}
    for name, ref in reference.items():
        got = outputs[name]
        err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        per_output[name] = (err, err / scale if scale > 0 else err)
    return Fidelity(
        max_abs=max((e for e, _ in per_output.values()), default=0.0),
        max_rel=max((r for _, r in per_output.values()), default=0.0),
        per_output=per_output,
    )


def measure_stages(manifest: Manifest, feeds: dict[str, np.ndarray], runs: int = 20,
                   warmup: int = 3) -> list[float]:
    """Median seconds of each bundle run alone (one session, one thread) on real activations."""
    sessions = [session(str(manifest.bundle_path(s.index))) for s in manifest.stages]
    stage_feeds: list[dict[str, np.ndarray]] = []
    run_chain(manifest, feeds, sessions, stage_feeds)
    medians = []
    for sess, feed in zip(sessions, stage_feeds):
        for _ in range(warmup):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)))
    return medians
