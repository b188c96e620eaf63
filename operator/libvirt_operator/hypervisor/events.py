"""The asyncio bridge: libvirt's event loop on the running asyncio loop, and the events
subscribers receive (DomainEvent, ConnectionEvent)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import libvirt
import libvirtaio

_register_lock = threading.Lock()


def register_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Dispatch libvirt's events on `loop`. libvirt accepts one event implementation per
    process, and it must exist before any connection is opened: the first call wins, later
    calls with the same loop do nothing, and another loop is refused."""
    with _register_lock:
        current = libvirtaio.getCurrentImpl()
        if current is None:
            # libvirt prints every error to stderr by default; callers get HypervisorError instead.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        elif current.loop is not loop:
            raise RuntimeError("libvirt's event implementation is already bound to another asyncio loop; "
                               "libvirt cannot move it (one loop per process)")


def registered_loop() -> asyncio.AbstractEventLoop | None:
    current = libvirtaio.getCurrentImpl()
    return current.loop if current else None


Kind = Literal["lifecycle", "reboot", "agent-lifecycle", "device-removed", "device-removal-failed",
               "block-job", "job-completed", "migration-iteration", "io-error", "device-added",
               "balloon-change", "tray-change", "tunable", "metadata-change"]


@dataclass(frozen=True)
class DomainEvent:
    """One libvirt domain event.

    event/detail by kind: lifecycle: VIR_DOMAIN_EVENT_* and its detail; agent-lifecycle:
    state and reason; block-job: job type and status; migration-iteration: the iteration;
    io-error: the action; tray-change: VIR_DOMAIN_EVENT_TRAY_CHANGE_OPEN/CLOSE;
    metadata-change: the VIR_DOMAIN_METADATA_* type. `device` is the device alias (device-*,
    io-error, tray-change) or the disk (block-job); `info` holds the rest (job-completed
    statistics, io-error path and reason, balloon-change {"actual": KiB}, tunable's changed
    parameters, metadata-change {"nsuri": ...}).
    """

    uuid: str
    name: str
    kind: Kind
    event: int
    detail: int
    at: float  # time.time() when the callback ran
    device: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lifecycle(self) -> str | None:
        """'started', 'stopped', ... for lifecycle events, else None."""
        return LIFECYCLE_NAMES.get(self.event) if self.kind == "lifecycle" else None


@dataclass(frozen=True)
class ConnectionEvent:
    """The libvirt connection dropped ('lost') or is back with callbacks re-registered
    ('restored'): events in between are gone, so subscribers should resync."""

    state: Literal["lost", "restored"]
    uri: str = ""
    reason: str = ""  # for 'lost': eof, keepalive, error
    at: float = field(default_factory=time.time)


LIFECYCLE_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


def domain_callbacks(emit: Callable[[DomainEvent], None]) -> list[tuple[int, Callable[..., None]]]:
    """(event id, callback) pairs for conn.domainEventRegisterAny; each callback turns
    libvirt's arguments into a DomainEvent and hands it to `emit`. The callbacks run
    inside libvirt's dispatch: they only read the virDomain's cached uuid and name."""

    def make(kind, dom, event=0, detail=0, device="", info=None):
        emit(DomainEvent(dom.UUIDString(), dom.name(), kind, event, detail, time.time(),
                         device, info or {}))

    def lifecycle(_conn, dom, event, detail, _opaque):
        make("lifecycle", dom, event, detail)

    def reboot(_conn, dom, _opaque):
        make("reboot", dom)

    def agent(_conn, dom, state, reason, _opaque):
        make("agent-lifecycle", dom, state, reason)

    def removed(_conn, dom, alias, _opaque):
        make("device-removed", dom, device=alias)

    def removal_failed(_conn, dom, alias, _opaque):
        make("device-removal-failed", dom, device=alias)

    def block_job(_conn, dom, disk, job_type, status, _opaque):
        make("block-job", dom, job_type, status, device=disk)

    def job_completed(_conn, dom, params, _opaque):
        make("job-completed", dom, info=dict(params))

    def iteration(_conn, dom, n, _opaque):
        make("migration-iteration", dom, n)

    def io_error(_conn, dom, src_path, alias, action, reason, _opaque):
        make("io-error", dom, action, device=alias, info={"path": src_path, "reason": reason})

    def added(_conn, dom, alias, _opaque):
        make("device-added", dom, device=alias)

    def balloon(_conn, dom, actual, _opaque):
        make("balloon-change", dom, info={"actual": actual})

    def tray(_conn, dom, alias, reason, _opaque):
        make("tray-change", dom, reason, device=alias)

    def tunable(_conn, dom, params, _opaque):
        make("tunable", dom, info=dict(params))

    def metadata(_conn, dom, mtype, nsuri, _opaque):
        make("metadata-change", dom, mtype, info={"nsuri": nsuri})

    return [
        (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
        (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot),
        (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent),
        (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removed),
        (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, removal_failed),
        (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job),
        (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed),
        (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration),
        (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, io_error),
        (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, added),
        (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon),
        (libvirt.VIR_DOMAIN_EVENT_ID_TRAY_CHANGE, tray),
        (libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, tunable),
        (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, metadata),
    ]
