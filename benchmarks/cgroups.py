"""CPU-capped emulated devices: one cgroup per device, capped to a fraction of a core.

The cgroup cpu controller enforces the cap: `cpu.max` under cgroup v2, or
`cpu.cfs_quota_us`/`cpu.cfs_period_us` under v1 (found from /proc/mounts, whichever has the
cpu controller). A process joins its device's group before it runs anything: `Device.command`
wraps a command line in `sh -c 'echo $$ > .../cgroup.procs && exec "$@"'`, so every thread it
starts later (onnxruntime's included) is capped with it.

    with CpuCaps(["dev0", "dev1"]) as devices:      # groups exist, uncapped
        start processes with devices[i].command(argv)
        for d in devices: d.cap(0.2)                # then cap them, once they are ready
    # processes must have exited; the groups are removed here, on every exit path

Groups live under `defer-testbed-<pid>-<k>` in this process's own cgroup; groups left behind by a
process that no longer exists (a crash, kill -9) are removed when the next one starts.
Needs root (or a delegated cgroup); `available()` says whether this machine can do it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "defer-testbed-"
_serial = itertools.count()
MIN_QUOTA_US = 1000  # the kernel's smallest CFS quota and period


@dataclass(frozen=True)
class Controller:
    """Where the cpu controller is mounted and which cgroup version it speaks."""

    mount: Path
    version: int  # 1 or 2

    def own_group(self) -> Path:
        """This process's cgroup in that hierarchy (new groups go below it)."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            names = controllers.split(",")
            if (self.version == 2 and controllers == "") or \
                    (self.version == 1 and "cpu" in names):
                return self.mount / path.lstrip("/")
        return self.mount


def find_controller() -> Controller | None:
    """The mounted cpu controller (v2 preferred when it holds cpu), or None."""
    v1 = None
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, options, *_ = line.split()
        if fstype == "cgroup2":
            controllers = Path(mount, "cgroup.controllers")
            if controllers.exists() and "cpu" in controllers.read_text().split():
                return Controller(Path(mount), 2)
        elif fstype == "cgroup" and "cpu" in options.split(","):
            v1 = Controller(Path(mount), 1)
    return v1


@dataclass
class Device:
    """One capped device: a cgroup and the quota written to it."""

    name: str
    path: Path
    controller: Controller
    cores: float | None = None  # None: not capped (yet)
    period_us: int = 0

    def command(self, argv: list[str] | tuple[str, ...] = ()) -> list[str]:
        """`argv` run inside this device's group (an empty argv gives a command prefix)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"),
                *argv]

    def cap(self, cores: float, period_us: int | None = None) -> None:
        """Allow `cores` of CPU time per period (0.2 = a fifth of one core)."""
        if not cores > 0:
            raise ValueError(f"a device needs a positive share of a core, got {cores}")
        period = period_us or default_period(cores)
        quota = round(cores * period)
        if quota < MIN_QUOTA_US:
            raise ValueError(f"{cores} core of a {period} us period is under the kernel's "
                             f"{MIN_QUOTA_US} us minimum quota; use a longer period")
        if self.controller.version == 2:
            _write(self.path / "cpu.max", f"{quota} {period}")
        else:
            _write(self.path / "cpu.cfs_quota_us", "-1")  # the period may not drop under it
            _write(self.path / "cpu.cfs_period_us", str(period))
            _write(self.path / "cpu.cfs_quota_us", str(quota))
        self.cores, self.period_us = cores, period

    def throttled(self) -> dict[str, int]:
        """The kernel's throttling counters for this group (periods, throttled periods)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines()
                    if len(line.split()) == 2)
        return {"periods": int(stat.get("nr_periods", 0)),
                "throttled": int(stat.get("nr_throttled", 0))}


def default_period(cores: float) -> int:
    """The kernel's usual 100 ms period (what `docker --cpus` uses). Shorter periods slice a
    slow CPU more finely, but on this 2-core VM a 10 ms period left a busy device able to
    use only 70-90% of its cap (CFS hands runtime to each core in 5 ms slices)."""
    return max(100_000, round(MIN_QUOTA_US / cores))


def available() -> tuple[bool, str]:
    """Whether capped groups can be made here, and if not, why (one line)."""
    controller = find_controller()
    if controller is None:
        return False, "no cgroup cpu controller is mounted"
    try:
        with CpuCaps(["probe"], controller) as (device,):
            device.cap(0.5)
    except OSError as err:
        return False, f"cgroups are not writable here ({err.strerror or err}: {err.filename})"
    return True, ""


class CpuCaps:
    """A context manager: one uncapped group per name; removed again on exit."""

    def __init__(self, names: list[str], controller: Controller | None = None):
        self.names = names
        self.controller = controller or find_controller()
        self.root: Path | None = None
        self.devices: list[Device] = []

    def __enter__(self) -> list[Device]:
        if self.controller is None:
            raise OSError("no cgroup cpu controller is mounted")
        parent = self.controller.own_group()
        remove_stale(parent)
        self.root = parent / f"{PREFIX}{os.getpid()}-{next(_serial)}"
        try:
            self.root.mkdir()
            if self.controller.version == 2:
                _write(parent / "cgroup.subtree_control", "+cpu")
                _write(self.root / "cgroup.subtree_control", "+cpu")
            for name in self.names:
                path = self.root / name
                path.mkdir()
                self.devices.append(Device(name, path, self.controller))
        except BaseException:
            self.__exit__()
            raise
        return self.devices

    def __exit__(self, *exc: object) -> None:
        if self.root is not None:
            remove_tree(self.root)
        self.root, self.devices = None, []


def remove_tree(root: Path, timeout: float = 5.0) -> None:
    """Remove a group and its children; processes still inside go back to the parent."""
    if not root.exists():
        return
    for child in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _empty_and_remove(child, root.parent, timeout)
    _empty_and_remove(root, root.parent, timeout)


def remove_stale(parent: Path) -> None:
    """Remove testbed groups whose owning process is gone."""
    for group in parent.glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+", group.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_tree(group)


def _empty_and_remove(group: Path, parent: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it may have exited meanwhile
                    _write(parent / "cgroup.procs", pid)
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # a process still leaving (EBUSY): try again shortly
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
