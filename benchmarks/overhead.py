"""Scenario 3: overhead per hop for each codec, ResNet50 n=2 on loopback, one node per core.

Per stage and inference: onnxruntime ms, codec ms (decode what arrives + encode what leaves),
and the rest of the node's CPU time (sockets, framing, event loop), against the onnxruntime
time; per hop, the bytes sent and the share saved against raw.
"""

from __future__ import annotations

from benchmarks.common import Context, chain_stats, table

CODECS = ("raw", "lz4", "zfp", "zfp:1e-3", "zfp+lz4")


def run(ctx: Context, manifest, samples: list[dict]) -> dict:
    from defer.local import LocalCluster

    out: dict = {}
    with LocalCluster(manifest) as cluster:
        for codec in CODECS:
            stats = chain_stats(manifest, cluster.addresses, samples[: ctx.count // 2 + 3],
                                codec=codec)
            stages = []
            for s in stats["stages"]:
                cpu_ms = s["cpu_s_per_inference"] * 1e3
                other = max(0.0, cpu_ms - s["ort_ms_per_inference"] - s["codec_ms_per_inference"])
                stages.append({"ort_ms": s["ort_ms_per_inference"],
                               "codec_ms": s["codec_ms_per_inference"], "other_cpu_ms": other,
                               "overhead_vs_ort": (s["codec_ms_per_inference"] + other)
                               / s["ort_ms_per_inference"]})
            out[codec] = {"throughput": stats["throughput"], "stages": stages,
                          "hops": [{"bytes_per_inference": h["bytes_per_inference"],
                                    "saved": h["saved"]} for h in stats["hops"]]}
            ctx.log(f"  {codec}: {stats['throughput']:.1f} inf/s, hop 1 "
                    f"{stats['hops'][1]['bytes_per_inference'] / 1e6:.2f} MB/inf")
    return out


def render(result: dict) -> str:
    rows = []
    for codec, r in result.items():
        for i, s in enumerate(r["stages"]):
            hop_in, hop_out = r["hops"][i], r["hops"][i + 1]
            rows.append([codec if i == 0 else "", i, f"{s['ort_ms']:.2f}", f"{s['codec_ms']:.2f}",
                         f"{s['other_cpu_ms']:.2f}", f"{s['overhead_vs_ort']:.1%}",
                         f"{hop_in['bytes_per_inference'] / 1e3:.0f} kB ({hop_in['saved']:.0%})",
                         f"{hop_out['bytes_per_inference'] / 1e3:.0f} kB ({hop_out['saved']:.0%})"])
    return table(["codec", "stage", "ort ms", "codec ms", "other CPU ms", "overhead/ort",
                  "in: bytes (saved)", "out: bytes (saved)"], rows)
