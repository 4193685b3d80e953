"""`run_gateway(GatewayConfig)`: one Dispatcher per chain, every server in one asyncio loop.

Startup: load the manifest (and refuse --max-batch unless the batch dimension is dynamic) ->
wire every chain, each with its own spares (a chain that cannot be wired is a startup error,
naming it; progress is reported per chain) -> bind the
REST, gRPC and metrics ports (0 = a free one) -> call `on_ready` with the bound addresses.
uvicorn serves REST and metrics, grpc.aio serves gRPC, and the pool's watcher polls chain
states and probes failed chains; each runs as a task of one TaskGroup. SIGINT/SIGTERM: stop
accepting, let requests in flight finish (up to `drain` seconds, then they are cancelled and
counted in the log), close the trace, close every Dispatcher. The nodes keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from defer import __version__
from defer.address import format_address
from defer.errors import DeferError, StartupError, UsageError
from defer.manifest import load_manifest
from defer.runtime.dispatcher import Dispatcher
from defer.runtime.options import DispatchOptions
from defer.serving.batching import Batcher, check_batchable
from defer.serving.metrics import GatewayMetrics
from defer.serving.oip import ModelInfo, error_status
from defer.serving.pool import Answer, ChainPool, probe_inputs
from defer.serving.trace import TraceWriter
from defer.tensors import Sample, check_sample

log = logging.getLogger(__name__)


@dataclass
class GatewayConfig:
    """Everything `defer gateway` takes; see its --help for each option."""

    manifest: Path
    chains: list[list[str]]
    spares: list[list[str]] = field(default_factory=list)  # chain i's spares (may be shorter)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    name: str | None = None
    max_batch: int = 1
    max_delay_ms: float = 2.0
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)  # every chain's
    probe_interval: float = 1.0
    drain: float = 10.0
    trace: Path | None = None


class Gateway:
    """The model, the chains and the batcher behind both front ends."""

    def __init__(self, model: ModelInfo, pool: ChainPool, metrics: GatewayMetrics) -> None:
        self.model, self.pool, self.metrics = model, pool, metrics
        self.batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        return self.pool.ready

    async def infer(self, inputs: Sample) -> tuple[dict, Answer]:
        """Outputs of one request (validated against the manifest first) and its Answer."""
        arrays = check_sample(self.model.inputs, inputs)
        if self.batcher is not None:
            return await self.batcher.infer(arrays)
        answer = await self.pool.infer(arrays)
        return answer.outputs, answer

    @contextlib.asynccontextmanager
    async def answering(self, protocol: str) -> AsyncIterator[None]:
        """Count one request in flight and record its outcome and duration."""
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        except DeferError as err:
            outcome = error_status(err)[2]
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.answered(protocol, outcome, time.perf_counter() - started)


def run_gateway(config: GatewayConfig, on_ready: Callable[[dict[str, str]], None]) -> None:
    """Serve until SIGINT/SIGTERM (see the module docstring)."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # no *_created series: this process is the gateway alone
    manifest = load_manifest(config.manifest)
    if config.max_batch != 1:
        check_batchable(manifest, config.max_batch)
    _check_chains(config.chains, config.spares)
    trace = TraceWriter(config.trace) if config.trace else None
    dispatchers: list[Dispatcher] = []
    try:
        dispatchers = _wire(config, manifest, trace)
        model = ModelInfo(name=config.name or manifest.model.get("name") or "model",
                          inputs=manifest.inputs, outputs=manifest.outputs,
                          platform=f"defer_{manifest.stages[0].format}",
                          server_version=__version__)
        pool = ChainPool(dispatchers, probe_inputs(manifest.inputs),
                         timeout=config.dispatch.timeout,
                         probe_interval=config.probe_interval)
        metrics = GatewayMetrics(pool.chains, name=model.name, version=__version__)
        pool.observers = (metrics,) + ((trace,) if trace else ())
        gateway = Gateway(model, pool, metrics)
        asyncio.run(_serve(config, gateway, on_ready))
    finally:
        if trace is not None:
            trace.close()
        for dispatcher in dispatchers:
            dispatcher.close()


