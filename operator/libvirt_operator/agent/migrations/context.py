"""What a migration job acts through: the node's libvirt, the VM and VMMigration objects, and the
writers of their status. The engine (live.py, storage.py, precheck.py) reports only through it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.storage.references import References


class MigrationFailed(Exception):
    """A step failed: reason and message for status (the VM stays where it was)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass
class MigrationContext:
    node: str  # this agent's node
    host: Host
    roots: tuple[str, ...]  # this node's storage roots
    shared_roots: tuple[str, ...]  # the subset on storage shared with other nodes (same path there)
    vm: dict  # the VirtualMachine object
    migration: dict  # the VMMigration object
    guest: Guest | None  # the VM's domain on this node (None: not here)
    # VMMigration status fields to merge and apply (phase, step, progress, disks, conditions, ...)
    write: Callable[[dict], Awaitable[None]]
    # the VM's status.migration (state Migrating | Landed | Failed | Aborted, message)
    write_vm: Callable[[str, str], Awaitable[None]]
    references: Callable[[], References]  # every file this node's VMs and snapshots hold
    # the domain's disk record (agent/disks.record): (guest, chains, origins={disk: the spec path it stands for})
    record: Callable[..., Awaitable[None]]
    event: Callable[[str, str, bool], Awaitable[None]]  # an Event on the VM
    abort: asyncio.Event = field(default_factory=asyncio.Event)  # set when the VMMigration is being deleted
    scratch: dict = field(default_factory=dict)

    @property
    def spec(self) -> dict:
        return self.migration["spec"]

    @property
    def status(self) -> dict:
        return self.migration.get("status") or {}
