"""The dispatcher's public API: drive a chain of `defer serve` nodes, one per stage.

    with Dispatcher("bundles/manifest.json", ["10.0.0.1:7000", ...]) as chain:
        outputs = chain.infer(image)              # {output name: array}
        for outputs in chain.map(images): ...     # streamed, in input order, bounded window
        chain.stats()                             # throughput, latency, bytes, busy, energy

    Dispatcher(..., tracer=TraceFile("t.json").chain())   # spans of every request (trace.py)

It checks (or pushes) each node's bundle, wires the chain, encodes inputs for hop 0 and decodes
results. The work with sockets happens on a loop thread it owns (`loop_thread.py`): the chain's
wiring in `chain.py`, the stream and failover in `supervisor.py`, whose guarantee is written at
the top of `failover.py`. Nothing waits forever: every wait has a timeout, and a timeout names
the node that stopped answering. Use one Dispatcher from one thread at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from defer import progress
from defer.codecs import WireTensor, decode_tensor, encode_tensor, parse_codec
from defer.errors import DeferError, DeferTimeoutError, InputError
from defer.manifest import Manifest, load_manifest
from defer.runtime.chain import Chain
from defer.runtime.channel import client_tls
from defer.runtime.failover import State
from defer.runtime.loop_thread import LoopThread
from defer.runtime.options import DispatchOptions
from defer.runtime.protocol import Infer, Ping, Shutdown
from defer.runtime.report import chain_report, counter_delta
from defer.runtime.supervisor import Request, Supervisor
from defer.runtime.trace import RequestTrace
from defer.tensors import check_sample

log = logging.getLogger(__name__)

Inputs = np.ndarray | dict[str, np.ndarray]
_END = object()
LATENCY_WINDOW = 100_000  # latencies kept for percentiles: the newest, so memory stays bounded


class Dispatcher:
    """A chain of nodes, one per stage of `manifest`, in stage order.

    Options are `DispatchOptions` fields, given as `options=` or as keywords: `codec`,
    `inflight`, `timeout`, `spares`, `token`, `tls_ca`, `heartbeat`, `watts_per_core`.
    `tracer`: switches tracing on in every node and hears each answered request's spans (on
    the dispatcher's loop thread: keep it quick), e.g. `TraceFile(path).chain()`.
    """

    def __init__(self, manifest: str | Path | Manifest, nodes: list[str],
                 options: DispatchOptions | None = None, *,
                 tracer: Callable[[RequestTrace], None] | None = None,
                 **overrides: Any) -> None:
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        n = len(self.manifest.stages)
        self.options = dataclasses.replace(options or DispatchOptions(), **overrides).checked(
            n, list(nodes))
        opts = self.options
        self.hop_codecs = [parse_codec(opts.codec or self.manifest.codec).spec] * (n + 1)
        self.inflight, self.timeout = opts.inflight, opts.timeout
        self.in_flight = 0  # requests submitted whose results the caller has not taken
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._loop = LoopThread("defer-dispatcher")
        self._supervisor = Supervisor(list(opts.spares), tracer)
        self._reset_measures()
        self._loop.start()
        self._supervisor.chain = Chain(
            self.manifest, self.hop_codecs, loop=self._loop, listener=self._supervisor,
            ids=self._ids, timeout=opts.timeout, heartbeat=opts.heartbeat, token=opts.token,
            tls=client_tls(opts.tls_ca) if opts.tls_ca is not None else None,
            trace=tracer is not None)
        try:
            with progress.phase("wire", total=n) as step:
                self._loop.run(lambda: self._supervisor.setup(list(nodes), step),
                               timeout=opts.timeout * (3 * n + 1),
                               what=f"wiring {', '.join(nodes)}")
        except BaseException:
            self.close()
            raise

    # --- state --------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The chain's node addresses in stage order (a spare's, once it took over)."""
        return list(self._supervisor.chain.addresses)

    @property
    def state(self) -> State:
        return self._supervisor.state

    @property
    def recoveries(self) -> list[dict[str, Any]]:
        return list(self._supervisor.recoveries)

    @property
    def dropped_results(self) -> int:
        return self._supervisor.pending.dropped

    @property
    def completed(self) -> int:
        """Requests answered (first results only) since the last `reset_stats`."""
        return self._supervisor.completed - self._completed_before

    @property
    def pending(self) -> int:
        """Requests sent and not yet answered (RESULT or ERROR)."""
        return len(self._supervisor.pending)

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection and join the loop thread. The nodes keep running."""
        self._loop.stop(self._supervisor.close, timeout=self.timeout)

    def shutdown_nodes(self) -> None:
        """Ask every live chain node to drain and exit (SHUTDOWN); lost nodes are skipped."""
        for link in self._run(lambda: _now(self._supervisor.chain.live())):
            try:
                self._ask(link, Shutdown(drain=True), min(self.timeout, 5.0))
            except DeferError as err:
                log.warning("node %s did not confirm SHUTDOWN: %s", link.address, err)

    # --- the stream ---------------------------------------------------------------------------

    def submit(self, inputs: Inputs) -> Request:
        """Send one inference without waiting; take its outputs with `wait`."""
        request = Request(Infer(request_id=next(self._ids), tensors=self._encode(inputs)))
        if self._first_submit is None:
            self._first_submit = request.started
        self._loop.call_soon(self._supervisor.submit, request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return request

    def wait(self, request: Request) -> dict[str, np.ndarray]:
        """The outputs of a submitted request, by output name. NodeError if it failed."""
        try:
            result = request.result(self.timeout)
        except TimeoutError:
            raise self._stalled() from None
        finally:
            self.in_flight -= 1
        self._latencies.append(request.finished - request.started)
        arrays = {t.name: decode_tensor(t) for t in result.tensors}
        return {spec.name: arrays[spec.name] for spec in self.manifest.outputs}

    def infer(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Run one inference: a dict by input name (or one array for a single-input model)."""
        return self.wait(self.submit(inputs))

    def map(self, inputs: Iterable[Inputs]) -> Iterator[dict[str, np.ndarray]]:
        """Stream `inputs` through the chain; yield results in input order.

        At most `inflight` requests are outstanding: the next input is read only when a result
        is taken, so a slow consumer holds the window, not a growing backlog, and an input
        iterator is read lazily (memory stays bounded whatever its length).
        """
        window: deque[Request] = deque()
        source = iter(inputs)
        try:
            for item in source:
                window.append(self.submit(item))
                if len(window) >= self.inflight:
                    break
            while window:
                result = self.wait(window.popleft())
                item = next(source, _END)
                if item is not _END:
                    window.append(self.submit(item))
                yield result
        finally:
            self.in_flight -= len(window)

    def _encode(self, inputs: Inputs) -> tuple[WireTensor, ...]:
        specs = self.manifest.inputs
        if not isinstance(inputs, dict):
            if len(specs) != 1:
                raise InputError(f"this model takes {len(specs)} inputs; pass a dict with keys "
                                 f"{[s.name for s in specs]}")
            inputs = {specs[0].name: inputs}
        arrays = check_sample(specs, inputs)
        tensors = tuple(encode_tensor(s.name, arrays[s.name], self.hop_codecs[0]) for s in specs)
        for tensor in tensors:
            self._hop0_bytes[tensor.codec] += tensor.nbytes
            self._hop0_raw += tensor.raw_nbytes
        return tensors

    def _stalled(self) -> DeferTimeoutError:
        """Name the node that stopped answering (first without a PONG), else the last node."""
        for link in self._run(lambda: _now(list(self._supervisor.chain.links))):
            try:
                self._ask(link, Ping(), min(2.0, self.timeout))
            except DeferError:
                return DeferTimeoutError(f"no result within {self.timeout:g} s: node "
                                         f"{link.address} does not answer PING", node=link.address)
        last = self.nodes[-1]
        return DeferTimeoutError(f"no result from the last node {last} within {self.timeout:g} "
                                 "s (every node answers PING: the chain is slower than the "
                                 "timeout; raise it)", node=last)

    # --- measures -----------------------------------------------------------------------------

    def _reset_measures(self) -> None:
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._first_submit: float | None = None
        self._completed_before = self._supervisor.completed
        self._hop0_bytes: Counter[str] = Counter()
        self._hop0_raw = 0

    def reset_stats(self) -> None:
        """Start a new measurement window (e.g. after warm-up). Call with nothing in flight."""
        self._supervisor.baseline = self._run(self._supervisor.chain.counters)
        self._reset_measures()

    def stats(self) -> dict[str, Any]:
        """Throughput, latency, bytes per hop, stage busy share/overhead, CPU-s and energy,
        plus the failovers (`recoveries`) and the dropped late/duplicate results."""
        now = self._run(self._supervisor.chain.counters)
        end = self._supervisor.last_result
        window = (end - self._first_submit) if self._first_submit and end else 0.0
        report = chain_report(
            nodes=self.nodes, hop_codecs=self.hop_codecs, requests=self.completed,
            window_s=window, latencies_s=list(self._latencies), hop0_bytes=dict(self._hop0_bytes),
            hop0_raw=self._hop0_raw, watts=self.options.watts_per_core,
            node_deltas=[counter_delta(a, b) for a, b in zip(now, self._supervisor.baseline)])
        report["recoveries"] = self.recoveries
        report["dropped_results"] = self.dropped_results
        return report

    # --- control from the caller's thread -----------------------------------------------------

    def _run(self, command):
        return self._loop.run(command, self.timeout, what="the chain")

    def _ask(self, link, msg, timeout: float):
        return self._loop.run(lambda: self._supervisor.chain.ask(link, msg, timeout),
                              timeout + 1.0, what=f"node {link.address}")


async def _now(value):
    return value


__all__ = ["DispatchOptions", "Dispatcher", "Request"]
