"""`defer gateway` as a command: a bad address is a usage error (exit 2) before anything starts;
a port already taken is a startup error (exit 3) naming the option to change; SIGTERM drains
and exits 0 (checked by every gateway test's teardown through GatewayProcess.stop)."""
from __future__ import annotations

import socket
import subprocess
import sys

from click.testing import CliRunner
from runtime_helpers import compile_tiny, residual_mlp

from defer.cli import main
from defer.local import start_node, stop_processes


def test_a_bad_node_address_is_a_usage_error(tmp_path):
    manifest = compile_tiny(residual_mlp(), tmp_path, n_stages=2)
    result = CliRunner().invoke(main, ["gateway", "--manifest", str(manifest.path),
                                       "--nodes", "127.0.0.1:7000,nowhere"])
    assert result.exit_code == 2 and "bad node address 'nowhere'" in result.output


def test_a_taken_port_is_a_startup_error(tmp_path):
    manifest = compile_tiny(residual_mlp(), tmp_path, n_stages=2)
    nodes = []
    with socket.create_server(("127.0.0.1", 0)) as taken:
        try:
            nodes = [start_node(manifest.bundle_path(i)) for i in range(2)]
            run = subprocess.run(
                [sys.executable, "-m", "defer", "gateway", "--manifest", str(manifest.path),
                 "--nodes", ",".join(n.address for n in nodes), "--grpc-port", "0",
                 "--metrics-port", "0", "--http-port", str(taken.getsockname()[1])],
                capture_output=True, text=True, timeout=60)
        finally:
            stop_processes(nodes)
    assert run.returncode == 3, run.stderr
    assert "--http-port" in run.stderr and run.stdout == ""


def test_a_node_in_two_chains_is_a_usage_error(tmp_path):
    manifest = compile_tiny(residual_mlp(), tmp_path, n_stages=2)
    result = CliRunner().invoke(main, [
        "gateway", "--manifest", str(manifest.path), "--nodes", "127.0.0.1:7000,127.0.0.1:7001",
        "--chain", "127.0.0.1:7002,127.0.0.1:7003", "--spares", "", "--spares", "127.0.0.1:7001"])
    assert result.exit_code == 2
    assert "node 127.0.0.1:7001 is in chain 0 and chain 1" in result.output
    result = CliRunner().invoke(main, [
        "gateway", "--manifest", str(manifest.path), "--nodes", "127.0.0.1:7000,127.0.0.1:7001",
        "--spares", "127.0.0.1:7004", "--spares", "127.0.0.1:7005"])
    assert result.exit_code == 2 and "2 --spares lists for 1 chains" in result.output
