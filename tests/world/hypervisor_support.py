"""Helpers for test_hypervisor: one background asyncio loop, an event recorder, and a
watch on a QEMU process's exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from libvirt_operator.hypervisor import events
from localenv.guest import qemu_processes

_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's libvirt event loop, running in a daemon thread. libvirt binds its event
    implementation to one loop per process, so every test shares this one."""
    global _loop
    if _loop is None:
        registered = events.registered_loop()
        if registered is not None:
            _loop = registered  # someone else's running loop: share it
        else:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="hypervisor-loop", daemon=True).start()
    return _loop


def run(coro: Coroutine[Any, Any, Any], timeout: float = 180.0) -> Any:
    """Runs coro on the background loop from a test's (synchronous) thread."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop()).result(timeout)


class EventLog:
    """Records what a Host emits; waits for an event matching a predicate. Lives on the loop."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, match: Callable[[Any], bool], timeout: float = 30.0, after: int = 0) -> Any:
        """The first recorded event (from index `after`) that matches; TimeoutError if none
        arrives within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[after:]:
                if match(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event within {timeout} s; got {self.events[after:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def mark(self) -> int:
        return len(self.events)


def domain_event(uuid: str, kind: str, event: int | None = None) -> Callable[[Any], bool]:
    """Matches a DomainEvent of the domain `uuid` of this kind (and event number)."""
    return lambda e: (isinstance(e, events.DomainEvent) and e.uuid == uuid and e.kind == kind
                      and (event is None or e.event == event))


def lifecycle(uuid: str, name: str) -> Callable[[Any], bool]:
    """Matches a lifecycle event of the domain `uuid` whose event name is `name`."""
    return lambda e: domain_event(uuid, "lifecycle")(e) and e.lifecycle == name


def qemu_pid(domain_name: str) -> int:
    """The QEMU process running `domain_name` (its -name guest=NAME,... argument)."""
    pids = qemu_processes(f"guest={domain_name},".encode())
    if not pids:
        raise LookupError(f"no QEMU process for {domain_name}")
    return pids[0]


async def process_exit(pid: int) -> float:
    """time.time() at which process `pid` exits (a pidfd turns readable at exit, before
    any reaping)."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    exited: asyncio.Future[float] = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(time.time()))
    try:
        return await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def process_gone(pid: int, timeout: float = 30.0) -> float:
    """time.time() at which /proc/<pid> disappears, i.e. when the zombie got reaped."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still present after {timeout} s")
        await asyncio.sleep(0.005)
    return time.time()
