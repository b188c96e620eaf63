"""storage.run(ctx): a Storage VMMigration (M2), the disks of a running VM moved to other files on its node
while it runs, in the handbook's order (the plan: storage_plan.py).

Steps (status.step, written before each runs; status.disks [{name, sourceFile, destinationFile,
copiedFiles}] is written with the first one):
1. CopyParents: the backing files below each disk's leaf, sparse copies next to the new leaf (a copied
   middle layer gets its header pointed at the copy below it: qemu-img rebase -u).
2. PrepareLeaves: the new leaves, `qemu-img create -f qcow2 -F <fmt> -b <new parent>`; a disk without a
   backing file gets an empty image of the same virtual size and format (qcow2, or raw: a raw leaf stays raw
   and the mirror copies it whole).
3. Copying: blockCopy SHALLOW|REUSE_EXT|TRANSIENT_JOB of every disk (mirrors run side by side), waiting
   until all are READY; status.progress (blockJobInfo cur/end) every second. The completion timeout
   (completionTimeoutPerGiB of the data to copy, at least 1 GiB) and the progress timeout abort the move.
4. Pivot: each disk switches to its new leaf (same QEMU). The domain is persistent and is NOT undefined
   (TRANSIENT_JOB: libvirt 9.0 copies a persistent domain's disk without it; see migration-facts.md).
5. Record: ctx.record(guest, {disk: new chain}, origins={disk: spec path}) redefines the persistent domain on
   the new files and writes the disk record (<lvo:disks>, with <lvo:diskOrigins>: the spec path each moved
   chain stands for, so that the reconciler keeps rendering the disk on its new files), from the chains
   libvirt runs on after the pivot.
6. Cleanup: the old files the new chains do not use, base first, each only when no one else holds it
   (ctx.references(), with this VM's own stale references set aside, and no domain of the node uses it).
   Files kept are named in the Ready condition's message and in an Event MigrationFilesKept.

Terminal write: on success run() writes phase Succeeded itself (step Done, progress 100 %, completionTime,
durationMilliseconds, condition Ready=True reason Succeeded) and the VM's status.migration through
ctx.write_vm("Succeeded", ...); it also writes ctx.write_vm("Migrating", ...) once the input is validated and
before any file is touched. On failure it rolls back (our block jobs aborted, the files it made removed
unless something uses them: the VM keeps running on its old files) and raises MigrationFailed(reason,
message); the caller writes phase Failed (or Aborted for reason MigrationAborted) and write_vm. Bad input
raises before anything is written or touched: DiskNotFound, DuplicateDisk, DiskReadOnly, DiskDrifted,
PathNotAllowed, DirectoryNotFound, SamePath, FileExists, UnsupportedFormat, OperationInProgress (a block job
or a libvirt job on the domain), VMNotRunning/VMNotFound.

ctx.abort set: before the pivot, the copy jobs are aborted, the new files removed and
MigrationFailed("MigrationAborted") raised. An abort during CopyParents takes effect once the running file
copy is done. From the Pivot step on, an abort comes too late: the move completes.

Re-entered (an agent restart; ctx.status has the step and disks it recorded), it carries on from the facts:
copies are published whole (temp file + link), so one that exists is complete; a leaf is remade unless a copy
job of ours runs into it (then that job is awaited); a disk already on its leaf is not copied again; Record and
Cleanup are idempotent (Cleanup finds the old files again from the old leaf's header, since they are removed
base first). Phase Succeeded/Failed/Aborted: nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable

from libvirt_operator.agent import disks as disk_record
from libvirt_operator.agent.migrations import storage_plan as sp
from libvirt_operator.agent.migrations.context import MigrationContext, MigrationFailed
from libvirt_operator.agent.migrations.progress import Watchdog, completion_timeout
from libvirt_operator.agent.snapshots import common
from libvirt_operator.api.vmmigration import TERMINAL_PHASES
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor import HypervisorError
from libvirt_operator.hypervisor.migration import disk_destination_xml
from libvirt_operator.storage import Chain, StorageError, images

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0  # seconds between status.progress writes during a copy (the issue: at most 2)
POLL = 0.25  # seconds between blockJobInfo polls (block-job events wake it earlier)
ABORT_TIMEOUT = 120.0  # seconds an aborted copy job may take to go
MIB = 1 << 20


async def run(ctx: MigrationContext) -> None:
    if (ctx.status or {}).get("phase") in TERMINAL_PHASES:
        return
    await _Move(ctx).run()


class _Move:
    def __init__(self, ctx: MigrationContext):
        self.ctx = ctx
        self.guest = ctx.guest
        self.fields: dict = dict(ctx.status or {})
        self.made: set[str] = set()  # files this process created
        self.fresh_leaves: set[str] = set()  # leaves made by this process and not yet given to a copy job
        self.reentered = False
        self.written_step: str | None = None
        self.t0 = time.monotonic()

    # -- status -----------------------------------------------------------------------------------------

    async def write(self, **fields) -> None:
        self.fields.update(fields)
        await self.ctx.write(fields)
        if "step" in fields:
            self.written_step = fields["step"]

    async def step_to(self, step: str) -> None:
        if self.written_step != step:  # once per step by this process (a re-entered run writes it again)
            await self.write(step=step)

    def _spec(self) -> dict:
        return self.ctx.spec or {}

    def _owner(self) -> str:
        return disk_record.vm_owner(self.ctx.vm)

    # -- entry ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        step = self.fields.get("step") if self.fields.get("disks") else None
        step = step if step in sp.STEPS else None
        self.reentered = step is not None
        if self.guest is None or (await self.guest.state()).state not in ("running", "paused"):
            why = ("VMNotFound", "the VM's domain is not on this node") if self.guest is None else (
                "VMNotRunning", "the VM is not running: a Storage migration moves a running VM's disks")
            if step is not None:
                await self._drop_planned_files()
            raise MigrationFailed(*why)
        if step in (sp.RECORD, sp.CLEANUP, sp.DONE):
            return await self._finish_recorded(step)
        try:
            plan = await self._plan(sp.ours_from_status(self.fields) if step else frozenset())
        except (MigrationFailed, HypervisorError, StorageError) as err:
            if step is not None:  # re-entered and refused now: what the earlier run made goes (unless used)
                await self._drop_planned_files()
            raise _failed(err) from None
        if step is None:
            if self.ctx.abort.is_set():
                raise MigrationFailed("MigrationAborted", "the migration was cancelled before it started")
            await self._not_busy(plan)
            # both facts before the first file is made, side by side: with the step alone a restart re-enters
            # it (nothing runs in libvirt before Copying; the job holds the VM), with Migrating alone it starts over
            await asyncio.gather(
                self.ctx.write_vm("Migrating", f"moving disk(s) {', '.join(d.name for d in plan.disks)}"),
                self.write(step=sp.COPY_PARENTS, disks=plan.status_disks(),
                           startTime=self.fields.get("startTime") or common.now()))
            step = sp.COPY_PARENTS
        try:
            await self._move(plan, step)
        except Exception as err:
            failure = _failed(err)
            await self._rollback(plan, failure)
            raise failure from None
        await self._finish(plan.disks, {d.name: list(d.old_files) for d in plan.disks})

    async def _plan(self, ours: frozenset[str]) -> sp.Plan:
        live = await common.disk_states(self.guest)
        for d in self.fields.get("disks") or [] if ours else []:
            # Re-entered at Pivot: a disk that pivoted already is planned from its old chain (its old leaf is
            # still there, with its header: nothing is removed before Cleanup), as the first run planned it.
            state = live.get(d.get("name"))
            if state is not None and d.get("sourceFile") and state.chain.active.path == os.path.normpath(
                    d.get("destinationFile") or "/"):
                old = await common.blocking(images.chain, d["sourceFile"], roots=self.ctx.roots)
                live[d["name"]] = type(state)(state.name, state.target, old)
        return sp.plan_storage(self._spec().get("disks") or [], (self.ctx.vm or {}).get("spec") or {}, live,
                               await self._recorded(), self.ctx.roots, ours=ours)

    async def _recorded(self) -> dict[str, Chain]:
        """The domain's disk record (<lvo:disks>), when it is this VM's."""
        try:
            own = DomainConfig.from_xml(await self.guest.xml(inactive=True)).operator_metadata
            if own is not None and own.vm_uid == ((self.ctx.vm or {}).get("metadata") or {}).get("uid"):
                return own.disks
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable disk record: %s", self.guest.name, exc)
        return {}

    async def _not_busy(self, plan: sp.Plan) -> None:
        if await common.job_active(self.guest):
            raise MigrationFailed("OperationInProgress", "libvirt has a job running on the domain")
        for d in plan.disks:
            job = await self.guest.block_job_info(d.target)
            if job is not None:
                raise MigrationFailed("OperationInProgress", f"disk {d.name} has a {job.type} block job running")

    # -- steps 1-4 --------------------------------------------------------------------------------------

    async def _move(self, plan: sp.Plan, step: str) -> None:
        order = sp.STEPS.index(step)
        if order < sp.STEPS.index(sp.PIVOT):
            self._check_abort()
        if order <= sp.STEPS.index(sp.COPY_PARENTS):
            await self._copy_parents(plan)
        if order <= sp.STEPS.index(sp.PREPARE_LEAVES):
            await self._prepare_leaves(plan)
        if order <= sp.STEPS.index(sp.COPYING):
            await self.step_to(sp.COPYING)
            await self._mirror(plan)
        await self.step_to(sp.PIVOT)
        await self._mirror(plan, abortable=False)  # re-entered at Pivot: a copy lost meanwhile runs again
        for d in plan.disks:
            if await self._active(d.target) != d.leaf:
                await self.guest.block_job_pivot(d.target)
        for d in plan.disks:
            if (active := await self._active(d.target)) != d.leaf:
                raise MigrationFailed("PivotFailed", f"disk {d.name} runs on {active} after the pivot, not {d.leaf}")

    def _check_abort(self) -> None:
        if self.ctx.abort.is_set():
            raise MigrationFailed("MigrationAborted", "the migration was cancelled (VMMigration deleted)")

    async def _copy_parents(self, plan: sp.Plan) -> None:
        await self.step_to(sp.COPY_PARENTS)
        copies = plan.copies
        common.remove_temp_files(c.dest for c in copies)
        if not copies:
            return
        stop = asyncio.Event()
        beat = asyncio.create_task(self._parents_heartbeat(copies, stop))
        try:
            for c in copies:
                self._check_abort()
                if not os.path.lexists(c.dest):  # published whole: an existing copy (ours) is complete
                    await common.blocking(images.copy_sparse, c.source, c.dest, roots=self.ctx.roots)
                    self.made.add(c.dest)
                if c.backing is not None and c.format == "qcow2":
                    await common.blocking(images.set_backing, c.dest, c.backing, c.backing_format,
                                          roots=self.ctx.roots)
        finally:  # the heartbeat ends after its write in flight (never two status writes at once)
            stop.set()
            with contextlib.suppress(Exception):
                await beat
        self._check_abort()

    async def _parents_heartbeat(self, copies: tuple[sp.ParentCopy, ...], stop: asyncio.Event) -> None:
        """status.progress while the parents are copied: bytes allocated in the copies against the sources'."""
        while not stop.is_set():
            jobs = []
            for c in copies:
                total = _allocated(c.source)
                done = total if os.path.lexists(c.dest) else sum(_allocated(p) for p in _temps(c.dest))
                jobs.append((min(done, total), total))
            with contextlib.suppress(Exception):
                await self.write(progress={**sp.copy_progress(jobs), "updateTime": common.now()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_INTERVAL)

    async def _prepare_leaves(self, plan: sp.Plan) -> None:
        await self.step_to(sp.PREPARE_LEAVES)
        for d in plan.disks:
            self._check_abort()
            await self._make_leaf(d)

    async def _make_leaf(self, d: sp.DiskPlan) -> None:
        """The new leaf (again: one left by an earlier run is ours, and remade from scratch)."""
        common.remove_temp_files([d.leaf])
        if os.path.lexists(d.leaf):
            await common.blocking(images.remove, d.leaf, roots=self.ctx.roots)
        capacity = (await self.guest.block_info(d.target))[0]
        parent = d.parent
        if parent is None:
            await common.blocking(images.create_image, d.leaf, d.leaf_format, capacity, roots=self.ctx.roots)
        else:
            await common.blocking(images.create_overlay, d.leaf, parent.path, parent.format or "qcow2",
                                  roots=self.ctx.roots, size=capacity)
        self.made.add(d.leaf)
        self.fresh_leaves.add(d.leaf)

    async def _mirror(self, plan: sp.Plan, *, abortable: bool = True) -> None:
        """Every disk on its leaf or with our copy job READY: starts the missing copy jobs, then waits."""
        xml = await self.guest.xml()
        mirrors = sp.mirrors(xml)
        live = {s.target: s for s in (await common.disk_states(self.guest)).values()}
        bandwidth = self._spec().get("bandwidthMibPerSecond")
        waiting = []
        for d in plan.disks:
            job = await self.guest.block_job_info(d.target)
            action = sp.disk_action(d.leaf, live[d.target].chain.active.path, job.type if job else None,
                                    (mirrors.get(d.target) or (None, False))[0])
            if action == sp.PIVOTED:
                continue
            if action == sp.BUSY:
                raise MigrationFailed("OperationInProgress", f"disk {d.name} has a {job.type} block job that is "
                                                             f"not this migration's")
            if action == sp.START:
                if d.leaf not in self.fresh_leaves:  # an earlier copy may have written into it
                    await self._make_leaf(d)
                await self.guest.block_copy(d.target, disk_destination_xml(d.leaf, d.leaf_format), shallow=True,
                                            reuse_ext=True, transient_job=True,
                                            bandwidth=bandwidth * MIB if bandwidth else None)
                self.fresh_leaves.discard(d.leaf)
            waiting.append(d)
        if waiting:
            await self._wait_ready(waiting, abortable)

    async def _wait_ready(self, waiting: list[sp.DiskPlan], abortable: bool) -> None:
        woken = asyncio.Event()
        targets = {d.target for d in waiting}

        def on_event(event) -> None:
            if getattr(event, "kind", None) == "block-job" and getattr(event, "uuid", None) == self.guest.uuid \
                    and getattr(event, "device", None) in targets:
                woken.set()

        spec = self._spec()
        dog: Watchdog | None = None
        last_write = 0.0
        unsubscribe = self.ctx.host.subscribe(on_event)
        try:
            while True:
                if abortable:
                    self._check_abort()
                jobs, ready = [], True
                for d in waiting:
                    job = await self.guest.block_job_info(d.target)
                    if job is None:
                        raise MigrationFailed("BlockCopyFailed", f"the copy of disk {d.name} ended before it was "
                                                                 f"ready")
                    jobs.append((job.cur, job.end))
                    ready = ready and job.ready
                now = time.monotonic()
                if ready or now - last_write >= PROGRESS_INTERVAL:
                    progress = sp.copy_progress(jobs)
                    await self.write(progress={**progress, "elapsedMilliseconds": int((now - self.t0) * 1000),
                                               "updateTime": common.now()})
                    last_write = now
                if ready:
                    return
                total = sum(end for _, end in jobs)
                if dog is None and total > 0:
                    dog = Watchdog(now, completion_timeout(int(spec.get("completionTimeoutPerGiB") or 150), 0, total),
                                   float(spec.get("progressTimeoutSeconds") or 150))
                verdict = dog.observe(now, total - sum(cur for cur, _ in jobs)) if dog else None
                if abortable and verdict == "Timeout":
                    raise MigrationFailed("MigrationTimedOut", f"the copy did not finish within "
                                                               f"{dog.completion_s:.0f} s")
                if abortable and verdict == "NoProgress":
                    raise MigrationFailed("NoProgress", f"the copy made no progress for {dog.progress_s:.0f} s")
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), POLL)
        finally:
            unsubscribe()

    async def _record(self, chains: dict[str, Chain]) -> None:
        """The new chains, each standing for its disk's spec path (origins): the reconciler keeps rendering a
        moved disk on its recorded files although the spec still names the old one."""
        spec = {d.get("name"): d.get("path") for d in ((self.ctx.vm or {}).get("spec") or {}).get("disks") or []}
        origins = {name: spec[name] for name in chains if spec.get(name)}
        await self.ctx.record(self.guest, chains, origins=origins)

    async def _active(self, target: str) -> str | None:
        for state in (await common.disk_states(self.guest)).values():
            if state.target == target:
                return state.chain.active.path
        return None

    # -- failure ----------------------------------------------------------------------------------------

    async def _rollback(self, plan: sp.Plan, failure: MigrationFailed) -> None:
        """The VM back on its old files (our copy jobs aborted), the files we made removed unless something
        uses them. A disk that pivoted before the failure stays moved: its chain is recorded and its old
        files go as after a success."""
        notes: list[str] = []
        try:
            live = await common.disk_states(self.guest)
            pivoted = [d for d in plan.disks if d.name in live and live[d.name].chain.active.path == d.leaf]
            mirrors = sp.mirrors(await self.guest.xml())
            for d in plan.disks:
                if d in pivoted or (mirrors.get(d.target) or (None, False))[0] != d.leaf:
                    continue
                with contextlib.suppress(HypervisorError):
                    await self.guest.block_job_abort(d.target)
                with contextlib.suppress(HypervisorError):
                    await self.guest.wait_block_job(d.target, "gone", ABORT_TIMEOUT)
            if pivoted:
                await self._record({d.name: live[d.name].chain for d in pivoted})
                notes.append(f"disk(s) {', '.join(d.name for d in pivoted)} moved before the failure")
            common.remove_temp_files(plan.made)
            mine = plan.made if self.reentered else [p for p in plan.made if p in self.made]
            in_new = {p for d in pivoted for p in live[d.name].chain.paths}
            files = [p for p in mine if os.path.lexists(p) and p not in in_new]
            _, kept = await common.remove_unreferenced(self.ctx, files, removing=[self._owner()])
            if pivoted:
                kept.update(await self._remove_old({d.name: list(d.old_files) for d in pivoted}))
            if kept:
                notes.append("kept: " + "; ".join(f"{p} ({why})" for p, why in kept.items()))
        except Exception as err:  # the failure is reported whatever the cleanup meets
            log.exception("rollback of a failed storage migration")
            notes.append(f"cleanup: {err}")
        if notes:
            failure.message += " (" + "; ".join(notes) + ")"
            failure.args = (f"{failure.reason}: {failure.message}",)

    async def _drop_planned_files(self) -> None:
        """Re-entered with the VM gone or stopped: the files an earlier run made go (unless used)."""
        files = [p for p in sp.ours_from_status(self.fields) if os.path.lexists(p)]
        common.remove_temp_files(files)
        with contextlib.suppress(Exception):
            await common.remove_unreferenced(self.ctx, files, removing=[self._owner()])

    # -- steps 5-6 --------------------------------------------------------------------------------------

    async def _finish_recorded(self, step: str) -> None:
        """Re-entered at Record or Cleanup: from status.disks and the facts (the plan's record is gone)."""
        moved = []
        live = await common.disk_states(self.guest)
        for d in self.fields.get("disks") or []:
            state = live.get(d.get("name"))
            leaf = os.path.normpath(d.get("destinationFile") or "/")
            if state is None or state.chain.active.path != leaf:
                raise MigrationFailed("DiskDrifted", f"disk {d.get('name')} does not run on {leaf} at step {step}")
            moved.append(_Moved(d["name"], state.target, state.chain))
        new_files = {p for s in live.values() for p in s.chain.paths}
        old = {}
        for d in self.fields.get("disks") or []:
            source = d.get("sourceFile")
            old[d["name"]] = sp.walk_old_chain(source, self._backing_of, new_files) if source else []
        await self._finish(moved, old, record=step == sp.RECORD)

    def _backing_of(self, path: str) -> str | None:
        try:
            found = images.backing_file(path, roots=self.ctx.roots)
        except StorageError:  # gone (removed by the cleanup before the restart) or outside the roots
            return None
        return found[0] if found else None

    async def _finish(self, moved: Iterable, old: dict[str, list[str]], *, record: bool = True) -> None:
        moved = list(moved)
        if record:
            await self.step_to(sp.RECORD)
            live = await common.disk_states(self.guest)
            await self._record({m.name: live[m.name].chain for m in moved})
        await self.step_to(sp.CLEANUP)
        kept = await self._remove_old(old)
        message = f"disk(s) {', '.join(m.name for m in moved)} moved"
        if kept:
            text = "; ".join(f"{p} ({why})" for p, why in kept.items())
            message += f"; old files kept: {text}"
            with contextlib.suppress(Exception):
                await self.ctx.event("MigrationFilesKept", f"old files kept: {text}", False)
        started = common.parse_time(self.fields.get("startTime"))
        duration = int((time.time() - started) * 1000) if started else int((time.monotonic() - self.t0) * 1000)
        progress = dict(self.fields.get("progress") or {})
        progress.update(percent=100, dataRemainingBytes=0, updateTime=common.now())
        await self.write(phase="Succeeded", step=sp.DONE, progress=progress, completionTime=common.now(),
                         durationMilliseconds=duration,
                         conditions=[{"type": "Ready", "status": "True", "reason": "Succeeded", "message": message,
                                      "lastTransitionTime": common.now()}])
        await self.ctx.write_vm("Succeeded", message)

    async def _remove_old(self, old: dict[str, list[str]]) -> dict[str, str]:
        """The old files no chain of the VM uses, base first, each only if nobody else holds it."""
        live = await common.disk_states(self.guest)
        in_use = {p for s in live.values() for p in s.chain.paths}
        files = []
        for paths in old.values():
            files += [p for p in sp.removal_order(paths, in_use) if os.path.lexists(p)]
        _, kept = await common.remove_unreferenced(self.ctx, files, removing=[self._owner()])
        return kept


class _Moved:
    def __init__(self, name: str, target: str, chain: Chain):
        self.name, self.target, self.chain = name, target, chain


def _failed(err: Exception) -> MigrationFailed:
    if isinstance(err, MigrationFailed):
        return err
    if isinstance(err, (HypervisorError, StorageError)):
        return MigrationFailed(err.reason, err.message)
    return MigrationFailed("MigrationFailed", f"{type(err).__name__}: {err}")


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _temps(path: str) -> list[str]:
    head, tail = os.path.split(path)
    with contextlib.suppress(OSError):
        return [os.path.join(head, e) for e in os.listdir(head) if e.startswith(f".{tail}.lvo-tmp-")]
    return []
