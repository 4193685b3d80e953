"""The oracle check: run a manifest's bundles in order in one process, compare with a reference.

Tensors are routed by name exactly as the nodes route them: each stage is fed the tensors its
bundle consumes, and what it sends (its outputs plus forwards) is what the next stage receives.
`compare` gives the worst absolute error and the worst error relative to the reference's
largest magnitude. Used by `defer compile --verify`, `defer run` and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from defer.engines import Engine, load_engine
from defer.manifest import Manifest


@dataclass
class Fidelity:
    max_abs: float
    max_rel: float  # max abs error / max abs reference value, worst output
    per_output: dict[str, tuple[float, float]]

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, max relative error {self.max_rel:.3g}"


def stage_engines(manifest: Manifest, threads: int = 1) -> list[Engine]:
    """One engine per stage bundle of `manifest`."""
    return [load_engine(manifest.bundle_path(s.index), threads, s.format)
            for s in manifest.stages]


def run_chain(manifest: Manifest, feeds: Mapping[str, np.ndarray],
              engines: Sequence[Engine] | None = None,
              stage_feeds: list | None = None) -> dict[str, np.ndarray]:
    """The chain's outputs for `feeds`, one stage after the other, in this process.

    If `stage_feeds` is a list, each stage's engine feed is appended to it.
    """
    engines = engines if engines is not None else stage_engines(manifest)
    received = dict(feeds)
    for stage, engine in zip(manifest.stages, engines):
        feed = {t.name: received[t.name] for t in stage.inputs}
        if stage_feeds is not None:
            stage_feeds.append(feed)
        names = [t.name for t in stage.outputs]
        produced = dict(zip(names, engine.run(names, feed)))
        received = {name: produced[name] if name in produced else received[name]
                    for name in stage.sends}
    return received


def compare(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Fidelity:
    """Errors of `outputs` against `reference`, per output name and worst over all."""
    per_output = {}
    for name, ref in reference.items():
        got = np.asarray(outputs[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        per_output[name] = (err, err / scale if scale > 0 else err)
    return Fidelity(
        max_abs=max((e for e, _ in per_output.values()), default=0.0),
        max_rel=max((r for _, r in per_output.values()), default=0.0),
        per_output=per_output,
    )


def worst(pairs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> Fidelity:
    """The worst `compare` over many (outputs, reference) pairs."""
    results = [compare(got, want) for got, want in pairs]
    per_output: dict[str, tuple[float, float]] = {}
    for result in results:
        for name, (err, rel) in result.per_output.items():
            old = per_output.get(name, (0.0, 0.0))
            per_output[name] = (max(old[0], err), max(old[1], rel))
    return Fidelity(max((r.max_abs for r in results), default=0.0),
                    max((r.max_rel for r in results), default=0.0), per_output)
