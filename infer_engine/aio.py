"""Consume an engine's (blocking) stream from async code: the stream runs on a thread of its own
(not the bounded default executor, where 64 streams waiting for tokens would starve each
other) and the async side takes everything that has arrived at once. The thread wakes the
event loop only when the consumer is waiting, so a busy loop is not woken once per token:
under load, deltas pile up and go out together (one SSE chunk, one UI update).
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator


# Streams wait on their engine most of the time: one thread each, reused (starting a thread
# per stream cost ~1 ms of the event loop's time under load). Threads are created only as
# needed, so the bound is just a ceiling.
_POOL = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="stream")


class ThreadedStream:
    """Runs `make()` (returning an iterator) on its own thread, to its end, so the iterator's
    cleanup always happens; `take()` returns every item produced since the last call."""

    def __init__(self, make: Callable[[], Iterator]):
        self._loop = asyncio.get_running_loop()
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._error: BaseException | None = None
        self.ended = asyncio.Event()  # set once the stream has produced everything
        _POOL.submit(self._run, make)

    def _run(self, make: Callable[[], Iterator]) -> None:
        try:
            for item in make():
                self._push(item)
        except BaseException as exc:  # surfaced to the consumer
            self._error = exc
        finally:
            self._push(None, done=True)

    def _push(self, item: Any, done: bool = False) -> None:
        with self._lock:
            if done:
                self._done = True
            else:
                self._items.append(item)
            waiter, self._waiter = self._waiter, None
        try:
            if waiter is not None:
                self._loop.call_soon_threadsafe(_wake, waiter)
            if done:
                self._loop.call_soon_threadsafe(self.ended.set)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    async def take(self) -> list:
        """Every item that has arrived (at least one), or [] once the stream has ended; raises
        what the stream raised, after the items that came before it."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                if self._done:
                    if self._error is not None:
                        error, self._error = self._error, None
                        raise error
                    return []
                self._waiter = self._loop.create_future()
                waiter = self._waiter
            await waiter

    async def wait_end(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, less if the stream ends meanwhile."""
        try:
            await asyncio.wait_for(self.ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def __aiter__(self):
        while items := await self.take():
            for item in items:
                yield item


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
