"""Deleting a VM: stop the domain (graceful per spec within its timeout, then forced), undefine
it, delete its disks if the spec says so, then release the finalizer. Phase: Terminating."""

from __future__ import annotations

import asyncio
import contextlib
import os

from libvirt_operator.agent import power, power_actions, report, requests, storage
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor.guest import Guest


async def run(r, obj: dict, spec: VirtualMachineSpec, guest: Guest | None) -> float | None:
    """``r`` is the Reconciler (its status, events and finalizer helpers)."""
    if guest is not None:
        seen = await r.observe(guest)
        if seen.state in power.ACTIVE_STATES:
            st = obj.get("status") or {}
            want = r.desired(obj, spec, stopping=True)
            d = power.decide(want, seen, r.history(st))
            refused = await power_actions.act(obj, spec, guest, d, r.eventer(obj))
            seen = await r.observe(guest)
            if seen.state in power.ACTIVE_STATES:
                after = power.reassess(want, seen, d, r.history(obj.get("status") or {}))
                stored = DomainConfig.from_xml(await guest.xml(inactive=True))
                live = report.Live(facts_xml=stored, running=False)
                await r.write(obj, report.for_pass(obj, spec, guest, after, True, requests.carried(st), live, {},
                                                   refused))
                return after.requeue if after.requeue is not None else d.requeue
        await guest.undefine()
        await r.event(obj, "Undefined", f"domain {guest.name} removed from {r.cfg.node_name}")
    if spec.disk_deletion_policy == "Delete":
        await _delete_disks(r, obj, spec)
    await r.set_finalizer(obj, add=False)
    return None


async def _delete_disks(r, obj: dict, spec: VirtualMachineSpec) -> None:
    if storage.outside_roots(spec, r.cfg.storage_roots):
        return  # never delete anything outside the storage roots
    for disk in spec.disks:
        if disk.device == "disk" and not disk.read_only and disk.path:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.remove, disk.path)
                await r.event(obj, "DiskDeleted", f"deleted {disk.path} (diskDeletionPolicy: Delete)")
