"""What a stage holds in memory, exactly, without a matrix over all (start, end) pairs.

A stage covering ops [a, b) holds the weights its ops use (a weight shared by several ops is
counted once), the bytes it receives at cut a, and every tensor its ops produce:

    memory(a, b) = sum(bytes of the union of weights of ops a..b-1) + received[a]
                   + produced[a] + ... + produced[b-1]

It grows with b for a fixed a, so one number per start says everything a cap needs to know:
`reach(cap)[a]` is the last end b with memory(a, b) <= cap (a itself when not even one op fits).
`reach` sweeps the starts once with a Fenwick tree that counts each weight at its first use
inside the window: O((N + weight uses) log N) time, O(N + weight uses) memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class StageMemory:
    op_weights: Sequence[Sequence[int]]  # (N,) ids of the weights each op uses
    weight_bytes: np.ndarray  # bytes of each weight id
    produced: np.ndarray  # (N,) bytes each op's outputs take
    received: np.ndarray  # (N+1,) bytes a stage starting at cut k receives

    @property
    def n_ops(self) -> int:
        return len(self.produced)

    def of(self, a: int, b: int) -> int:
        """memory(a, b), written out directly (for single stages and for checking)."""
        weights = {w for i in range(a, b) for w in self.op_weights[i]}
        return int(sum(int(self.weight_bytes[w]) for w in weights) + self.received[a]
                   + np.sum(self.produced[a:b]))

    def largest_op(self) -> int:
        """The most memory any one-op stage needs: no cap below it admits any plan."""
        return max(self.of(a, a + 1) for a in range(self.n_ops))

    def fewest_stages(self, cap: float) -> int | None:
        """The fewest stages that each fit in `cap`, or None when no split fits. A breadth-first
        search over cut positions: from a, one stage reaches any end in (a, reach[a]] (not
        greedy: what a stage receives at its start varies, so a later start may reach less)."""
        reach, n = self.reach(cap), self.n_ops
        unseen = list(range(1, n + 2))  # unseen[i]: the first position >= i not reached yet

        def first_unseen(i: int) -> int:
            while unseen[i - 1] != i:
                unseen[i - 1] = unseen[unseen[i - 1] - 1]
                i = unseen[i - 1]
            return i

        frontier, stages = [0], 0
        while frontier:
            stages += 1
            reached = []
            for a in frontier:
                b = first_unseen(a + 1)
                while b <= reach[a]:
                    if b == n:
                        return stages
                    reached.append(b)
                    unseen[b - 1] = b + 1
                    b = first_unseen(b + 1)
            frontier = reached
        return None

    def reach(self, cap: float) -> np.ndarray:
        """(N+1,) int: for each start a, the largest b >= a with memory(a, b) <= cap."""
        n = self.n_ops
        uses = _next_uses(self.op_weights, n)
        tree = _Fenwick(n)
        counted_first = np.asarray(self.produced, dtype=np.int64).copy()
        for i, weights in enumerate(self.op_weights):
            for w, prev in zip(weights, uses.prev[i]):
                if prev < 0:
                    counted_first[i] += int(self.weight_bytes[w])
        tree.build(counted_first)
        reach = np.empty(n + 1, dtype=np.int64)
        reach[n] = n
        for a in range(n):
            budget = cap - float(self.received[a])
            reach[a] = a if budget < 0 else min(n, tree.last_within(a, budget))
            # Moving the start past op a: its weights are now first used at their next use.
            for w, nxt in zip(self.op_weights[a], uses.next[a]):
                if nxt >= 0:
                    tree.add(nxt, int(self.weight_bytes[w]))
        return reach


@dataclass
class _Uses:
    prev: list[list[int]]  # per op, per weight: the previous op using it (-1: none)
    next: list[list[int]]  # per op, per weight: the next op using it (-1: none)


def _next_uses(op_weights: Sequence[Sequence[int]], n: int) -> _Uses:
    last: dict[int, tuple[int, int]] = {}
    prev = [[-1] * len(ws) for ws in op_weights]
    nxt = [[-1] * len(ws) for ws in op_weights]
    for i in range(n):
        for j, w in enumerate(op_weights[i]):
            if w in last:
                p, pj = last[w]
                prev[i][j] = p
                nxt[p][pj] = i
            last[w] = (i, j)
    return _Uses(prev, nxt)


class _Fenwick:
    """Prefix sums of non-negative integers with point updates and a budget search."""

    def __init__(self, n: int):
        self.n = n
        self.top = 1 << max(0, n.bit_length() - 1) if n else 0
        self._tree = [0] * (n + 1)

    def build(self, values: np.ndarray) -> None:
        tree = self._tree
        tree[1:] = [int(v) for v in values]
        for i in range(1, self.n + 1):
            parent = i + (i & -i)
            if parent <= self.n:
                tree[parent] += tree[i]

    def add(self, index: int, value: int) -> None:
        tree = self._tree
        i = index + 1
        while i <= self.n:
            tree[i] += value
            i += i & -i

    def prefix(self, count: int) -> int:
        """Sum of the first `count` values."""
        tree, total = self._tree, 0
        while count > 0:
            total += tree[count]
            count -= count & -count
        return total

    def last_within(self, start: int, budget: float) -> int:
        """Largest b with sum(values[start:b]) <= budget (values are >= 0)."""
        tree, target = self._tree, self.prefix(start) + budget
        position, total, step = 0, 0, self.top
        while step:
            nxt = position + step
            if nxt <= self.n and total + tree[nxt] <= target:
                position, total = nxt, total + tree[nxt]
            step >>= 1
        return max(position, start)
