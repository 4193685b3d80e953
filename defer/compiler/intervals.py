"""Interval queries over cut positions, vectorised with sparse tables (O(N log N) numpy work,
no Python loop over positions). `reach[a]` is the last end a stage starting at `a` may have
(None: no limit); the partitioner's sweeps ask, for every position at once:

- stab_max: for each end b, the best value over the starts a whose interval (a, reach[a]]
  contains b (which starts can still end at b);
- range_min_after: for each start a, the smallest value over the ends in (a, reach[a]].
"""

from __future__ import annotations

import numpy as np


def stab_max(values: np.ndarray, reach: np.ndarray | None) -> np.ndarray:
    """out[b] = max values[a] over a < b <= reach[a] (reach None: over every a < b)."""
    size = len(values)
    out = np.full(size, -np.inf)
    if reach is None:
        out[1:] = np.maximum.accumulate(values[:-1])
        return out
    lo, hi = np.arange(size) + 1, np.minimum(reach, size - 1)
    live = (hi >= lo) & (values > -np.inf)
    lo, hi, vals = lo[live], hi[live], values[live]
    if len(lo) == 0:
        return out
    levels = int(size).bit_length()
    table = np.full((levels, size), -np.inf)
    k = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    np.maximum.at(table, (k, lo), vals)
    np.maximum.at(table, (k, hi - (1 << k) + 1), vals)
    for level in range(levels - 1, 0, -1):
        half = 1 << (level - 1)
        below = table[level - 1]
        np.maximum(below, table[level], out=below)
        np.maximum(below[half:], table[level, : size - half], out=below[half:])
    return table[0]


def range_min_after(values: np.ndarray, reach: np.ndarray | None) -> np.ndarray:
    """out[a] = min values[b] over a < b <= reach[a] (reach None: over every b > a)."""
    size = len(values)
    out = np.full(size, np.inf)
    if reach is None:
        out[:-1] = np.minimum.accumulate(values[::-1])[::-1][1:]
        return out
    lo, hi = np.arange(size) + 1, np.minimum(reach, size - 1)
    live = hi >= lo
    table = [values]
    while (1 << len(table)) <= size:
        prev, half = table[-1], 1 << (len(table) - 1)
        table.append(np.minimum(prev[: len(prev) - half], prev[half:]))
    lo, hi = lo[live], hi[live]
    k = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    result = np.empty(len(lo))
    for level in np.unique(k):
        sel = k == level
        row = table[level]
        result[sel] = np.minimum(row[lo[sel]], row[hi[sel] - (1 << level) + 1])
    out[np.flatnonzero(live)] = result
    return out
