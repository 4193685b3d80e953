"""Shared pieces of the benchmark scenarios: the example model, spreads, and table printing.

Every figure is a ratio of two things measured in the same run, repeated `runs` times; a
spread is reported as the median and the min..max over those runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Context:
    quick: bool
    runs: int
    work_dir: Path
    count: int  # inferences per measured stream
    log: Any = print


def spread(values: list[float]) -> dict[str, float | int | list[float]]:
    """Median, min, max and the raw values of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}


def fmt_spread(s: dict, digits: int = 2, unit: str = "") -> str:
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def write_result(path: Path, result: dict, text: str) -> int:
    """A scenario's own command ends here: its figures as JSON at `path`, its table printed."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"all figures: {path}")
    return 0


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- measuring ------------------------------------------------------------------------------


def single_device(manifest, whole_model, samples: list[dict], warmup: int = 3) -> dict:
    """The whole model in this process, pinned to one core, one onnxruntime thread."""
    from defer.local import single_process

    result = single_process(manifest, whole_model, samples, warmup)
    result.pop("outputs")
    return result


def chain_stats(manifest, addresses: list[str], samples: list[dict], codec: str | None = None,
                warmup: int = 3, seconds: float | None = None, timeout: float = 60.0) -> dict:
    """Stream `samples` through running nodes (after `warmup` of them) and return the stats.

    With `seconds`, stop submitting once that much time has passed (slow, shaped links).
    """
    import time

    from defer.runtime.dispatcher import Dispatcher

    with Dispatcher(manifest, addresses, codec=codec, timeout=timeout) as dispatcher:
        for _ in dispatcher.map(samples[:warmup]):
            pass
        dispatcher.reset_stats()
        deadline = time.monotonic() + seconds if seconds else None

        def feed():
            for sample in samples[warmup:]:
                if deadline and time.monotonic() > deadline:
                    return
                yield sample

        for _ in dispatcher.map(feed()):
            pass
        return dispatcher.stats()


def busy_balance(stats: dict) -> float:
    """Busiest node's onnxruntime time / the mean node's."""
    busy = [s["ort_ms_per_inference"] for s in stats["stages"]]
    return max(busy) / (sum(busy) / len(busy))
