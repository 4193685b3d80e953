"""An asyncio event loop in one background thread that this object owns and joins.

    loop = LoopThread("defer-dispatcher")
    loop.start()
    result = loop.run(coroutine_function, timeout=5)   # from any other thread; waits
    loop.call_soon(function, *args)                     # fire and forget, on the loop
    loop.spawn(coroutine)                               # a task in the loop's TaskGroup
    loop.stop(on_stop)                                  # run on_stop() there, cancel, join

Every task runs in the loop's one TaskGroup (`run` too), so nothing outlives `stop`, and `stop`
checks that the thread really ended: a loop that does not stop within its timeout is reported,
never silently left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from defer.errors import DeferTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._group: asyncio.TaskGroup | None = None
        self._stopping: asyncio.Event | None = None
        self._on_stop: Callable[[], Awaitable[None]] | None = None

    def start(self) -> None:
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(started),),
                                        name=self.name, daemon=True)
        self._thread.start()
        started.result()

    async def _main(self, started: concurrent.futures.Future) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            self._group = group
            started.set_result(None)
            await self._stopping.wait()
            if self._on_stop is not None:
                await self._on_stop()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """On the loop thread: start `coro` as a task of the loop's TaskGroup."""
        assert self._group is not None and self.on_loop()
        return self._group.create_task(coro)

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """From any thread: run `function(*args)` on the loop soon."""
        self.loop.call_soon_threadsafe(function, *args)

    def run(self, command: Callable[[], Awaitable[T]], timeout: float,
            what: str = "the dispatcher's loop") -> T:
        """From another thread: run the coroutine function `command` on the loop and wait for
        its result (its exception is raised here). DeferTimeoutError after `timeout` s; the
        command is then cancelled."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        tasks: list[asyncio.Task] = []

        def begin() -> None:
            task = self.spawn(_into(command(), future))
            tasks.append(task)

        self.call_soon(begin)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.call_soon(lambda: [t.cancel() for t in tasks])
            raise DeferTimeoutError(f"{what} did not finish within {timeout:g} s") from None

    def stop(self, on_stop: Callable[[], Awaitable[None]] | None = None,
             timeout: float = 10.0) -> None:
        """Run `on_stop()` on the loop, cancel every task, join the thread (idempotent)."""
        if self._thread is None:
            return
        if self.loop is not None and self._thread.is_alive():
            self._on_stop = on_stop
            self.call_soon(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the %s thread did not stop within %.0f s", self.name, timeout)
        self._thread = None


async def _into(coro: Coroutine[Any, Any, T], future: concurrent.futures.Future) -> None:
    """Run `coro` and hand its outcome to a concurrent future (a caller in another thread)."""
    try:
        result = await coro
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as err:  # noqa: BLE001 - handed to the calling thread as is
        future.set_exception(err)
    else:
        future.set_result(result)
