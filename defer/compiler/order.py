"""Choosing the op order: branchy graphs (Inception, DenseNet, multi-input models) have many
valid topological orders, and each crosses different tensors at each position.

Three cheap candidates, all O((N + edges) log N):

- `file`: the file's own order wherever it is valid (stable Kahn).
- `depth`: depth first: after an op, its consumers that just became ready run next, so one
  branch is finished before the next starts.
- `greedy`: among the ready ops, the one that frees the most bytes and allocates the fewest
  (its outputs minus the inputs it is the last reader of), ties to depth first.

`auto` scores each by the bytes alive summed over all positions (the area under the crossing
bytes: what the cuts of any plan choose from) and keeps the smallest, preferring the file's
order on a tie. Every candidate is a valid topological order, so the choice is never wrong,
only more or less compact.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from defer.errors import UsageError

ORDERS = ("auto", "file", "depth", "greedy")


def topological(ops: Sequence, available: set[str]) -> list[int]:
    """Kahn's algorithm, stable: keeps the file's order wherever it is already valid."""
    deps, users = _edges(ops, available)
    return _kahn(deps, users, lambda i, _stamp: i)


def choose_order(ops: Sequence, inputs: set[str], outputs: list[str], sizes: dict[str, int],
                 order: str = "auto") -> tuple[list[int], str]:
    """A topological order of `ops` (indices) and the name of the candidate chosen."""
    if order not in ORDERS:
        raise UsageError(f"op order {order!r} unknown; use one of {', '.join(ORDERS)}")
    deps, users = _edges(ops, inputs)
    candidates = {}
    if order in ("auto", "file"):
        candidates["file"] = _kahn(deps, users, lambda i, _stamp: i)
    if order in ("auto", "depth"):
        candidates["depth"] = _kahn(deps, users, lambda i, stamp: (-stamp, i))
    if order in ("auto", "greedy"):
        candidates["greedy"] = _greedy(ops, deps, users, sizes, outputs)
    scores = {name: live_area(ops, seq, inputs, outputs, sizes) for name, seq in candidates.items()}
    best = min(scores, key=lambda name: (scores[name], name != "file"))
    return candidates[best], best


def live_area(ops: Sequence, seq: list[int], inputs: set[str], outputs: list[str],
              sizes: dict[str, int]) -> int:
    """Sum over the cuts 0..N of the bytes crossing them, for the order `seq`."""
    producer = {t: -1 for t in inputs}
    last: dict[str, int] = {}
    for pos, i in enumerate(seq):
        for t in ops[i].inputs:
            if t in producer:
                last[t] = pos
        for t in ops[i].outputs:
            producer[t] = pos
    for t in outputs:
        last[t] = len(seq)
    return sum(sizes.get(t, 0) * (end - producer[t]) for t, end in last.items() if t in producer)


def _edges(ops: Sequence, available: set[str]) -> tuple[list[set[int]], list[list[int]]]:
    produced_by = {t: i for i, op in enumerate(ops) for t in op.outputs if t}
    deps = [{produced_by[t] for t in op.inputs if t in produced_by and t not in available}
            for op in ops]
    users: list[list[int]] = [[] for _ in ops]
    for i, d in enumerate(deps):
        for j in sorted(d):
            users[j].append(i)
    return deps, users


def _kahn(deps: list[set[int]], users: list[list[int]], key) -> list[int]:
    """Kahn's algorithm; the ready op with the smallest key(i, stamp) runs next, stamp = the
    step at which it became ready."""
    remaining = [len(d) for d in deps]
    ready = [(key(i, 0), i) for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, (key(u, len(order)), u))
    if len(order) != len(deps):
        raise UsageError("the model graph has a cycle; export it again from its framework")
    return order


def _greedy(ops: Sequence, deps: list[set[int]], users: list[list[int]],
            sizes: dict[str, int], outputs: list[str]) -> list[int]:
    """Ready op with the smallest (bytes it allocates - bytes it frees) next; scores of the
    ready ops are recomputed when a tensor they read loses a reader."""
    readers: dict[str, int] = {}
    for op in ops:
        for t in set(op.inputs):
            readers[t] = readers.get(t, 0) + 1
    for t in outputs:  # the dispatcher reads the model outputs after the last op
        readers[t] = readers.get(t, 0) + 1
    readers_of: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for t in set(op.inputs):
            readers_of.setdefault(t, []).append(i)

    def score(i: int) -> int:
        op = ops[i]
        freed = sum(sizes.get(t, 0) for t in set(op.inputs) if readers.get(t) == 1)
        return sum(sizes.get(t, 0) for t in op.outputs) - freed

    remaining = [len(d) for d in deps]
    is_ready = [r == 0 for r in remaining]
    stamp = [0] * len(ops)
    ready = [(score(i), 0, i) for i in range(len(ops)) if is_ready[i]]
    heapq.heapify(ready)
    done = [False] * len(ops)
    order: list[int] = []
    while ready:
        value, neg_stamp, i = heapq.heappop(ready)
        if done[i] or value != score(i):
            if not done[i]:
                heapq.heappush(ready, (score(i), neg_stamp, i))
            continue
        done[i] = True
        order.append(i)
        for t in set(ops[i].inputs):
            readers[t] -= 1
            if readers[t] == 1:  # its last reader now frees it: rescore that reader
                for j in readers_of[t]:
                    if is_ready[j] and not done[j]:
                        heapq.heappush(ready, (score(j), -stamp[j], j))
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                is_ready[u] = True
                stamp[u] = len(order)
                heapq.heappush(ready, (score(u), -len(order), u))
    if len(order) != len(deps):
        raise UsageError("the model graph has a cycle; export it again from its framework")
    return order
