"""defer.progress: silent by default, plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io

from defer import progress


def test_default_reporter_is_silent_and_steps_count():
    with progress.phase("work", total=3) as step:
        step()
        step(2)


def test_terminal_reporter_writes_plain_lines_off_a_terminal():
    out = io.StringIO()
    with progress.reporting(progress.TerminalReporter("compile: ", stream=out, every=0.0)):
        with progress.phase("profile", total=4) as step:
            step(2)
        with progress.phase("plan"):
            pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "compile: profile..."
    assert "compile: profile: 2/4 (50%)" in lines
    assert lines[-1].startswith("compile: plan done in ")
    # After the block, the silent reporter is back.
    with progress.phase("after"):
        pass
    assert len(out.getvalue().splitlines()) == len(lines)


def test_terminal_reporter_draws_a_bar_when_asked():
    out = io.StringIO()
    reporter = progress.TerminalReporter(stream=out, bar=True)
    with progress.reporting(reporter), progress.phase("export", total=2) as step:
        step()
        step()
    assert "export" in out.getvalue() and "done in" in out.getvalue()
