"""What the crossing tensors cost on the wire under a codec: bytes, encode and decode seconds.

The model runs once on a seeded sample input with every crossing tensor as an extra output;
each tensor is then encoded and decoded with the runtime's own codec. Compression ratios depend
on the data, so they are what this sample input gives (real inputs may compress differently).
The encode seconds of every tensor crossing cut k are charged to the stage that ends at k, the
decode seconds to the stage that starts at k (forwarded tensors are not re-encoded by the
runtime, so this slightly overcharges stages that forward).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from defer.codecs import decode_tensor, encode_tensor, parse_codec
from defer.compiler.graph import GraphInfo
from defer.compiler.load import ort_session, sample_inputs

log = logging.getLogger(__name__)


@dataclass
class WireCosts:
    cut_bytes: np.ndarray  # (N+1,) encoded bytes crossing each cut
    encode: np.ndarray  # (N+1,) seconds to encode everything crossing cut k
    decode: np.ndarray  # (N+1,) seconds to decode it


def measure_wire(info: GraphInfo, codec: str, repeats: int = 3) -> WireCosts:
    """Encoded size and codec time of every crossing tensor, summed per cut."""
    parsed = parse_codec(codec)
    values = _crossing_values(info)
    sizes, enc, dec = {}, {}, {}
    for name, array in values.items():
        enc_times, dec_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            wire = encode_tensor(name, array, parsed)
            middle = time.perf_counter()
            decode_tensor(wire)
            dec_times.append(time.perf_counter() - middle)
            enc_times.append(middle - start)
        sizes[name], enc[name], dec[name] = wire.nbytes, statistics.median(enc_times), \
            statistics.median(dec_times)
    names = info.crossing_tensors()
    encoded = np.array([sizes.get(t, info.tensor_bytes(t)) for t in names], dtype=float)
    costs = WireCosts(*(_per_cut(info, names, per_tensor) for per_tensor in (
        encoded, np.array([enc.get(t, 0.0) for t in names]),
        np.array([dec.get(t, 0.0) for t in names]))))
    raw = sum(info.tensor_bytes(t) for t in values)
    log.info("codec %s: crossing tensors %.1f MB raw -> %.1f MB encoded on a sample input",
             codec, raw / 1e6, sum(sizes.values()) / 1e6)
    return costs


def _per_cut(info: GraphInfo, names: list[str], values: np.ndarray) -> np.ndarray:
    """(N+1,) sums of `values` over the tensors crossing each cut (a difference array)."""
    diff = np.zeros(info.n_ops + 2)
    first = np.array([info.producer[t] for t in names], dtype=np.int64) + 1
    last = np.array([info.last_use[t] for t in names], dtype=np.int64) + 1
    np.add.at(diff, first, values)
    np.add.at(diff, last, -values)
    return np.cumsum(diff)[: info.n_ops + 1]


def _crossing_values(info: GraphInfo) -> dict[str, np.ndarray]:
    """Every tensor that crosses some cut, from one run of the whole model."""
    import onnxruntime as ort

    names = sorted(info.crossing_tensors())
    feeds = sample_inputs(info.model, batch=info.batch)
    probe = onnx.ModelProto()
    probe.CopyFrom(info.model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names
                              if t not in existing and t not in feeds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="defer-wire-") as tmp:
        session = ort_session(probe, options, tmp)
    wanted = [t for t in names if t not in feeds]
    values = dict(zip(wanted, session.run(wanted, feeds)))
    values.update({t: feeds[t] for t in names if t in feeds})
    return values
