"""Dynamic batching (`--max-batch B --max-delay-ms D`): concurrent requests become one request.

Requests whose inputs agree in every dimension but the first are queued together; a group is
sent as one request (inputs concatenated along axis 0) when it holds B rows (samples) or when
its first request has waited D ms, whichever comes first. The outputs are split back along
axis 0, so each request gets exactly its own rows; an error answers every request of the batch.
A request of B rows or more goes alone. Replay on a chain failure works on the whole batch.

Only bundles whose batch dimension is dynamic can take this: `check_batchable` refuses the
rest, naming the first tensor with a fixed first dimension.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defer.errors import DeferError, UsageError
from defer.manifest import Manifest
from defer.tensors import Sample, TensorSpec


def check_batchable(manifest: Manifest, max_batch: int) -> None:
    """UsageError unless every tensor the chain carries has a dynamic first dimension."""
    if max_batch < 1:
        raise UsageError(f"--max-batch {max_batch}: need at least 1 (1 = no batching)")
    tensors: list[tuple[str, TensorSpec]] = [("model input", s) for s in manifest.inputs]
    tensors += [("model output", s) for s in manifest.outputs]
    for stage in manifest.stages:
        tensors += [(f"stage {stage.index} tensor", s)
                    for s in stage.inputs + stage.outputs + stage.forward]
    for what, spec in tensors:
        first = spec.shape[0] if spec.shape else None
        if not spec.shape or (isinstance(first, int) and first >= 0):
            raise UsageError(
                f"--max-batch {max_batch} needs bundles with a dynamic batch dimension, but "
                f"{what} {spec.name!r} has shape {spec.shape_text()}; export the model with a "
                "symbolic first dimension (e.g. 'N') and recompile, or drop --max-batch")


@dataclass
class _Waiting:
    inputs: Sample
    rows: int
    future: asyncio.Future


@dataclass
class _Group:
    waiting: list[_Waiting] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Group concurrent requests for `run` (the pool's infer), which gets one batch at a time.

    `spawn` starts a batch's task in the gateway's TaskGroup; `observe(n)` sees each batch size.
    """

    def __init__(self, run: Callable[[Sample], Awaitable[Any]], max_batch: int,
                 max_delay: float, spawn: Callable[[Any], Any],
                 observe: Callable[[int], None] = lambda n: None) -> None:
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay
        self.spawn, self.observe = spawn, observe
        self._groups: dict[tuple, _Group] = {}

    async def infer(self, inputs: Sample) -> tuple[dict[str, np.ndarray], Any]:
        """This request's outputs (its own rows) and the batch's answer (which chain...)."""
        rows = next(iter(inputs.values())).shape[0]
        if rows >= self.max_batch:
            answer = await self.run(inputs)
            self.observe(1)
            return answer.outputs, answer
        key = tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(inputs.items()))
        group = self._groups.setdefault(key, _Group())
        item = _Waiting(inputs, rows, asyncio.get_running_loop().create_future())
        if group.rows + rows > self.max_batch:
            self._flush(key)
            group = self._groups.setdefault(key, _Group())
        group.waiting.append(item)
        group.rows += rows
        if group.rows >= self.max_batch:
            self._flush(key)
        elif group.timer is None:
            group.timer = asyncio.get_running_loop().call_later(self.max_delay, self._flush, key)
        return await item.future

    def _flush(self, key: tuple) -> None:
        group = self._groups.pop(key, None)
        if group is None or not group.waiting:
            return
        if group.timer is not None:
            group.timer.cancel()
        self.spawn(self._send(group.waiting))

    async def _send(self, waiting: list[_Waiting]) -> None:
        self.observe(len(waiting))
        names = list(waiting[0].inputs)
        batch = {n: np.concatenate([w.inputs[n] for w in waiting]) if len(waiting) > 1
                 else waiting[0].inputs[n] for n in names}
        try:
            answer = await self.run(batch)
        except (DeferError, asyncio.CancelledError) as err:
            for w in waiting:
                if not w.future.done():
                    w.future.set_exception(err if isinstance(err, DeferError)
                                           else DeferError("the gateway is shutting down"))
            if isinstance(err, asyncio.CancelledError):
                raise
            return
        offsets = np.cumsum([w.rows for w in waiting])[:-1]
        parts = {name: np.split(array, offsets) for name, array in answer.outputs.items()}
        for i, w in enumerate(waiting):
            if not w.future.done():
                w.future.set_result(({n: parts[n][i] for n in parts}, answer))