def _check_chains(chains: list[list[str]], spares: list[list[str]]) -> None:
    """UsageError unless every chain has nodes and no node or spare serves two chains (two
    Dispatchers would take it from each other: a node's newest dispatcher wins)."""
    if not chains:
        raise UsageError("give at least one chain (--nodes)")
    if len(spares) > len(chains):
        raise UsageError(f"{len(spares)} --spares lists for {len(chains)} chains; give at "
                         "most one per chain, in chain order")
    owner: dict[str, int] = {}
    for index, addresses in enumerate(chains):
        for address in [*addresses, *(spares[index] if index < len(spares) else [])]:
            if owner.setdefault(address, index) != index:
                raise UsageError(f"node {address} is in chain {owner[address]} and chain "
                                 f"{index}; every chain needs nodes (and spares) of its own")


def _wire(config: GatewayConfig, manifest, trace: TraceWriter | None) -> list[Dispatcher]:
    dispatchers: list[Dispatcher] = []
    try:
        for index, nodes in enumerate(config.chains):
            spares = config.spares[index] if index < len(config.spares) else []
            options = dataclasses.replace(config.dispatch, spares=tuple(spares))
            try:
                dispatchers.append(Dispatcher(manifest, nodes, options,
                                              tracer=trace.tracer(index) if trace else None))
            except DeferError as err:
                err.args = (f"chain {index} ({','.join(nodes)}): {err}",)  # same type and code
                raise
            log.info("chain %d wired: %s", index, ",".join(nodes))
    except BaseException:
        for dispatcher in dispatchers:
            dispatcher.close()
        raise
    return dispatchers


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: run_gateway owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int, what: str, option: str) -> socket.socket:
    """A listening TCP socket. IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted
    sockets only when the listener's proto says TCP (else every response waits ~40 ms for a
    delayed ACK)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise StartupError(f"cannot listen for {what} on {host}:{port} ({err.strerror or err});"
                           f" pick another {option} (0 = any free port)") from None
    return sock


async def _serve(config: GatewayConfig, gateway: Gateway,
                 on_ready: Callable[[dict[str, str]], None]) -> None:
    from defer.serving.grpc_api import create_server
    from defer.serving.rest import create_app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http_sock = _listen(config.host, config.http_port, "HTTP", "--http-port")
    metrics_sock = _listen(config.host, config.metrics_port, "metrics", "--metrics-port")
    try:
        grpc_server, grpc_port = create_server(gateway,
                                               format_address(config.host, config.grpc_port))
    except RuntimeError as err:
        raise StartupError(f"cannot listen for gRPC on {config.host}:{config.grpc_port} "
                           f"({err}); pick another --grpc-port (0 = any free port)") from None
    servers = [_Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                      timeout_graceful_shutdown=config.drain))
               for app in (create_app(gateway), gateway.metrics.asgi_app())]
    async with asyncio.TaskGroup() as tasks:
        if config.max_batch != 1:
            gateway.batcher = Batcher(gateway.pool.infer, config.max_batch,
                                      config.max_delay_ms / 1000, tasks.create_task,
                                      gateway.metrics.batch_size.observe)
        await grpc_server.start()
        for server, sock in zip(servers, (http_sock, metrics_sock)):
            tasks.create_task(server.serve(sockets=[sock]))
        tasks.create_task(gateway.pool.watch(stop, tasks.create_task))
        on_ready({"http": format_address(config.host, http_sock.getsockname()[1]),
                  "grpc": format_address(config.host, grpc_port),
                  "metrics": format_address(config.host, metrics_sock.getsockname()[1])})
        await stop.wait()
        log.info("stopping: draining requests in flight (up to %g s)", config.drain)
        for server in servers:
            server.should_exit = True
        await grpc_server.stop(config.drain)
    log.info("gateway stopped")
