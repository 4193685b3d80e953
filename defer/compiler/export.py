"""Write one ONNX bundle per stage and the manifest, atomically.

A stage's bundle holds its nodes, the initializers they use, the crossing tensors it consumes as
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

from defer.compiler.graph import GraphInfo, node_inputs
from defer.manifest import MANIFEST_NAME, Manifest, StageSpec, TensorSpec, sha256_bytes

log = logging.getLogger(__name__)


def stage_model(info: GraphInfo, a: int, b: int, index: int) -> tuple[onnx.ModelProto, StageSpec]:
    """The bundle of nodes [a, b) and its spec (costs filled in by the caller)."""
    nodes = info.nodes[a:b]
    produced = {t for n in nodes for t in n.output if t}
    consumed = {t for n in nodes for t in node_inputs(n)}
    receives = info.crossing(a)
    sends = info.crossing(b)
    inputs = [t for t in receives if t in consumed]
    outputs = [t for t in sends if t in produced]
    forward = [t for t in sends if t not in produced]
    weights = set().union(*info.node_weights[a:b]) if b > a else set()
    initializers = [i for i in info.model.graph.initializer if i.name in weights]
    internal = [vi for vi in info.model.graph.value_info
                if vi.name in produced and vi.name not in outputs]
    graph = helper.make_graph(
        nodes, f"{info.model.graph.name or 'model'}_stage{index}",
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
        weight_bytes=sum(info.initializer_bytes[w] for w in weights),
        bytes_in=info.crossing_bytes(a), bytes_out=info.crossing_bytes(b),
        first_op=nodes[0].name if nodes else "", last_op=nodes[-1].name if nodes else "",
    )
    return model, spec


def _value_info(info: GraphInfo, name: str) -> onnx.ValueInfoProto:
    spec: TensorSpec = info.specs[name]
    shape = [d if isinstance(d, int) else (d or None) for d in spec.shape]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), shape)


def write_bundles(out_dir: Path, bundles: Sequence[onnx.ModelProto], manifest: Manifest) -> None:
    """Serialise bundles (filling in each stage's sha256) and the manifest into `out_dir`."""
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for stage, bundle in zip(manifest.stages, bundles):
            data = bundle.SerializeToString()
            stage.sha256 = sha256_bytes(data)
            (partial / stage.file).write_bytes(data)
            log.info("wrote %s (%.1f MB)", stage.file, len(data) / 1e6)
        manifest.save(partial / MANIFEST_NAME)
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = [out_dir / MANIFEST_NAME, *out_dir.glob("bundle_*.onnx")]
        for path in stale:
            path.unlink(missing_ok=True)
        for stage in manifest.stages:
            os.replace(partial / stage.file, out_dir / stage.file)
        os.replace(partial / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    manifest.path = out_dir / MANIFEST_NAME
