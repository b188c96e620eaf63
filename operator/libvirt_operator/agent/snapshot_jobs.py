"""This node's VMSnapshots and revert requests, run as jobs (agent/jobs.py) by the engine in
agent/snapshots/: what starts a job, the context it reports through, and the finalizer.

A snapshot found InProgress (the agent was killed mid-job) is handed to the same entry point again,
which carries on or fails cleanly from the step it recorded; likewise a revert whose outcome is
InProgress."""

from __future__ import annotations

import asyncio
import functools
import logging

from libvirt_operator.agent import disks
from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.agent.jobs import JobContext, JobRunner, Running
from libvirt_operator.agent.snapshots import create, delete, revert
from libvirt_operator.agent.store import Key, VMStore, key_of
from libvirt_operator.agent.watched import WatchedObjects
from libvirt_operator.api import meta
from libvirt_operator.api.base import utcnow
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import events, resources

log = logging.getLogger(__name__)
FINALIZER = f"{meta.AGENT_PREFIX}/snapshot"
COMPONENT = "libvirt-operator-agent"
HELD_RETRY_SECONDS = 30.0  # a delete held by a clone or another snapshot is looked at again this often


def revert_due(vm: dict) -> str | None:
    """The id of a revert to run (new, or InProgress when the agent restarted mid-revert)."""
    req = (vm.get("spec") or {}).get("revert")
    last = (vm.get("status") or {}).get("lastRevert")
    if not req:
        return None
    if last and last.get("id") == req["id"] and last.get("result") != "InProgress":
        return None
    return req["id"]


