"""Host: libvirt connections that keep themselves alive, and the domains behind them.

libvirtd serves at most `max_client_requests` (5 by default) calls of one client connection at
a time, so a Host opens a small pool: the first connection carries the event callbacks and the
host-wide calls, and each domain's calls go to one connection of the pool, chosen by its UUID.

Every libvirt call blocks, so all of them run in this Host's worker threads; only
libvirt's event dispatch (via libvirtaio) and the subscribers run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from libvirt_operator.hypervisor import errors, events
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.events import ConnectionEvent, DomainEvent
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host_snapshots import HostSnapshotMixin

log = logging.getLogger(__name__)
T = TypeVar("T")
Subscriber = Callable[[DomainEvent | ConnectionEvent], Any]

# domain capabilities errors that mean "this host cannot do that virt type"
_UNSUPPORTED = {libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG}


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    memory_bytes: int
    cpus: int
    has_kvm: bool  # domain capabilities accept type='kvm'
    libvirt_version: str  # the daemon's, e.g. 9.0.0
    hypervisor_version: str  # QEMU's, e.g. 7.2.22


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


class _Link:
    """The opened connections: the first with the callbacks registered on it, and the pool's others."""

    def __init__(self, conn: libvirt.virConnect):
        self.conn = conn
        self.others: list[libvirt.virConnect] = []
        self.callback_ids: list[int] = []
        self.lost = False  # set by a close callback, from any thread

    def for_key(self, key: str) -> libvirt.virConnect:
        if not self.others:
            return self.conn
        conns = (self.conn, *self.others)
        return conns[zlib.crc32(key.encode()) % len(conns)]


