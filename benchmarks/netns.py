"""Emulated edge hosts: one network namespace per host, a veth link to the root namespace each,
shaped with `tc tbf` on the host's egress (netem is absent in this kernel).

Addresses come from 198.18.0.0/15, the range set aside for network benchmarks (RFC 2544):
host i is 198.18.<i+1>.2, its root-side peer 198.18.<i+1>.1. The root namespace routes between
hosts. Only what a host sends is shaped, so a hop from host i to host j crosses exactly one
limited link, and traffic from the root namespace (the dispatcher) to a host is not limited.
Needs root and iproute2; `available()` says whether this machine can do it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def available() -> tuple[bool, str]:
    """Whether namespaces can be made here, and if not, why."""
    if os.geteuid() != 0:
        return False, "not root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return False, "iproute2 (ip, tc) is missing"
    probe = subprocess.run(["ip", "netns", "add", "defer-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "defer-probe"], capture_output=True)
    return True, ""


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


@dataclass
class Host:
    name: str  # namespace name
    address: str
    link: str  # root-side veth

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


class ShapedNetwork:
    """`with ShapedNetwork(3, rate_mbit=20) as hosts:` makes three shaped hosts, then removes them."""

    def __init__(self, n_hosts: int, rate_mbit: float | None, prefix: str = "defer"):
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.prefix = prefix
        self.hosts: list[Host] = []

    def __enter__(self) -> list[Host]:
        self._forwarding = open("/proc/sys/net/ipv4/ip_forward").read().strip()
        _write("/proc/sys/net/ipv4/ip_forward", "1")
        try:
            for i in range(self.n_hosts):
                self.hosts.append(self._add_host(i))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        self.hosts = []
        _write("/proc/sys/net/ipv4/ip_forward", self._forwarding)

    def _add_host(self, i: int) -> Host:
        ns, root_end, host_end = f"{self.prefix}{i}", f"{self.prefix}{i}r", f"{self.prefix}{i}h"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # stale from a crash
        subprocess.run(["ip", "link", "del", root_end], capture_output=True)
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "add", root_end, "type", "veth", "peer", "name", host_end)
        _ip("ip", "link", "set", host_end, "netns", ns)
        subnet = f"198.18.{i + 1}"
        _ip("ip", "addr", "add", f"{subnet}.1/24", "dev", root_end)
        _ip("ip", "link", "set", root_end, "up")
        _ip("ip", "addr", "add", f"{subnet}.2/24", "dev", host_end, netns=ns)
        _ip("ip", "link", "set", host_end, "up", netns=ns)
        _ip("ip", "link", "set", "lo", "up", netns=ns)
        _ip("ip", "route", "add", "default", "via", f"{subnet}.1", netns=ns)
        if self.rate_mbit:
            self._shape(host_end, ns)
        return Host(ns, f"{subnet}.2", root_end)

    def _shape(self, dev: str, ns: str | None) -> None:
        rate = f"{self.rate_mbit}mbit"
        # burst must hold at least one MTU-sized packet per timer tick; latency bounds the queue.
        _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
            "burst", "64kb", "latency", "200ms", netns=ns)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
