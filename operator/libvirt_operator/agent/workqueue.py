"""A keyed work queue: each key is handled by one worker at a time; re-adds while busy coalesce.

Two lanes. `add` (a watch event, a libvirt event, a requeue timer) is served first. `add_background`
(the periodic resync of every VM) waits until nothing event-driven is waiting, and at most
`background_workers` of its passes run at once: a resync of all VMs is a burst of full passes (each a
handful of libvirt calls and maybe a status write), and when it lands in the middle of a burst of
deletes or starts those calls queue in libvirtd beside the burst's own, and the VMs they hold are
handled only after them. An `add` of a key waiting in the background lane moves it to the front lane.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

# Seconds the key being handled waited from its add until a worker took it (set for the handler's task).
_QUEUED_FOR: contextvars.ContextVar[float] = contextvars.ContextVar("queued_for", default=0.0)


def queued_for() -> float:
    """For the handler: how long its key waited in the queue (0 outside a worker)."""
    return _QUEUED_FOR.get()


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], Awaitable[float | None]], workers: int = 8,
                 background_workers: int = 4):
        """`handler(key)` returns seconds after which to handle the key again, or None."""
        self._handler = handler
        self._workers = workers
        self._background_workers = max(1, min(background_workers, workers))
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._busy: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._since: dict[Hashable, float] = {}  # key -> when it was added (queued or marked dirty)
        self._background: deque[Hashable] = deque()  # background keys not yet handed to a worker
        self._background_set: set[Hashable] = set()
        self._background_running: set[Hashable] = set()  # background keys queued or being handled
        self._background_queued: set[Hashable] = set()  # background keys in the queue, not yet taken
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    @property
    def depth(self) -> int:
        """Keys waiting for a worker, in either lane (for metrics)."""
        return self._queue.qsize() + len(self._background)

    @property
    def in_progress(self) -> int:
        return len(self._busy)

    @property
    def delayed(self) -> int:
        return len(self._timers)

    def add(self, key: Hashable) -> None:
        if key in self._background_set:  # promoted: no longer behind the event-driven work
            self._background_set.discard(key)
            self._background.remove(key)
        if key in self._busy:
            self._dirty.add(key)
            self._stamp(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._stamp(key)
            self._queue.put_nowait(key)

    def add_background(self, key: Hashable) -> None:
        """Handle the key once nothing event-driven waits; nothing if it is waiting or being handled."""
        if key in self._busy or key in self._queued or key in self._background_set:
            return
        self._background_set.add(key)
        self._background.append(key)
        self._pump()

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

    def _stamp(self, key: Hashable) -> None:
        self._since.setdefault(key, asyncio.get_running_loop().time())

    def _pump(self) -> None:
        """Hands background keys to the workers while the front lane is empty, within their share."""
        while (self._background and self._queue.qsize() == len(self._background_queued)
               and len(self._background_running) < self._background_workers):
            key = self._background.popleft()
            self._background_set.discard(key)
            if key in self._busy or key in self._queued:
                continue
            self._background_running.add(key)
            self._background_queued.add(key)
            self._queued.add(key)
            self._stamp(key)
            self._queue.put_nowait(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._background_queued.discard(key)
            self._busy.add(key)
            _QUEUED_FOR.set(loop.time() - self._since.pop(key, loop.time()))
            try:
                again = await self._handler(key)
            except Exception:  # the handler reports its own failures; never lose the worker
                log.exception("reconcile of %s crashed", key)
                again = 10.0
            finally:
                self._busy.discard(key)
                self._background_running.discard(key)
            if again is not None:
                self.add_after(key, again)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            self._pump()
