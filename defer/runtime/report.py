"""The measures a run reports (DESIGN.md "Measures"), computed the same way every time from the
dispatcher's own timings and the nodes' STATS counters, plus a plain-text rendering of them.
Energy is an estimate: CPU-seconds x an assumed power per busy core, and says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_WATTS_PER_CORE = 5.0  # assumed power of one busy edge core (Raspberry-Pi class)


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0}
    ms = np.asarray(latencies_s) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean())}


def counter_delta(now: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """now - then for every numeric counter (nested per-codec dicts included)."""
    out: dict[str, Any] = {}
    for key, value in now.items():
        old = then.get(key)
        if isinstance(value, dict):
            out[key] = counter_delta(value, old if isinstance(old, dict) else {})
        elif isinstance(value, int | float) and not isinstance(value, bool) and key not in (
                "queue_depth", "send_queue_depth", "queue_max", "stage"):
            out[key] = value - (old if isinstance(old, int | float) else 0)
        else:
            out[key] = value
    return out


def chain_report(*, nodes: list[str], hop_codecs: list[str], requests: int, window_s: float,
                 latencies_s: list[float], hop0_bytes: dict[str, int], hop0_raw: int,
                 node_deltas: list[dict[str, Any]], watts: float) -> dict[str, Any]:
    """Everything `Dispatcher.stats()` returns, as a JSON-ready dict."""
    n = max(requests, 1)
    hops = [_hop(0, "dispatcher", nodes[0], hop_codecs[0], hop0_bytes, hop0_raw, n)]
    for i, delta in enumerate(node_deltas):
        to = nodes[i + 1] if i + 1 < len(nodes) else "dispatcher"
        hops.append(_hop(i + 1, nodes[i], to, hop_codecs[i + 1], delta.get("bytes_out", {}),
                         delta.get("raw_out", 0), n))
    stages = [_stage(i, nodes[i], d, window_s, watts) for i, d in enumerate(node_deltas)]
    return {
        "requests": requests,
        "wall_s": window_s,
        "throughput": requests / window_s if window_s > 0 else 0.0,
        "latency_ms": percentiles_ms(latencies_s),
        "hops": hops,
        "stages": stages,
        "energy": {
            "assumed_watts_per_core": watts,
            "joules_per_inference": sum(s["energy_j_per_inference"] for s in stages),
            "note": f"estimate: CPU-seconds per inference x an assumed {watts:g} W per busy "
                    "core; not a measurement",
        },
    }


def _hop(index: int, src: str, dst: str, codec: str, by_codec: dict[str, int], raw: int,
         n: int) -> dict[str, Any]:
    sent = sum(by_codec.values())
    return {"hop": index, "from": src, "to": dst, "codec": codec,
            "bytes_per_inference": sent / n, "raw_bytes_per_inference": raw / n,
            "saved": 1.0 - sent / raw if raw else 0.0,
            "bytes_per_inference_by_codec": {k: v / n for k, v in by_codec.items()}}


def _stage(index: int, node: str, d: dict[str, Any], window_s: float,
           watts: float) -> dict[str, Any]:
    served = max(d.get("requests", 0), 1)
    busy = d.get("busy_s", 0.0)
    share = busy / window_s if window_s > 0 else 0.0
    cpu_per = d.get("cpu_s", 0.0) / served
    return {
        "stage": index, "node": node, "requests": d.get("requests", 0),
        "errors": d.get("errors", 0),
        "busy_share": share, "overhead_share": max(0.0, 1.0 - share),
        "ort_ms_per_inference": busy / served * 1e3,
        "codec_ms_per_inference": (d.get("decode_s", 0.0) + d.get("encode_s", 0.0)) / served * 1e3,
        "cpu_s_per_inference": cpu_per, "energy_j_per_inference": cpu_per * watts,
        "queue_max": d.get("queue_max", 0),
    }


def format_report(stats: dict[str, Any], title: str = "chain") -> str:
    """Human-readable lines for a `chain_report` dict."""
    lat = stats["latency_ms"]
    lines = [f"{title}: {stats['requests']} inferences in {stats['wall_s']:.2f} s = "
             f"{stats['throughput']:.1f} inferences/s",
             f"  latency ms  p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}",
             "  hop  from -> to                                codec        bytes/inf   saved"]
    for h in stats["hops"]:
        route = f"{h['from']} -> {h['to']}"
        lines.append(f"  {h['hop']:<4} {route:<42} {h['codec']:<10} "
                     f"{h['bytes_per_inference']:>11.0f}  {h['saved']:>6.1%}")
    lines.append("  stage node                  busy   overhead  ort ms/inf  CPU-s/inf  J/inf (est.)")
    for s in stats["stages"]:
        lines.append(f"  {s['stage']:<5} {s['node']:<21} {s['busy_share']:>5.1%}  "
                     f"{s['overhead_share']:>7.1%}  {s['ort_ms_per_inference']:>10.2f}  "
                     f"{s['cpu_s_per_inference']:>9.4f}  {s['energy_j_per_inference']:>8.4f}")
    energy = stats["energy"]
    lines.append(f"  energy {energy['joules_per_inference']:.4f} J/inference — {energy['note']}")
    return "\n".join(lines)
