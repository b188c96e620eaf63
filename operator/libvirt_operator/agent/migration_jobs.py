"""This node's VMMigrations: the target's pre-check, the source's job (agent/migrations/), abort by
deletion, recovery after a restart, and the VM-side gate of the hand-over.

Which agent acts is the VMMigration's node label, set by the controller: the target while PreChecking,
the source from Running on. The VM's status.migration is the durable fact: a source agent never
defines or starts a VM whose status.migration says Migrating (its job, or its recovery, runs) or
Landed (the domain runs on the target); the target adopts the VM once the label names it."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from libvirt_operator.agent import disks
from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.agent.jobs import JobRunner, Running
from libvirt_operator.agent.migrations import live, precheck, storage
from libvirt_operator.agent.migrations.context import MigrationContext, MigrationFailed
from libvirt_operator.agent.store import Key, VMStore, key_of
from libvirt_operator.agent.watched import WatchedObjects
from libvirt_operator.api import meta
from libvirt_operator.api.base import utcnow
from libvirt_operator.api.vmmigration import TERMINAL_PHASES
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import events, resources
from libvirt_operator.metrics import agent as metrics

log = logging.getLogger(__name__)
FINALIZER = meta.MIGRATION_FINALIZER
COMPONENT = "libvirt-operator-agent"
KIND = "MigrationInProgress"
SKIP = Running("MigrationLanded", "the domain runs on the migration's target")  # hands off entirely


def condition(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message[:32000],
            "lastTransitionTime": utcnow()}


class MigrationJobs(WatchedObjects):
    KIND = "VMMigration"

    def __init__(self, cfg: AgentConfig, host: Host, vms: VMStore, snapshots: VMStore, jobs: JobRunner):
        super().__init__(vms, cfg.node_name)
        self.cfg, self.host, self.snapshots, self.jobs = cfg, host, snapshots, jobs
        self.migrations = self.objects
        self._aborts: dict[str, asyncio.Event] = {}  # VMMigration uid -> set when it is being deleted
        self._running: dict[str, str] = {}  # VM uid -> the VMMigration uid its job runs
        self.target_cfg = precheck.TargetConfig(
            node=cfg.node_name, roots=tuple(map(str, cfg.storage_roots)),
            shared_roots=tuple(map(str, cfg.shared_storage_roots)), migration_uri=cfg.migration_target_uri,
            address=cfg.migration_address)

    # -- the VM side (called by the reconciler) -----------------------------------------------------

    def holds(self, vm: dict) -> Running | None:
        """What holds the VM against the reconciler: SKIP (it left this node: don't touch it, don't write),
        a Running migration (report it), or None."""
        mig = (vm.get("status") or {}).get("migration") or {}
        if mig.get("sourceNode") != self.cfg.node_name:
            return None
        if mig.get("state") == "Landed" and mig.get("targetNode") != self.cfg.node_name:
            return SKIP
        if mig.get("state") == "Migrating":
            key = (vm["metadata"]["namespace"], mig.get("name", ""))
            if self.migrations.get(key) is not None:
                self._spawn(key)  # its job (or its recovery) runs
            return Running(KIND, f"migration {mig.get('name')} to node {mig.get('targetNode')}")
        return None

    async def adopt(self, vm: dict, running: bool) -> None:
        """On the target, once the VM is labelled for this node: its domain runs here → Succeeded."""
        mig = (vm.get("status") or {}).get("migration") or {}
        if mig.get("state") != "Landed" or mig.get("targetNode") != self.cfg.node_name or not running:
            return
        await self._write_vm(vm, {**mig, "state": "Succeeded", "message": f"adopted by node {self.cfg.node_name}",
                                  "time": utcnow()})
        log.info("adopted %s/%s from node %s", *key_of(vm), mig.get("sourceNode"))

    async def _write_vm(self, vm: dict, state: dict) -> None:
        md = vm["metadata"]
        updated = await asyncio.to_thread(resources.apply_status, resources.VMS, md["namespace"], md["name"],
                                          {"migration": state}, meta.agent_migration_manager(self.cfg.node_name))
        if self.vms.get(key_of(vm)) is not None:
            self.vms.put(updated)

    # -- VMMigration events (on_event, handle_all, handle_for_vm: WatchedObjects) ----------------------

    async def _handle(self, key: Key) -> None:
        mig = await self.read(key, self._vm_matters)
        if mig is None:
            return
        md, st = mig["metadata"], mig.get("status") or {}
        phase, me = st.get("phase"), self.cfg.node_name
        finalizers = md.get("finalizers") or []
        if phase == "PreChecking" and st.get("targetNode") == me and st.get("sourceNode") != me:
            if not st.get("target") and not md.get("deletionTimestamp"):
                await self._precheck(mig)
            return
        if st.get("sourceNode") != me:
            return
        vm = self.vms.get((md["namespace"], mig["spec"]["vmName"]))
        if vm is not None and st.get("vmUid") and vm["metadata"]["uid"] != st["vmUid"]:
            vm = None
        uid = st.get("vmUid") or (vm["metadata"]["uid"] if vm else md["uid"])
        held = self.jobs.busy(uid)
        mine = held is not None and held.kind == KIND and self._running.get(uid) == md["uid"]
        if md.get("deletionTimestamp"):
            self._abort_event(md["uid"]).set()
            if mine:
                return  # the job sees the abort and ends; it removes the finalizer then
            if FINALIZER in finalizers and phase in ("Running", "HandingOver") and st.get("step") and vm:
                self._start(key, vm, uid)  # recovery with the abort already requested
                return
            if FINALIZER in finalizers:
                await self._finalizer(mig, add=False)
            return
        if phase in TERMINAL_PHASES:
            if FINALIZER in finalizers and not mine:
                await self._finalizer(mig, add=False)
            return
        if phase not in ("Running", "HandingOver") or mine:
            return
        if phase == "HandingOver" and st.get("step") == "HandOver":
            return  # the controller moves the label; nothing left for this agent
        if vm is None:
            await self._fail(mig, "VMNotFound", f"VirtualMachine {md['namespace']}/{mig['spec']['vmName']} is not on "
                             f"node {me}")
            return
        if held is not None:
            if not st.get("step"):
                await self._fail(mig, "OperationInProgress", f"{held.what} runs on the VM")
            return  # a job of another kind: it ends by handling this VM's migrations again
        if FINALIZER not in finalizers:
            mig = await self._finalizer(mig, add=True)
        self._start(key, vm, uid)

    def _vm_matters(self, mig: dict) -> bool:
        """Whether a decision on the migration depends on its VM: this node is its source, it is not over
        (or it is being deleted), and no job holds the VM."""
        st = mig.get("status") or {}
        return (st.get("sourceNode") == self.node
                and bool(mig["metadata"].get("deletionTimestamp") or st.get("phase") not in TERMINAL_PHASES)
                and not self.jobs.busy(st.get("vmUid") or ""))

    def _start(self, key: Key, vm: dict, uid: str) -> None:
        mig = self.migrations.get(key)
        running = Running(KIND, f"migration {key[1]} ({mig['spec'].get('type', 'Live')})")
        if self.jobs.start(uid, running, functools.partial(self._job, key, key_of(vm), uid)):
            self._running[uid] = mig["metadata"]["uid"]

    def _abort_event(self, uid: str) -> asyncio.Event:
        return self._aborts.setdefault(uid, asyncio.Event())

    # -- the job -------------------------------------------------------------------------------------

    async def _job(self, key: Key, vm_key: Key, uid: str) -> None:
        try:
            await self._run_job(key, vm_key)
        finally:
            self._running.pop(uid, None)

    async def _run_job(self, key: Key, vm_key: Key) -> None:
        mig, vm = self.migrations.get(key), self.vms.get(vm_key)
        if mig is None or vm is None:
            return
        ctx = await self.context(mig, vm)
        kind = mig["spec"].get("type", "Live")
        started = time.monotonic()
        metrics.migration_started(self.cfg.node_name, kind)
        result = "Failed"
        try:
            if kind == "Storage":
                await storage.run(ctx)  # writes its own end state (Succeeded, which files were kept)
                await ctx.event("Migrated", f"storage migration {key[1]}: the disks run on their new files", False)
            else:
                await live.run(ctx)
            result = "Succeeded"
        except MigrationFailed as failed:
            result = "Aborted" if failed.reason == "MigrationAborted" else "Failed"
            await ctx.write({"phase": result, "completionTime": utcnow(), "conditions": [
                condition("Ready", "False", failed.reason, failed.message)]})
            await ctx.write_vm(result, failed.message)
            await ctx.event("MigrationFailed" if result == "Failed" else "MigrationAborted",
                            f"{key[1]}: {failed.reason}: {failed.message}", True)
        finally:
            metrics.migration_finished(self.cfg.node_name, kind, result, time.monotonic() - started)
        final = self.migrations.get(key)
        if final is not None and (final["metadata"].get("deletionTimestamp")
                                  or (final.get("status") or {}).get("phase") in TERMINAL_PHASES):
            await self._finalizer(final, add=False)

    async def context(self, mig: dict, vm: dict) -> MigrationContext:
        key = key_of(mig)
        own = dict(mig.get("status") or {})
        me = self.cfg.node_name
        kind = mig["spec"].get("type", "Live")

        async def write(fields: dict) -> None:
            own.update(fields)
            own["observedGeneration"] = mig["metadata"].get("generation", 1)
            clean = {k: v for k, v in own.items() if v not in (None, {}, [])}
            updated = await asyncio.to_thread(resources.apply_status, resources.MIGRATIONS, key[0], key[1], clean,
                                              meta.agent_manager(me))
            ctx.migration = updated
            self.migrations.put(updated)
            if "progress" in fields:
                metrics.migration_progress(me, key, fields["progress"])

        async def write_vm(state: str, message: str) -> None:
            current = self.vms.get(key_of(vm)) or vm
            await self._write_vm(current, {
                "name": key[1], "uid": mig["metadata"]["uid"], "type": kind, "state": state,
                "sourceNode": own.get("sourceNode") or me, "targetNode": own.get("targetNode") or me,
                "message": message[:1000], "time": utcnow()})

        async def event(reason: str, message: str, warning: bool = False) -> None:
            # in the background: an Event never delays the migration's next step
            for target, kind_ in ((vm, "VirtualMachine"), (mig, "VMMigration")):
                ref = {"apiVersion": meta.API_VERSION, "kind": kind_, "metadata": dict(target["metadata"])}
                asyncio.get_running_loop().run_in_executor(None, functools.partial(
                    events.post, ref, reason, message, warning=warning, component=COMPONENT))

        ctx = MigrationContext(
            node=me, host=self.host, roots=tuple(map(str, self.cfg.storage_roots)),
            shared_roots=tuple(map(str, self.cfg.shared_storage_roots)), vm=vm, migration=mig,
            guest=await self.host.lookup(vm["metadata"]["uid"]), write=write, write_vm=write_vm,
            references=lambda: disks.node_references(self.vms, self.snapshots),
            record=functools.partial(disks.record, self.host), event=event,
            abort=self._abort_event(mig["metadata"]["uid"]))
        if mig["metadata"].get("deletionTimestamp"):
            ctx.abort.set()
        return ctx

    # -- the target's pre-check ----------------------------------------------------------------------

    async def _precheck(self, mig: dict) -> None:
        md = mig["metadata"]
        own = dict(mig.get("status") or {})
        vm = await asyncio.to_thread(resources.get, resources.VMS, md["namespace"], mig["spec"]["vmName"])
        try:
            if vm is None:
                raise MigrationFailed("VMNotFound", f"VirtualMachine {md['namespace']}/{mig['spec']['vmName']} is gone")
            target = await precheck.run(self.target_cfg, self.host, vm, mig)
            own.update(target=target, conditions=_merge(own.get("conditions"), condition(
                "PreChecked", "True", "Passed", f"node {self.cfg.node_name} can run the VM")))
        except MigrationFailed as failed:
            own.update(phase="Failed", completionTime=utcnow(), conditions=_merge(
                _merge(own.get("conditions"), condition("PreChecked", "False", failed.reason, failed.message)),
                condition("Ready", "False", failed.reason, f"node {self.cfg.node_name}: {failed.message}")))
        own["observedGeneration"] = md.get("generation", 1)
        updated = await asyncio.to_thread(resources.apply_status, resources.MIGRATIONS, md["namespace"], md["name"],
                                          own, meta.agent_manager(self.cfg.node_name))
        self.migrations.put(updated)

    # -- bookkeeping ---------------------------------------------------------------------------------

    async def _fail(self, mig: dict, reason: str, message: str) -> None:
        md = mig["metadata"]
        own = dict(mig.get("status") or {})
        own.update(phase="Failed", completionTime=utcnow(), observedGeneration=md.get("generation", 1),
                   conditions=_merge(own.get("conditions"), condition("Ready", "False", reason, message)))
        updated = await asyncio.to_thread(resources.apply_status, resources.MIGRATIONS, md["namespace"], md["name"],
                                          own, meta.agent_manager(self.cfg.node_name))
        self.migrations.put(updated)

    async def _finalizer(self, mig: dict, add: bool) -> dict:
        md = mig["metadata"]
        current = list(md.get("finalizers") or [])
        if (FINALIZER in current) == add:
            return mig
        if add:
            ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": md["resourceVersion"]},
                   {"op": "add", "path": "/metadata/finalizers", "value": [*current, FINALIZER]}]
        else:
            ops = [{"op": "test", "path": "/metadata/finalizers", "value": current},
                   {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in current if f != FINALIZER]}]
        updated = await asyncio.to_thread(resources.json_patch, resources.MIGRATIONS, md["namespace"], md["name"],
                                          ops)
        if not updated["metadata"].get("deletionTimestamp") or updated["metadata"].get("finalizers"):
            self.migrations.put(updated)
        if not add:
            self._aborts.pop(md["uid"], None)
        return updated


def _merge(conditions: list | None, new: dict) -> list[dict]:
    out = [c for c in conditions or [] if c.get("type") != new["type"]]
    return [*out, new]
