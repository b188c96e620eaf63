"""Deleting a VM: stop the domain (graceful per spec within its timeout, then forced), undefine
it, delete its disks if the spec says so, then release the finalizer. Phase: Terminating.

diskDeletionPolicy Delete removes the files of the disks' recorded chains (agent/disks) from the active
file down to the spec's path (a backing file the disk had before, e.g. a shared base image, is not the
VM's), but only those nobody else on this node references (another VM, a VMSnapshot), never a
read-only disk's, never one outside the storage roots; each file kept is an Event naming who holds it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libvirt_operator.agent import define, disks, power, power_actions, report, requests, workqueue
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.render import disk_records
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.storage.chain import Chain

log = logging.getLogger(__name__)


def known(r, uid: str) -> Guest | None:
    """The Guest a pass of this VM last looked up: a deleting pass acts on it at once instead of asking
    libvirt again, a lookup that waits in libvirtd's queue behind the burst's destroys (or behind the
    destroys in flight on the domain's connection). Possibly stale: run() takes DomainNotFound for gone."""
    return r.guests.get(uid)


def remember(r, uid: str, guest: Guest | None) -> None:
    if guest is None:
        r.guests.pop(uid, None)
        return
    r.guests[uid] = guest
    if len(r.guests) > 2 * len(r.store.all_keys()) + 16:  # VMs that left the node without a delete pass
        live = {(r.store.get(k) or {}).get("metadata", {}).get("uid") for k in r.store.all_keys()}
        for stale in [u for u in r.guests if u not in live]:
            del r.guests[stale]


async def run(r, obj: dict, spec: VirtualMachineSpec, guest: Guest | None) -> float | None:
    """``r`` is the Reconciler (its status, events and finalizer helpers).

    On the path of a delete burst every call counts: libvirtd serves its calls with a few workers (a
    destroy holds one until QEMU is gone) and the API server's writes are shared by every VM. So a
    destroy that succeeded is not observed again (the domain is inactive), the persistent definition
    is read only when disks are to be deleted (its disk record), the Events of the teardown are posted
    once the finalizer is off (they are advisory; before it they compete with the other VMs'
    finalizer patches), and the store learns of the removal at once, so that the pass queued by the
    domain's own STOPPED/UNDEFINED events ends without a call."""
    t0 = time.perf_counter()
    marks: list[str] = [f"queued {workqueue.queued_for() * 1000:.0f}"]  # before this pass: waiting for a worker
    deferred: list[tuple[str, str, bool]] = []

    def mark(what: str) -> None:
        marks.append(f"{what} +{(time.perf_counter() - t0) * 1000:.0f}")

    async def flush() -> None:
        for reason, message, warning in deferred:
            await r.event(obj, reason, message, warning)
        deferred.clear()

    try:
        try:
            done, chains = await _stop_and_undefine(r, obj, spec, guest, mark, deferred, flush)
        except HypervisorError as exc:
            if exc.reason != "DomainNotFound":
                raise
            done, chains = None, disks.record_from(None, obj)  # gone meanwhile (a remembered Guest)
        if done is not None:
            return done.requeue
        if spec.disk_deletion_policy == "Delete":
            await _delete_disks(r, obj, spec, chains)
        updated = await r.set_finalizer(obj, add=False)
        mark("finalizer removed")
        md = obj["metadata"]
        r.guests.pop(md.get("uid"), None)
        current = r.store.get((md["namespace"], md["name"]))
        if updated and current is not None and current["metadata"].get("uid") == md.get("uid"):
            r.store.put(updated)  # without our finalizer: a pass queued meanwhile has nothing to do
    finally:  # after the finalizer; on an error, before the pass reports it
        await flush()
    log.info("%s/%s: deleted: %s ms", md["namespace"], md["name"], ", ".join(marks))
    return None


@dataclass(frozen=True)
class _Again:
    requeue: float | None


async def _stop_and_undefine(r, obj: dict, spec: VirtualMachineSpec, guest: Guest | None, mark,
                             deferred: list[tuple[str, str, bool]], flush) -> tuple[_Again | None, Mapping[str, Chain]]:
    """Powers the domain off and undefines it: (None, the disks' chains), or (_Again, {}) while a graceful
    shutdown is under way (status written). Events go to `deferred`."""

    async def later(reason: str, message: str, warning: bool = False) -> None:
        deferred.append((reason, message, warning))

    if guest is not None and spec.shutdown.mode == "force":
        # what power.decide would say for any active state (destroy) without asking for the state first:
        # each call before the destroy waits in libvirtd's queue behind the burst's other destroys
        try:
            await guest.destroy()
            mark("destroy")
            log.info("%s/%s: destroy", obj["metadata"]["namespace"], obj["metadata"]["name"])
            await later("PoweredOff", "powered off")
        except HypervisorError as exc:
            if exc.reason != "OperationInvalid":  # "domain is not running": nothing to power off
                raise
    elif guest is not None:
        seen = await r.observe(guest)
        if seen.state in power.ACTIVE_STATES:
            st = obj.get("status") or {}
            want = r.desired(obj, spec, stopping=True)
            d = power.decide(want, seen, r.history(st))
            refused = await power_actions.act(obj, spec, guest, d, later)
            mark(d.action.value)
            if d.action is not power.Action.DESTROY:  # a destroy that returned left the domain inactive
                seen = await r.observe(guest)
                if seen.state in power.ACTIVE_STATES:
                    await flush()
                    after = power.reassess(want, seen, d, r.history(obj.get("status") or {}))
                    stored = DomainConfig.from_xml(await guest.xml(inactive=True))
                    live = report.Live(facts_xml=stored, running=False)
                    await r.write(obj, report.for_pass(obj, spec, guest, after, True, requests.carried(st),
                                                       live, {}, refused))
                    return _Again(after.requeue if after.requeue is not None else d.requeue), {}
    if guest is not None:
        # the disk record is read before the definition is gone, and only when disks are to be deleted
        chains = (disks.record_from(await define.stored_definition(guest), obj)
                  if spec.disk_deletion_policy == "Delete" else {})
        await guest.undefine()
        mark("undefined")
        powered_off = [e for e in deferred if e[0] == "PoweredOff" and not e[2]]
        for e in powered_off:  # one Event for the power-off and the removal
            deferred.remove(e)
        deferred.append(("Undefined", f"domain {guest.name} {'powered off and ' if powered_off else ''}"
                         f"removed from {r.cfg.node_name}", False))
    else:
        chains = disks.record_from(None, obj)  # undefined by an earlier pass: status still has the record
    return None, chains


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
