"""Progress of long work, reported by phase: a tiny API that library code calls and a command
line installs a reporter for. Nothing here imports the compiler or the runtime.

Library code:

    from defer import progress
    with progress.phase("profile", total=26) as step:   # total None = unknown
        for ...:
            step()                                        # one unit done (or step(5))

By default nothing is reported (`Reporter`, a no-op). A command installs one for its run:

    with progress.reporting(progress.TerminalReporter()):
        compile_model(...)

`TerminalReporter` draws a click progress bar on a terminal (for phases with a total) and
otherwise writes plain lines to stderr: when a phase starts, every `every` seconds while it
runs, and when it ends with its duration.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO


class Reporter:
    """Receives phase events; the base class ignores them (the default: report nothing)."""

    def start(self, name: str, total: int | None) -> None:
        """A phase begins; `total` units of work if known."""

    def advance(self, done: int) -> None:
        """`done` units of the current phase are finished so far."""

    def finish(self, seconds: float) -> None:
        """The current phase ended after `seconds`."""


_current: Reporter = Reporter()


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send progress to `reporter` inside this block (then to whatever was there before)."""
    global _current
    previous, _current = _current, reporter
    try:
        yield reporter
    finally:
        _current = previous


@contextlib.contextmanager
def phase(name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A named phase of work; yields step(n=1) to call as units finish."""
    reporter, started, done = _current, time.perf_counter(), 0
    reporter.start(name, total)

    def step(n: int = 1) -> None:
        nonlocal done
        done += n
        reporter.advance(done)

    try:
        yield step
    finally:
        reporter.finish(time.perf_counter() - started)


class TerminalReporter(Reporter):
    """A progress bar on a terminal, plain periodic lines elsewhere (logs, CI), on stderr."""

    def __init__(self, prefix: str = "", stream: IO[str] | None = None, every: float = 5.0,
                 bar: bool | None = None):
        self.prefix, self.stream, self.every = prefix, stream, every
        self._bar_wanted = bar
        self._name, self._total, self._bar, self._last = "", None, None, 0.0
        self._shown = 0

    def _out(self) -> IO[str]:
        return self.stream or sys.stderr

    def _line(self, text: str) -> None:
        import click

        click.echo(f"{self.prefix}{text}", file=self._out())

    def start(self, name: str, total: int | None) -> None:
        self._name, self._total, self._last, self._shown = name, total, time.monotonic(), 0
        tty = self._bar_wanted if self._bar_wanted is not None else self._out().isatty()
        if total and tty:
            import click

            self._bar = click.progressbar(length=total, label=f"{self.prefix}{name}",
                                          file=self._out())
            self._bar.__enter__()
        else:
            self._line(f"{name}...")

    def advance(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._shown)
            self._shown = done
        elif time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            of = f"/{self._total} ({done / self._total:.0%})" if self._total else ""
            self._line(f"{self._name}: {done}{of}")

    def finish(self, seconds: float) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        self._line(f"{self._name} done in {seconds:.1f} s")