class SnapshotJobs(WatchedObjects):
    KIND = "VMSnapshot"

    def __init__(self, cfg: AgentConfig, host: Host, vms: VMStore, snapshots: VMStore, jobs: JobRunner):
        super().__init__(vms, cfg.node_name, snapshots)
        self.cfg = cfg
        self.host = host
        self.snapshots = snapshots  # shared with the reconciler (who needs which file)
        self.jobs = jobs

    # -- snapshots -------------------------------------------------------------------------------

    async def _handle(self, key: Key) -> None:
        snap = await self.read(key, self._vm_matters)
        if snap is None:
            return
        md, st = snap["metadata"], snap.get("status") or {}
        vm = self.vms.get((md["namespace"], snap["spec"]["vmName"]))
        if vm is not None and st.get("vmUid") and vm["metadata"]["uid"] != st["vmUid"]:
            vm = None  # a new VM of the same name: not the one this snapshot is of
        job_key = st.get("vmUid") or (vm["metadata"]["uid"] if vm else md["uid"])
        if self.jobs.busy(job_key):
            return  # the job ends by handling this VM's snapshots again
        if md.get("deletionTimestamp"):
            if FINALIZER in (md.get("finalizers") or []):
                self._start(job_key, Running("SnapshotDeleting", f"snapshot {key[0]}/{key[1]}"),
                            functools.partial(self._delete, key, vm))
            return
        if FINALIZER not in (md.get("finalizers") or []):
            snap = await self._finalizer(snap, add=True)
            if self.jobs.busy(job_key):
                return  # another event's pass started the job while the finalizer was added
        phase = st.get("phase")
        if phase in ("Ready", "Failed"):
            return
        if vm is None:
            await self._fail(snap, "VMNotFound", f"VirtualMachine {key[0]}/{snap['spec']['vmName']} is not on "
                             f"node {self.cfg.node_name} (deleted, or a new VM of that name)")
            return
        if phase != "InProgress":
            vm_busy = self.jobs.busy(vm["metadata"]["uid"])
            if vm_busy is not None:
                await self._fail(snap, "OperationInProgress", f"{vm_busy.what} runs on the VM")
                return
        self._start(job_key, Running("SnapshotInProgress", f"snapshot {key[0]}/{key[1]}"),
                    functools.partial(self._create, key, vm))

    def _vm_matters(self, snap: dict) -> bool:
        """Whether a decision on the snapshot depends on its VM (it is taken, or deleted, and no job holds it)."""
        st = snap.get("status") or {}
        return ((snap["metadata"].get("deletionTimestamp") or st.get("phase") not in ("Ready", "Failed"))
                and not self.jobs.busy(st.get("vmUid") or ""))

    async def _create(self, key: Key, vm: dict) -> None:
        snap = self.snapshots.get(key)
        if snap is not None:
            await create.run(await self._context(snap, vm))

    async def _delete(self, key: Key, vm: dict | None) -> None:
        snap = self.snapshots.get(key)
        if snap is None:
            return
        if await delete.run(await self._context(snap, vm)):
            await self._finalizer(self.snapshots.get(key) or snap, add=False)
        else:
            self._retry(key, HELD_RETRY_SECONDS)

    def _start(self, job_key: str, running: Running, work) -> None:
        self.jobs.start(job_key, running, work)

    # -- reverts ---------------------------------------------------------------------------------

    def start_revert(self, vm: dict) -> Running | None:
        """Starts the VM's revert job if one is due; returns what now holds the VM."""
        id_ = revert_due(vm)
        uid = vm["metadata"]["uid"]
        held = self.jobs.busy(uid)
        if id_ is None or held is not None:
            return held
        key = key_of(vm)
        running = Running("RevertInProgress", f"revert {id_} to snapshot {vm['spec']['revert']['snapshot']}")
        self.jobs.start(uid, running, functools.partial(self._revert, key, id_))
        return running

    async def _revert(self, vm_key: Key, id_: str) -> None:
        vm = self.vms.get(vm_key)
        if vm is None:
            return
        snap_name = vm["spec"]["revert"]["snapshot"]
        snap = self.snapshots.get((vm_key[0], snap_name))
        ctx = await self._context(snap or {"metadata": {"namespace": vm_key[0], "name": snap_name},
                                           "spec": {"vmName": vm_key[1]}, "status": None}, vm)
        if snap is None:
            await ctx.write_revert({"id": id_, "result": "Failed", "time": utcnow(),
                                    "message": f"VMSnapshot {vm_key[0]}/{snap_name} does not exist on node "
                                    f"{self.cfg.node_name}"})
            return
        await revert.run(ctx, id_)

    # -- the context a job reports through --------------------------------------------------------

    async def _context(self, snap: dict, vm: dict | None) -> JobContext:
        guest = await self.host.lookup(vm["metadata"]["uid"]) if vm is not None else None
        key = key_of(snap)
        vm_key = key_of(vm) if vm is not None else None
        own = dict(snap.get("status") or {})

        async def write(fields: dict) -> None:
            own.update(fields)
            own["observedGeneration"] = snap["metadata"].get("generation", 1)
            own["nodeName"] = self.cfg.node_name
            if vm is not None:
                own.setdefault("vmUid", vm["metadata"]["uid"])
            for c in own.get("conditions") or []:
                c.setdefault("observedGeneration", own["observedGeneration"])
                c.setdefault("lastTransitionTime", utcnow())
            clean = {k: v for k, v in own.items() if v not in (None, {}, [])}
            updated = await asyncio.to_thread(resources.apply_status, resources.SNAPSHOTS, key[0], key[1], clean,
                                              meta.agent_manager(self.cfg.node_name))
            self.snapshots.put(updated)

        async def write_revert(outcome: dict) -> None:
            outcome = {"time": utcnow(), **{k: v for k, v in outcome.items() if v is not None}}
            updated = await asyncio.to_thread(resources.apply_status, resources.VMS, vm_key[0], vm_key[1],
                                              {"lastRevert": outcome},
                                              meta.agent_jobs_manager(self.cfg.node_name))
            self.vms.put(updated)

        async def event(reason: str, message: str, warning: bool = False) -> None:
            target = vm if vm is not None else snap
            ref = {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine" if vm is not None else "VMSnapshot",
                   "metadata": dict(target["metadata"])}
            await asyncio.to_thread(events.post, ref, reason, message, warning=warning, component=COMPONENT)

        return JobContext(
            host=self.host, roots=tuple(map(str, self.cfg.storage_roots)), vm=vm, snapshot=snap, guest=guest,
            write=write, write_revert=write_revert,
            references=lambda: disks.node_references(self.vms, self.snapshots),
            record=functools.partial(disks.record, self.host), event=event)

    # -- bookkeeping -----------------------------------------------------------------------------

    async def _fail(self, snap: dict, reason: str, message: str) -> None:
        ctx = await self._context(snap, None)
        await ctx.write({"phase": "Failed", "conditions": [
            {"type": "Ready", "status": "False", "reason": reason, "message": message}]})

    async def _finalizer(self, snap: dict, add: bool) -> dict:
        md = snap["metadata"]
        current = list(md.get("finalizers") or [])
        wanted = [*current, FINALIZER] if add else [f for f in current if f != FINALIZER]
        patch = {"metadata": {"finalizers": wanted, "resourceVersion": md["resourceVersion"]}}
        updated = await asyncio.to_thread(resources.merge_patch, resources.SNAPSHOTS, md["namespace"], md["name"],
                                          patch)
        if add:
            self.snapshots.put(updated)
        return updated
