"""A keyed work queue: each key is handled by one worker at a time; re-adds while busy coalesce."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], Awaitable[float | None]], workers: int = 8):
        """`handler(key)` returns seconds after which to handle the key again, or None."""
        self._handler = handler
        self._workers = workers
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._busy: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    @property
    def depth(self) -> int:
        """Keys waiting for a worker (for metrics)."""
        return self._queue.qsize()

    @property
    def in_progress(self) -> int:
        return len(self._busy)

    @property
    def delayed(self) -> int:
        return len(self._timers)

    def add(self, key: Hashable) -> None:
        if key in self._busy:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Schedule the key; an earlier pending schedule wins."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer and not timer.cancelled() and timer.when() <= when:
            return
        if timer:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._busy.add(key)
            try:
                again = await self._handler(key)
            except Exception:  # the handler reports its own failures; never lose the worker
                log.exception("reconcile of %s crashed", key)
                again = 10.0
            finally:
                self._busy.discard(key)
            if again is not None:
                self.add_after(key, again)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
