"""Write one ONNX bundle per stage and the manifest, atomically.

A stage's bundle holds its ops, the constant-only ops they need, the initializers they use, the crossing tensors it consumes as
graph inputs and the tensors it produces for later stages as graph outputs. Received tensors that
are still needed downstream are listed as `forward`. Files are written to a side folder and moved
into place with the manifest last, so a failed compile never leaves output that looks valid.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from defer.compiler.graph import GraphInfo
from defer.manifest import MANIFEST_NAME, Manifest, StageSpec, TensorSpec, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

# Protobuf refuses messages of 2 GiB; keep a margin for the graph itself.
EXTERNAL_ABOVE = 2**31 - 2**26


def stage_model(info: GraphInfo, a: int, b: int, index: int) -> tuple[onnx.ModelProto, StageSpec]:
    """The bundle of ops [a, b) and its spec (costs filled in by the caller).

    The constant-only ops its ops need (see graph.py) are duplicated into it, first."""
    ops = info.ops[a:b]
    attached = info.attached_ops(a, b)
    produced = {t for op in [*attached, *ops] for t in op.outputs}
    consumed = {t for op in ops for t in op.inputs}
    receives = info.crossing(a)
    sends = info.crossing(b)
    inputs = [t for t in receives if t in consumed]
    outputs = [t for t in sends if t in produced]
    forward = [t for t in sends if t not in produced]
    weights = info.stage_weights(a, b)
    initializers = [i for i in info.model.graph.initializer if i.name in weights]
    internal = [vi for vi in info.model.graph.value_info
                if vi.name in produced and vi.name not in outputs]
    graph = helper.make_graph(
        [op.source for op in [*attached, *ops]],
        f"{info.model.graph.name or 'model'}_stage{index}",
        inputs=[_value_info(info, t) for t in inputs],
        outputs=[_value_info(info, t) for t in outputs],
        initializer=initializers, value_info=internal,
    )
    model = helper.make_model(graph, opset_imports=list(info.model.opset_import),
                              producer_name="defer")
    model.ir_version = info.model.ir_version
    model.functions.extend(info.model.functions)
    spec = StageSpec(
        index=index, file=f"bundle_{index}.onnx", sha256="",
        inputs=[info.specs[t] for t in inputs], outputs=[info.specs[t] for t in outputs],
        forward=[info.specs[t] for t in forward], receives=list(receives),
        n_ops=b - a, compute=0.0,
        weight_bytes=sum(info.constant_bytes[w] for w in weights),
        bytes_in=info.crossing_bytes(a), bytes_out=info.crossing_bytes(b),
        first_op=ops[0].name if ops else "", last_op=ops[-1].name if ops else "",
    )
    return model, spec


def _value_info(info: GraphInfo, name: str) -> onnx.ValueInfoProto:
    spec: TensorSpec = info.specs[name]
    shape = [d if isinstance(d, int) else (d or None) for d in spec.shape]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), shape)


def write_bundles(out_dir: Path, bundles: Sequence[onnx.ModelProto], manifest: Manifest,
                  external_above: int = EXTERNAL_ABOVE) -> None:
    """Serialise bundles (filling in each stage's sha256) and the manifest into `out_dir`.

    A bundle is one self-contained file unless it is bigger than `external_above` bytes
    (protobuf cannot hold 2 GB): then its weights go to `bundle_<i>.onnx.data` beside it, and
    the stage records that file and its sha256 too."""
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for stage, bundle in zip(manifest.stages, bundles):
            _write_bundle(partial, stage, bundle, external_above)
        manifest.save(partial / MANIFEST_NAME)
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = [out_dir / MANIFEST_NAME, *out_dir.glob("bundle_*.onnx"),
                 *out_dir.glob("bundle_*.onnx.data")]
        for path in stale:
            path.unlink(missing_ok=True)
        for stage in manifest.stages:
            for name in filter(None, (stage.file, stage.data_file)):
                os.replace(partial / name, out_dir / name)
        os.replace(partial / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    manifest.path = out_dir / MANIFEST_NAME


def _write_bundle(folder: Path, stage: StageSpec, bundle: onnx.ModelProto,
                  external_above: int) -> None:
    size = bundle.ByteSize()
    path = folder / stage.file
    if size <= external_above:
        data = bundle.SerializeToString()
        stage.sha256 = sha256_bytes(data)
        path.write_bytes(data)
        log.info("wrote %s (%.1f MB)", stage.file, len(data) / 1e6)
        return
    stage.data_file = f"{stage.file}.data"
    onnx.save_model(bundle, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=stage.data_file, size_threshold=1024)
    stage.sha256, stage.data_sha256 = sha256_file(path), sha256_file(folder / stage.data_file)
    log.info("wrote %s + %s (%.1f MB of weights outside the protobuf)", stage.file,
             stage.data_file, (folder / stage.data_file).stat().st_size / 1e6)
