"""Start `defer gateway` as a process and wait for its ready line (tests, benchmarks).

The gateway prints one line to stdout once every port listens and every chain is wired:
`defer gateway listening on http=H:P grpc=H:P metrics=H:P`. `start_gateway` waits for that
line (never a fixed sleep), with the log on a file; `GatewayProcess.stop` sends SIGTERM (the
gateway drains and exits 0), then SIGKILL after `grace` seconds.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from defer.errors import StartupError

READY_PREFIX = "defer gateway listening on "


@dataclass
class GatewayProcess:
    """A running `defer gateway` and the addresses it serves."""

    process: subprocess.Popen
    log_path: Path
    addresses: dict[str, str] = field(default_factory=dict)  # http, grpc, metrics -> host:port

    @property
    def http(self) -> str:
        return self.addresses["http"]

    @property
    def grpc(self) -> str:
        return self.addresses["grpc"]

    @property
    def metrics(self) -> str:
        return self.addresses["metrics"]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM, wait up to `grace` s, then SIGKILL; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def ready_line(addresses: dict[str, str]) -> str:
    return READY_PREFIX + " ".join(f"{k}={v}" for k, v in addresses.items())


def parse_ready_line(line: str) -> dict[str, str]:
    if not line.startswith(READY_PREFIX):
        raise StartupError(f"the gateway printed {line!r}, not its ready line")
    return dict(part.split("=", 1) for part in line[len(READY_PREFIX):].split())


def start_gateway(manifest: str | Path, chains: list[list[str]], *, args: tuple[str, ...] = (),
                  log_path: str | Path | None = None, timeout: float = 60.0) -> GatewayProcess:
    """`python -m defer gateway` on free ports (override with `args`); returns once ready."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="defer-gateway-", suffix=".log")
        os.close(fd)
        log_path = name
    command = [sys.executable, "-m", "defer", "gateway", "--manifest", str(manifest),
               "--nodes", ",".join(chains[0])]
    for chain in chains[1:]:
        command += ["--chain", ",".join(chain)]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file,
                                   stdin=subprocess.DEVNULL)
    gateway = GatewayProcess(process, Path(log_path))
    try:
        gateway.addresses = parse_ready_line(_first_line(process, timeout))
    except BaseException as err:
        gateway.stop(grace=5.0)
        if isinstance(err, StartupError):
            raise StartupError(f"{err}\n{gateway.log_tail()}") from None
        raise
    return gateway


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(f"gateway (pid {process.pid}) printed no ready line within "
                                   f"{timeout:g} s")
            if not selector.select(left):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
                raise StartupError(f"gateway (pid {process.pid}) exited with code "
                                   f"{process.returncode} before it was ready")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")
