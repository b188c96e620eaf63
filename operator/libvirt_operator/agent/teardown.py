"""Deleting a VM: stop the domain (graceful per spec within its timeout, then forced), undefine
it, delete its disks if the spec says so, then release the finalizer. Phase: Terminating.

diskDeletionPolicy Delete removes the files of the disks' recorded chains (agent/disks) from the active
file down to the spec's path (a backing file the disk had before, e.g. a shared base image, is not the
VM's), but only those nobody else on this node references (another VM, a VMSnapshot), never a
read-only disk's, never one outside the storage roots; each file kept is an Event naming who holds it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from libvirt_operator.agent import define, disks, power, power_actions, report, requests
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.render import disk_records
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.storage.chain import Chain


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
        chains = disks.record_from(await define.stored_definition(guest), obj)  # read before it is gone
        await guest.undefine()
        await r.event(obj, "Undefined", f"domain {guest.name} removed from {r.cfg.node_name}")
    else:
        chains = disks.record_from(None, obj)  # undefined by an earlier pass: status still has the record
    if spec.disk_deletion_policy == "Delete":
        await _delete_disks(r, obj, spec, chains)
    await r.set_finalizer(obj, add=False)
    return None


def own_files(spec: VirtualMachineSpec, chains: Mapping[str, Chain]) -> tuple[list[str], set[str]]:
    """(files the VM's writable disks own: each chain from its active file down to the spec path,
    files of its read-only disks)."""
    record = disk_records(spec, chains)
    files, read_only = [], set()
    for disk in spec.disks:
        chain = record.get(disk.name)
        if chain is None:
            continue
        if disk.read_only:
            read_only.update(chain.paths)
            continue
        own = chain.layers[:chain.index(disk.path) + 1] if disk.path in chain else chain.layers[:1]
        files += [layer.path for layer in own]
    return files, read_only


async def _delete_disks(r, obj: dict, spec: VirtualMachineSpec, chains: Mapping[str, Chain]) -> None:
    files, read_only = own_files(spec, chains)
    refs = disks.node_references(r.store, getattr(r, "snapshots", None))
    verdict = refs.verdict(files, removing=[disks.vm_owner(obj)])
    roots = [Path(os.path.realpath(root)) for root in r.cfg.storage_roots]
    for path in verdict.delete:
        if path in read_only:
            continue
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in roots):
            await r.event(obj, "DiskKept", f"kept {path}: outside the storage roots", warning=True)
            continue
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.remove, path)
            await r.event(obj, "DiskDeleted", f"deleted {path} (diskDeletionPolicy: Delete)")
    for path, owners in verdict.keep.items():
        await r.event(obj, "DiskKept", f"kept {path}: still referenced by {', '.join(owners)}")
