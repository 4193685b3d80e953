"""manifest.json: the one data structure the compiler writes and the runtime reads.

Schema version 1 (see DESIGN.md). Extend it, never silently change it: a reader accepts unknown
keys and rejects a different schema_version with a message saying which version it needs.

A stage *receives* the crossing set of the cut before it (stage 0: the model inputs), feeds the
tensors its bundle consumes (`inputs`) to onnxruntime, and *sends* its bundle `outputs` plus
`forward` (received tensors still needed downstream, passed through untouched) to the next hop.
The last stage sends the model outputs back to the dispatcher.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defer.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, numpy dtype name and shape; `None` or a string marks a dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension replaced by `batch`."""
        return tuple(d if isinstance(d, int) and d >= 0 else batch for d in self.shape)


@dataclass
class StageSpec:
    index: int
    file: str
    sha256: str
    inputs: list[TensorSpec]  # consumed by the bundle (fed to onnxruntime)
    outputs: list[TensorSpec]  # produced by the bundle and sent on
    forward: list[TensorSpec]  # received, not consumed here or still needed later: passed on
    receives: list[str]  # every tensor arriving at this stage (crossing set)
    n_nodes: int
    compute: float  # predicted seconds of compute at this stage's node speed
    weight_bytes: int
    bytes_in: int
    bytes_out: int  # bytes sent to the next hop (raw), per inference at the plan's batch
    first_node: str = ""
    last_node: str = ""

    @property
    def sends(self) -> list[str]:
        return [t.name for t in self.outputs] + [t.name for t in self.forward]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("inputs", "outputs", "forward"):
            d[key] = [t.to_dict() for t in getattr(self, key)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        d = dict(d)
        for key in ("inputs", "outputs", "forward"):
            d[key] = [TensorSpec.from_dict(t) for t in d.get(key, [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Manifest:
    model: dict[str, Any]
    plan: dict[str, Any]
    stages: list[StageSpec]
    codec: dict[str, Any] = field(default_factory=lambda: {"default": "raw", "hops": {}})
    created_by: str = ""
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None  # where it was read from; bundles are relative to its folder

    @functools.cached_property
    def inputs(self) -> list[TensorSpec]:
        """The model's input specs (built once: the dispatcher checks every request against them)."""
        return [TensorSpec.from_dict(t) for t in self.model["inputs"]]

    @functools.cached_property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(t) for t in self.model["outputs"]]

    def hop_codec(self, hop: int) -> str:
        """Codec for the hop *into* stage `hop` (hop n = last stage back to the dispatcher)."""
        return self.codec.get("hops", {}).get(str(hop), self.codec.get("default", "raw"))

    def bundle_path(self, stage: int) -> Path:
        base = self.path.parent if self.path else Path(".")
        return base / self.stages[stage].file

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "model": self.model,
            "plan": self.plan,
            "stages": [s.to_dict() for s in self.stages],
            "codec": self.codec,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{path or 'manifest'}: schema_version {version!r} is not supported "
                f"(this defer reads {SCHEMA_VERSION}); recompile with `defer compile`"
            )
        try:
            return cls(
                model=d["model"],
                plan=d["plan"],
                stages=[StageSpec.from_dict(s) for s in d["stages"]],
                codec=d.get("codec", {"default": "raw", "hops": {}}),
                created_by=d.get("created_by", ""),
                path=path,
            )
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{path or 'manifest'}: missing or malformed field {err}; "
                                "recompile with `defer compile`") from err


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest.json, or the manifest.json inside a bundle directory."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        raise ManifestError(f"{p}: no such manifest; run `defer compile MODEL -o DIR` first")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{p}: not valid JSON ({err}); recompile with `defer compile`") from err
    return Manifest.from_dict(data, path=p)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