class Host(HostSnapshotMixin):
    def __init__(self, uri: str, *, keepalive: tuple[int, int] = (5, 3), max_backoff: float = 5.0,
                 workers: int = 8, connections: int = 1):
        self.uri = uri
        self._connections = max(1, connections)
        self._keepalive = keepalive
        self._max_backoff = max_backoff
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task] = set()  # reconnects and async subscribers in flight
        self._closing = False
        self._reconnecting: asyncio.Future | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and not link.lost

    def connection(self) -> libvirt.virConnect:
        """The live virConnect (for calls this class does not wrap; use it inside run)."""
        link = self._link
        if link is None or link.lost:
            raise HypervisorError("ConnectionLost", f"not connected to {self.uri}")
        return link.conn

    def connection_for(self, key: str) -> libvirt.virConnect:
        """The pool's connection for a domain (by UUID): the same one for every call on it."""
        link = self._link
        if link is None or link.lost:
            raise HypervisorError("ConnectionLost", f"not connected to {self.uri}")
        return link.for_key(key)

    async def connect(self) -> None:
        """Opens the connection (HypervisorError ConnectionFailed if libvirt refuses); after
        that, a dropped connection reopens by itself."""
        if self.connected or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._loop = asyncio.get_running_loop()
        events.register_event_loop(self._loop)  # before the first libvirt.open
        self._closing = False
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="libvirt")
        self._install(await self._open())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None and self._loop is not None:
            link.lost = True  # our own close: not a loss to report
            await self._loop.run_in_executor(self._executor, self._discard, link)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _open(self) -> _Link:
        def blocking() -> _Link:
            link = _Link(libvirt.open(self.uri))
            try:
                link.conn.setKeepAlive(*self._keepalive)
                link.conn.registerCloseCallback(self._on_close, link)
                for event_id, callback in events.domain_callbacks(self._emit):
                    link.callback_ids.append(link.conn.domainEventRegisterAny(None, event_id, callback, None))
                for _ in range(self._connections - 1):
                    other = libvirt.open(self.uri)
                    link.others.append(other)
                    other.setKeepAlive(*self._keepalive)
                    other.registerCloseCallback(self._on_close, link)
            except libvirt.libvirtError:
                self._discard(link)
                raise
            return link

        opening = self._loop.run_in_executor(self._executor, blocking)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled (by close) while the thread is still opening: drop what it opens.
            with contextlib.suppress(libvirt.libvirtError):
                link = await opening
                await self._loop.run_in_executor(self._executor, self._discard, link)
            raise
        except libvirt.libvirtError as err:
            raise HypervisorError("ConnectionFailed", err.get_error_message() or str(err),
                                  err.get_error_code() or 0) from err

    def _install(self, link: _Link) -> None:
        self._link = link
        if link.lost:  # dropped while we were registering
            self._connection_lost(link, "error")

    def _on_close(self, _conn: libvirt.virConnect, reason: int, link: _Link) -> None:
        # libvirt's close callback: any thread, possibly inside libvirt's dispatch.
        if link.lost:
            return
        link.lost = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody left to tell
            self._loop.call_soon_threadsafe(self._connection_lost, link,
                                            events.CLOSE_REASONS.get(reason, str(reason)))

    def _connection_lost(self, link: _Link, reason: str) -> None:
        if link is not self._link or self._closing:
            return  # not installed yet (_install handles it), or ours to close
        self._link = None
        log.warning("libvirt connection to %s lost (%s); reconnecting", self.uri, reason)
        self._loop.run_in_executor(self._executor, self._discard, link)
        self._dispatch(ConnectionEvent("lost", self.uri, reason))
        self._reconnecting = self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                link = await self._open()
            except HypervisorError as err:
                log.debug("reconnect to %s failed: %s; next try in %.1fs", self.uri, err.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            log.warning("libvirt connection to %s restored", self.uri)
            self._install(link)
            if link is self._link:
                self._dispatch(ConnectionEvent("restored", self.uri))
            return

    @staticmethod
    def _discard(link: _Link) -> None:
        """Drops a connection, best effort (it may already be dead). Blocking."""
        drops = [lambda i=i: link.conn.domainEventDeregisterAny(i) for i in link.callback_ids]
        for other in link.others:
            drops += [other.unregisterCloseCallback, other.close]
        for drop in [*drops, link.conn.unregisterCloseCallback, link.conn.close]:
            with contextlib.suppress(libvirt.libvirtError):
                drop()

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """callback(event) runs on the loop thread for every DomainEvent and ConnectionEvent;
        it may be a coroutine function. Returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def _emit(self, event: DomainEvent) -> None:
        # Called inside libvirt's dispatch: subscribers run later, outside of it.
        with contextlib.suppress(RuntimeError):  # a closed loop
            self._loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: DomainEvent | ConnectionEvent) -> None:
        for callback in list(self._subscribers):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("event subscriber %r failed on %r", callback, event)

    def _spawn(self, awaitable) -> asyncio.Future:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hypervisor background task failed", exc_info=task.exception())

    # -- calls -----------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, fallback: str = "LibvirtError") -> T:
        """fn(*args) in a worker thread; a libvirtError becomes HypervisorError (reason
        ConnectionLost when the connection died under it, else by error code, else
        `fallback`)."""
        if self._executor is None:
            raise HypervisorError("ConnectionLost", f"{self.uri}: host not connected")

        def call() -> T:
            try:
                return fn(*args)
            except libvirt.libvirtError as err:
                raise errors.translate(err, fallback, self._alive()) from err

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _alive(self) -> bool:
        link = self._link
        if link is None or link.lost:
            return False
        try:
            return bool(link.conn.isAlive())
        except libvirt.libvirtError:
            return False

    async def domains(self) -> list[Guest]:
        """Every domain, defined or running."""
        doms = await self.run(lambda: self.connection().listAllDomains(0))
        return [Guest(self, d) for d in doms]

    async def lookup(self, uuid: str) -> Guest | None:
        return await self._lookup(lambda: self.connection_for(uuid).lookupByUUIDString(uuid))

    async def lookup_by_name(self, name: str) -> Guest | None:
        return await self._lookup(lambda: self.connection().lookupByName(name))

    async def _lookup(self, find: Callable[[], libvirt.virDomain]) -> Guest | None:
        try:
            return Guest(self, await self.run(find))
        except HypervisorError as err:
            if err.reason == "DomainNotFound":
                return None
            raise

    async def define(self, xml: str, validate: bool = True) -> Guest:
        """Defines (or redefines) a persistent domain; `validate` checks it against libvirt's
        schema first (about 50 ms per call here)."""
        flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE if validate else 0
        dom = await self.run(lambda: self.connection().defineXMLFlags(xml, flags), fallback="DefineFailed")
        return Guest(self, dom)

    async def info(self) -> HostInfo:
        def blocking() -> HostInfo:
            conn = self.connection()
            return HostInfo(
                hostname=conn.getHostname(),
                memory_bytes=conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"] * 1024,
                cpus=conn.getInfo()[2],
                has_kvm=self._has_kvm(conn),
                libvirt_version=_version(conn.getLibVersion()),
                hypervisor_version=_version(conn.getVersion()),
            )

        return await self.run(blocking)

    @staticmethod
    def _has_kvm(conn: libvirt.virConnect) -> bool:
        try:
            caps = conn.getDomainCapabilities(None, None, None, "kvm", 0)
        except libvirt.libvirtError as err:
            if err.get_error_code() in _UNSUPPORTED:
                return False
            raise
        return ET.fromstring(caps).findtext("domain") == "kvm"
