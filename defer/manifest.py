"""manifest.json: the one data structure the compiler writes and the runtime reads.

Schema version 2 (version 1 is still read and upgraded in memory). Extend it, never silently
change it: a reader accepts unknown keys and rejects an unknown schema_version with a message
saying what to do. Words: a *stage* is the part of the plan one device (node) runs; an *op* is
one operator of the model graph.

A stage *receives* the crossing set of the cut before it (stage 0: the model inputs), feeds the
tensors its bundle consumes (`inputs`) to its engine, and *sends* its bundle `outputs` plus
`forward` (received tensors still needed downstream, passed through untouched) to the next hop.
The last stage sends the model outputs back to the dispatcher. `format` says which engine runs
the bundle (`onnx` or `tflite`). `codec` is the activation codec of every hop. A bundle too big
for one protobuf (2 GB) keeps its weights in `data_file` beside it, hashed as `data_sha256`
(both empty for a self-contained bundle; optional fields, added within schema 2).

Changes from schema 1: `n_nodes`/`first_node`/`last_node` became `n_ops`/`first_op`/`last_op`
(stage and model); `codec` is one spec string (the per-hop override nothing wrote is gone);
stages carry `format`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from defer.errors import ManifestError
from defer.tensors import TensorSpec

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "Manifest", "StageSpec", "TensorSpec",
           "load_manifest", "sha256_bytes", "sha256_file"]


@dataclass
class StageSpec:
    index: int
    file: str
    sha256: str
    inputs: list[TensorSpec]  # consumed by the bundle (fed to its engine)
    outputs: list[TensorSpec]  # produced by the bundle and sent on
    forward: list[TensorSpec]  # received, not consumed here or still needed later: passed on
    receives: list[str]  # every tensor arriving at this stage (crossing set)
    n_ops: int
    compute: float  # predicted seconds of compute at this stage's device speed
    weight_bytes: int
    bytes_in: int
    bytes_out: int  # bytes sent to the next hop (raw), per inference at the plan's batch
    first_op: str = ""
    last_op: str = ""
    format: str = "onnx"
    data_file: str = ""  # external weights beside a bundle over 2 GB ("" = self-contained)
    data_sha256: str = ""

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
    codec: str = "raw"
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

    def bundle_path(self, stage: int) -> Path:
        base = self.path.parent if self.path else Path(".")
        return base / self.stages[stage].file

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
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
        where = path or "manifest"
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"{where}: schema_version {version!r} is not supported (this defer reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}); recompile with `defer compile`")
        try:
            if version == 1:
                d = _upgrade_v1(d)
            return cls(
                model=d["model"],
                plan=d["plan"],
                stages=[StageSpec.from_dict(s) for s in d["stages"]],
                codec=d.get("codec", "raw"),
                created_by=d.get("created_by", ""),
                schema_version=version,
                path=path,
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{where}: missing or malformed field {err}; "
                                "recompile with `defer compile`") from err


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2 in memory: graph nodes were called nodes; codec was {default, hops}."""
    renames = {"n_nodes": "n_ops", "first_node": "first_op", "last_node": "last_op"}
    model = {renames.get(k, k): v for k, v in d["model"].items()}
    stages = [{renames.get(k, k): v for k, v in s.items()} for s in d["stages"]]
    codec = d.get("codec", {})
    codec = codec.get("default", "raw") if isinstance(codec, dict) else codec
    return {**d, "model": model, "stages": stages, "codec": codec}


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


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks (bundles and their external data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex sha256 of a bundle (or any bytes): how manifests and nodes name bundles."""
    return hashlib.sha256(data).hexdigest()
