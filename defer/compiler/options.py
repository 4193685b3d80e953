"""`CompileOptions`: every knob of a compile in one object, checked once before any slow work.

The CLI builds one from its flags (parsing `100Mbit`, `512MB`), the Python API from keyword
arguments; `checked()` validates every field and names the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from defer import hop as hops
from defer.codecs import parse_codec
from defer.compiler.load import check_load
from defer.compiler.order import ORDERS
from defer.errors import UsageError

STRATEGIES = ("balanced", "layers")


@dataclass(frozen=True)
class CompileOptions:
    """How to cut a model. `bandwidth` in bytes/s, `memory` in bytes per device, `latency` in
    seconds per hop; `cuts` (op or tensor names, or `OpType#k`) replace the strategy; `order`
    picks the op order (see order.py: auto, file, depth, greedy). `format` is the stages'
    format (None: tflite for a .tflite model, else onnx); `quantize` (fp16, int8) quantizes
    the model first, calibrated on the samples in the `calibration` .npy/.npz. `cluster`, a
    cluster.json, plans for that measured fleet (fleet.py, placement.py): it chooses the
    devices, their order and the cuts (`n_stages` None: the best count). `hop_cost` is the CPU
    a device spends per hop (defer/hop.py), added to each stage's time: "auto" = this
    machine's calibration if it was measured (`defer.calibrate`; divided by `speeds` like the
    ops), None = not priced; a cluster's nodes use their own cluster.json figures."""

    n_stages: int | None = None
    strategy: str = "balanced"
    cuts: tuple[str, ...] = ()
    bandwidth: float | None = None
    speeds: tuple[float, ...] | None = None
    memory: float | None = None
    latency: float = 0.0
    local_input: bool = False
    overlap: bool = False
    batch: int = 1
    profile: bool = True
    profile_runs: int = 10
    codec: str = "raw"
    order: str = "auto"
    format: str | None = None
    quantize: str | None = None
    calibration: str | None = None
    cluster: str | None = None
    hop_cost: hops.HopCost | str | None = "auto"

    def replace(self, **changes) -> CompileOptions:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown compile options {unknown}")
        return dataclasses.replace(self, **changes)

    def checked(self) -> CompileOptions:
        """These options with `n_stages` resolved (from `cuts` if need be); UsageError if bad."""
        n_stages, cuts = self.n_stages, tuple(self.cuts)
        if cuts:
            if n_stages is not None and n_stages != len(cuts) + 1:
                raise UsageError(f"-n {n_stages} does not match {len(cuts)} --cut points "
                                 f"(which make {len(cuts) + 1} stages); drop -n or fix the cuts")
            n_stages = len(cuts) + 1
        if self.cluster is not None and (cuts or self.strategy != "balanced" or self.speeds):
            raise UsageError("--cluster chooses the devices and the cuts from what the fleet "
                             "measured; drop --cut, --strategy layers and --speeds")
        if n_stages is None and self.cluster is None:
            raise UsageError("how many stages? pass -n N (one per device of the chain)")
        if n_stages is not None and n_stages < 1:
            raise UsageError(f"-n {n_stages}: need at least one stage; pass -n 1 or more")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy {self.strategy!r} unknown; use one of "
                             f"{', '.join(STRATEGIES)}")
        speeds = tuple(float(s) for s in self.speeds) if self.speeds is not None else None
        if speeds is not None and (len(speeds) != n_stages or min(speeds) <= 0):
            raise UsageError(f"--speeds needs {n_stages} positive numbers (one per stage), "
                             f"got {list(speeds)}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise UsageError("--bandwidth must be positive; omit it for unlimited")
        if self.memory is not None and self.memory <= 0:
            raise UsageError("--memory must be positive; omit it for no cap")
        if self.latency < 0:
            raise UsageError(f"--latency {self.latency * 1e3:g} ms: must be 0 or more")
        if self.batch < 1:
            raise UsageError(f"--batch {self.batch}: must be 1 or more")
        if self.profile_runs < 1:
            raise UsageError(f"profile_runs {self.profile_runs}: must be 1 or more")
        if self.order not in ORDERS:
            raise UsageError(f"--order {self.order!r} unknown; use one of {', '.join(ORDERS)}")
        check_load(self.format, self.quantize, self.calibration)
        codec = parse_codec(self.codec).spec
        return dataclasses.replace(self, n_stages=n_stages, cuts=cuts, speeds=speeds, codec=codec,
                                   hop_cost=_hop_cost(self.hop_cost))


def _hop_cost(value: hops.HopCost | str | dict | None) -> hops.HopCost | None:
    """"auto" -> this machine's cached calibration (or None), "none" -> None."""
    if value is None or isinstance(value, hops.HopCost):
        return value
    if value == "auto":
        return hops.cached()
    if value == "none":
        return None
    if isinstance(value, dict):
        try:
            return hops.HopCost.from_dict(value, "given")
        except (TypeError, ValueError) as err:
            raise UsageError(f"hop_cost {value!r:.80}: {err}") from None
    raise UsageError(f"hop_cost {value!r}: use auto, none or a HopCost")


def parse_speeds(text: str | None) -> tuple[float, ...] | None:
    """`"2,1,1"` -> (2.0, 1.0, 1.0); UsageError shows the expected form."""
    if not text:
        return None
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--speeds {text!r}: give numbers separated by commas, e.g. 2,1,1") from None


def as_options(options: CompileOptions | None, n_stages: int | None = None,
               **overrides) -> CompileOptions:
    """`options` (or the defaults) with `n_stages` and keyword overrides applied, checked."""
    base = options or CompileOptions()
    if n_stages is not None:
        overrides["n_stages"] = n_stages
    if "cuts" in overrides:
        overrides["cuts"] = tuple(overrides["cuts"] or ())
    if overrides.get("speeds") is not None and isinstance(overrides["speeds"], Sequence):
        overrides["speeds"] = tuple(overrides["speeds"])
    return base.replace(**overrides).checked()
