# The testbed's CPU caps (benchmarks/cgroups.py): a capped busy process gets its share of a
# core and no more, the groups are gone after the `with` on every exit path (an exception
# included), groups a dead process left behind are swept, and a machine without writable
# cgroups is reported in one line. Skipped where cgroups cannot be written (not root).
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks import cgroups

OK, WHY = cgroups.available()
needs_cgroups = pytest.mark.skipif(not OK, reason=f"cgroups: {WHY}")
BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass\n" \
       "import os; t = os.times(); print(t.user + t.system)"


def test_available_says_yes_or_why_in_one_line():
    ok, why = cgroups.available()
    assert ok == (why == "") and "\n" not in why


@needs_cgroups
def test_a_capped_process_gets_its_share_of_a_core():
    with cgroups.CpuCaps(["busy"]) as (device,):
        device.cap(0.25)
        start = time.monotonic()
        out = subprocess.run(device.command([sys.executable, "-c", BUSY.format(s=1.5)]),
                             capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - start
        cpu = float(out)
        assert cpu < 0.45 * wall, f"{cpu:.2f} CPU-s in {wall:.2f} s: the cap did not hold"
        assert device.throttled()["throttled"] > 0


@needs_cgroups
def test_groups_are_removed_on_every_exit_path():
    with pytest.raises(RuntimeError, match="boom"), cgroups.CpuCaps(["a", "b"]) as devices:
        paths = [d.path for d in devices]
        assert all(p.is_dir() for p in paths)
        raise RuntimeError("boom")
    assert not any(p.exists() for p in paths) and not paths[0].parent.exists()


@needs_cgroups
def test_a_process_still_inside_is_moved_out_so_its_group_can_go():
    with cgroups.CpuCaps(["left"]) as (device,):
        child = subprocess.Popen(device.command([sys.executable, "-c", "input()"]),
                                 stdin=subprocess.PIPE)
        while str(child.pid) not in (device.path / "cgroup.procs").read_text().split():
            time.sleep(0.01)  # the shell has not joined yet
    try:
        assert not device.path.exists()
    finally:
        child.communicate(b"\n")


@needs_cgroups
def test_groups_of_a_dead_owner_are_swept():
    controller = cgroups.find_controller()
    parent = controller.own_group()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = parent / f"{cgroups.PREFIX}{dead}-0"
    (stale / "device0").mkdir(parents=True)
    assert os.path.isdir(stale)
    with cgroups.CpuCaps(["x"]):
        assert not stale.exists()


@needs_cgroups
def test_the_testbed_command_runs_a_small_fleet_and_leaves_no_group(tmp_path):
    """`python -m benchmarks.testbed MODEL --devices 2 --cores 0.5`: the table with the
    prediction beside the measurement, its JSON, and no group left behind."""
    import json

    import onnx
    from onnx_graphs import residual_mlp

    from benchmarks import testbed
    from defer import hop

    model = tmp_path / "mlp.onnx"
    onnx.save(residual_mlp(width=64, blocks=4), model)
    parent = cgroups.find_controller().own_group()
    ours = f"{cgroups.PREFIX}{os.getpid()}-"  # other processes' groups come and go
    assert hop.cached() is not None  # the test fixture's zero figure: nothing is measured
    out = tmp_path / "tb.json"
    assert testbed.main([str(model), "--devices", "2", "--cores", "0.5", "--runs", "1",
                         "--count", "20", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text()).values()
    assert entry["devices"] == 2 and entry["speedup"]["median"] > 0
    assert entry["predicted"] > 0 and entry["predicted_hops_free"] > 0
    assert not [p for p in parent.iterdir() if p.name.startswith(ours)]
