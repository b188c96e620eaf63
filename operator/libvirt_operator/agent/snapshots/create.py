"""create.run(ctx): take the snapshot a VMSnapshot asks for.

Steps (status.job.step, written before each runs):
- External: Prepare -> [Overlays] -> Snapshot -> Record -> Done. Overlays (only when a disk reuses a
  pre-created overlay) pre-creates the other leaves so that one REUSE_EXT call takes them all.
- Copy: Prepare -> Save -> Copy -> Restore -> Done (Restore skipped with stopAfter).

Re-entered with phase InProgress (an agent restart), it waits while libvirt still has a job on the
domain, then judges from the facts: External finishes when the domain runs on the planned leaves (the
snapshot was taken) and fails cleanly otherwise; Copy carries on from its step (a save image and
complete copies are kept, a copy cut short is dropped). A failure removes the files this job created
that nothing references and leaves the VM running on its old chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots import common
from libvirt_operator.agent.snapshots.common import Status, blocking, condition
from libvirt_operator.agent.snapshots.plan import COPY, EXTERNAL, Refusal, plan_create
from libvirt_operator.hypervisor import Guest, HypervisorError
from libvirt_operator.storage import StorageError, images

log = logging.getLogger(__name__)

PREPARE, OVERLAYS, SNAPSHOT, RECORD, SAVE, COPYING, RESTORE, DONE = (
    "Prepare", "Overlays", "Snapshot", "Record", "Save", "Copy", "Restore", "Done")
IN_FLIGHT_TIMEOUT = 300.0  # seconds a killed agent's snapshot call may take to finish in libvirtd
IN_FLIGHT_GRACE = 5.0  # seconds to look again when no file shows that the call started


_Failed = common.JobFailed


class _PauseClock:
    """How long the domain was paused (lifecycle suspended -> resumed events) while a call ran."""

    def __init__(self, ctx: JobContext, guest: Guest):
        self.ctx, self.guest = ctx, guest
        self.paused_at: float | None = None
        self.total = 0.0

    def _on(self, event) -> None:
        if getattr(event, "uuid", None) != self.guest.uuid or getattr(event, "kind", None) != "lifecycle":
            return
        if event.lifecycle == "suspended" and self.paused_at is None:
            self.paused_at = event.at
        elif event.lifecycle in ("resumed", "started", "stopped") and self.paused_at is not None:
            self.total += max(0.0, event.at - self.paused_at)
            self.paused_at = None

    def __enter__(self):
        self._unsubscribe = self.ctx.host.subscribe(self._on)
        return self

    def __exit__(self, *exc):
        self._unsubscribe()

    def ms(self) -> int:
        return int(self.total * 1000)


def _name(ctx: JobContext) -> str:
    md = ctx.snapshot.get("metadata") or {}
    return f"snapshot {md.get('namespace')}/{md.get('name')}"


def _spec(ctx: JobContext) -> dict:
    return ctx.snapshot.get("spec") or {}


async def run(ctx: JobContext) -> None:
    await converge(ctx)


async def converge(ctx: JobContext) -> dict:
    """run(), returning the status fields it ended with (delete uses it on an interrupted create)."""
    st = Status(ctx)
    phase = st.get("phase")
    if phase in ("Ready", "Failed", "Deleting"):
        return st.fields
    try:
        if phase == "InProgress" and st.step:
            await _resume(ctx, st)
        else:
            await _fresh(ctx, st)
    except _Failed as failed:
        await _fail(ctx, st, failed.reason, failed.message)
    return st.fields


async def _refuse(st: Status, reason: str, message: str) -> None:
    """Failed before anything was touched."""
    await st.write(phase="Failed", conditions=[condition("False", reason, message)],
                   job={"step": "Refused", "startedAt": common.now(), "message": message})


async def _fresh(ctx: JobContext, st: Status) -> None:
    t0 = time.monotonic()
    vm, guest = ctx.vm, ctx.guest
    if vm is None:
        return await _refuse(st, "VMNotFound", f"VM {_spec(ctx).get('vmName')} does not exist")
    running = False
    disks = {}
    if guest is not None:
        running = (await guest.state()).state in ("running", "paused")
        if running:
            disks = await common.disk_states(guest)
    try:
        plan = plan_create(vm, ctx.snapshot, disks, ctx.roots, running=running)
        for d in plan.disks:
            if d.reuse:
                try:
                    await blocking(images.verify_overlay, d.file, d.chain.active.path, roots=ctx.roots)
                except StorageError as err:
                    raise Refusal(err.reason, f"disk {d.name}: {err.message}") from None
        await _not_busy(guest, plan.disks)
    except Refusal as refused:
        return await _refuse(st, refused.reason, refused.message)
    await st.write(phase="InProgress", vmUid=(vm.get("metadata") or {}).get("uid"),
                   memoryFile=plan.memory_file, disks=plan.status_disks(),
                   conditions=[condition("False", "SnapshotInProgress", "the snapshot is being taken")],
                   job={"step": PREPARE, "startedAt": common.now(), "message": ""})
    if plan.method == EXTERNAL:
        await _external(ctx, st, guest, t0)
    else:
        await _copy(ctx, st, guest, t0)


async def _not_busy(guest: Guest, disks) -> None:
    """Refusal OperationInProgress while libvirt has a job on the domain (a migration, a save) or a block
    job runs on one of the disks."""
    if await common.job_active(guest):
        raise Refusal("OperationInProgress", "libvirt has a job running on the domain (a migration or a save)")
    for d in disks:
        job = await guest.block_job_info(d.target)
        if job is not None:
            raise Refusal("OperationInProgress", f"disk {d.name} has a {job.type} block job running")


# -- External ---------------------------------------------------------------------------------------------


async def _external(ctx: JobContext, st: Status, guest: Guest, t0: float | None) -> None:
    planned = st.get("disks") or []
    reuse = any(not d.get("created") for d in planned)
    if reuse:
        await st.step_to(OVERLAYS)
        for d in planned:
            if d.get("created"):
                capacity = (await guest.block_info(d["target"]))[0]
                try:
                    await blocking(images.create_overlay, d["activeFile"], d["snapshotFile"],
                                   d.get("snapshotFormat") or "qcow2", roots=ctx.roots, size=capacity)
                except StorageError as err:
                    raise _Failed(err.reason, f"disk {d['name']}: {err.message}") from None
    await st.step_to(SNAPSHOT)
    leaves = {d["target"]: d["activeFile"] for d in planned}
    try:
        with _PauseClock(ctx, guest) as clock:
            await guest.snapshot_external(leaves, st.get("memoryFile"), reuse=reuse)
    except HypervisorError as err:
        raise _Failed(err.reason, err.message) from None
    await _finish_external(ctx, st, guest, t0, clock.ms(), common.now())


async def _in_flight(guest: Guest, planned: list[dict], memory_file: str | None) -> tuple[bool, bool]:
    """A killed agent's snapshot call may still run in libvirtd (its job does not show in jobInfo): while
    the files libvirt creates at its start exist (the memory file; leaves the operator did not make) and
    the domain is not on its leaves yet, the call is in flight: wait for it (libvirt removes them when
    it fails). Without such a file (reuse, disk-only), a grace period. Returns _on_leaves after it."""
    made_by_libvirt = [os.path.normpath(d["activeFile"]) for d in planned if not d.get("created")]
    signals = [*made_by_libvirt, *([memory_file] if memory_file else [])]
    deadline = time.monotonic() + IN_FLIGHT_TIMEOUT
    grace = time.monotonic() + IN_FLIGHT_GRACE
    while True:
        all_on, any_on = await _on_leaves(guest, planned)
        pending = any(os.path.lexists(p) for p in signals)
        if all_on or time.monotonic() > deadline or (not pending and time.monotonic() > grace):
            return all_on, any_on
        await asyncio.sleep(0.25)


async def _on_leaves(guest: Guest, planned: list[dict]) -> tuple[bool, bool]:
    """(all planned disks run on their leaf over the snapshot file, any does)."""
    disks = await common.disk_states(guest)
    hits = []
    for d in planned:
        state = disks.get(d["name"])
        hits.append(state is not None and state.chain.active.path == os.path.normpath(d["activeFile"])
                    and len(state.chain) > 1 and state.chain.backing[0].path == os.path.normpath(d["snapshotFile"]))
    return all(hits), any(hits)


async def _record_all(ctx: JobContext, guest: Guest) -> None:
    disks = await common.disk_states(guest)
    await ctx.record(guest, {name: s.chain for name, s in disks.items()})


async def _finish_external(ctx: JobContext, st: Status, guest: Guest, t0: float | None, downtime_ms: int | None,
                           creation_time: str | None) -> None:
    await st.step_to(RECORD)
    all_on, _ = await _on_leaves(guest, st.get("disks") or [])
    if not all_on:
        raise _Failed("SnapshotFailed", "libvirt took the snapshot but the domain does not run on the planned leaves")
    await _record_all(ctx, guest)
    await _ready(ctx, st, t0, downtime_ms, creation_time)


async def _ready(ctx: JobContext, st: Status, t0: float | None, downtime_ms: int | None,
                 creation_time: str | None) -> None:
    job = dict(st.get("job") or {})
    if t0 is not None:
        duration = int((time.monotonic() - t0) * 1000)
    else:
        started = common.parse_time(job.get("startedAt"))
        duration = int((time.time() - started) * 1000) if started else None
    fields = {"phase": "Ready", "creationTime": creation_time or st.get("creationTime") or common.now(),
              "conditions": [condition("True", "SnapshotReady", "the snapshot is ready")],
              "job": {**job, "step": DONE, "message": ""}}
    if downtime_ms is not None:
        fields["downtimeMs"] = downtime_ms
    if duration is not None:
        fields["durationMs"] = duration
    await st.write(**fields)
    log.info("%s: ready (%s ms)", _name(ctx), duration)
    with contextlib.suppress(Exception):
        await ctx.event("SnapshotReady", f"snapshot {(ctx.snapshot.get('metadata') or {}).get('name')} is ready",
                        False)


# -- Copy ---------------------------------------------------------------------------------------------


def _paused_wanted(ctx: JobContext) -> bool:
    return ((ctx.vm or {}).get("spec") or {}).get("powerState") == "Paused"


async def _copy(ctx: JobContext, st: Status, guest: Guest, t0: float | None, *, from_step: str = SAVE) -> None:
    planned = st.get("disks") or []
    mem = st.get("memoryFile")
    down0 = time.monotonic()
    if from_step == SAVE:
        await st.step_to(SAVE)
        paused = _paused_wanted(ctx)
        try:
            await guest.save(mem, running=not paused, paused=paused)
        except HypervisorError as err:
            raise _Failed(err.reason, err.message) from None
        await st.write(creationTime=common.now())
        from_step = COPYING
    if from_step == COPYING:
        await st.step_to(COPYING)
        common.remove_temp_files(d["snapshotFile"] for d in planned)
        for d in planned:
            if os.path.lexists(d["snapshotFile"]):
                continue  # copies are published whole (temp file + link): this one is complete
            try:
                await blocking(images.copy_sparse, d["activeFile"], d["snapshotFile"], roots=ctx.roots)
            except StorageError as err:
                raise _Failed(err.reason, f"disk {d['name']}: {err.message}") from None
        from_step = RESTORE
    downtime_ms = None
    if not _spec(ctx).get("stopAfter"):
        await st.step_to(RESTORE)
        await _restore_saved(ctx, guest, mem)
        if t0 is not None:
            downtime_ms = int((time.monotonic() - down0) * 1000)
        else:
            saved = common.parse_time(st.get("creationTime"))
            downtime_ms = int((time.time() - saved) * 1000) if saved else None
    await _ready(ctx, st, t0, downtime_ms, None)


async def _restore_saved(ctx: JobContext, guest: Guest, mem: str) -> None:
    """Restores the domain from its save image, once: only while it is shut off with reason saved."""
    ps = await guest.state()
    if ps.state != "shutoff" or ps.reason != "saved":
        return
    paused = _paused_wanted(ctx)
    try:
        xml = await ctx.host.save_image_xml(mem)
        await ctx.host.restore(mem, xml, paused=paused, running=not paused)
    except HypervisorError as err:
        raise _Failed(err.reason, f"restore from {mem}: {err.message}") from None


# -- re-entry -------------------------------------------------------------------------------------------


async def _resume(ctx: JobContext, st: Status) -> None:
    step, guest = st.step, ctx.guest
    if ctx.vm is None or guest is None:
        raise _Failed("VMNotFound", f"the VM went away during step {step}")
    try:
        await common.wait_idle(guest)
    except HypervisorError as err:
        raise _Failed(err.reason, err.message) from None
    planned = st.get("disks") or []
    if _spec(ctx).get("method", EXTERNAL) == EXTERNAL:
        all_on, any_on = await _on_leaves(guest, planned)
        if not all_on and step == SNAPSHOT:
            all_on, any_on = await _in_flight(guest, planned, st.get("memoryFile"))
        log.info("%s: re-entered at step %s: the domain runs on all its leaves %s, on some %s",
                 _name(ctx), step, all_on, any_on)
        if all_on:
            mem = st.get("memoryFile")
            if mem:
                try:
                    await ctx.host.save_image_xml(mem)
                except HypervisorError as err:
                    await _record_all(ctx, guest)
                    raise _Failed("MemoryIncomplete", f"the disks were taken but the memory file is unreadable: "
                                                      f"{err.message}") from None
            return await _finish_external(ctx, st, guest, None, None, None)
        if any_on:
            await _record_all(ctx, guest)
        raise _Failed("Interrupted", f"the agent restarted at step {step}, before the snapshot was taken")
    # Copy
    ps = await guest.state()
    saved = ps.state == "shutoff" and ps.reason == "saved"
    if step == PREPARE or (step == SAVE and not saved):
        raise _Failed("Interrupted", f"the agent restarted at step {step}, before the memory was saved")
    if not saved and step != RESTORE:
        raise _Failed("Interrupted", f"the domain is {ps.state}/{ps.reason} at step {step}, not saved")
    await _copy(ctx, st, guest, None, from_step=COPYING if step in (SAVE, COPYING) else RESTORE)


# -- failure ---------------------------------------------------------------------------------------------


async def _fail(ctx: JobContext, st: Status, reason: str, message: str) -> None:
    """Failed after InProgress: the files this job made go (unless something uses them), the VM is brought
    back running when a save stopped it."""
    planned = st.get("disks") or []
    method = _spec(ctx).get("method", EXTERNAL)
    notes = []
    if method == COPY and ctx.guest is not None and st.get("memoryFile"):
        try:
            await _restore_saved(ctx, ctx.guest, st["memoryFile"])
        except _Failed as err:
            notes.append(err.message)
    made = [d["activeFile"] for d in planned if method == EXTERNAL and d.get("created")]
    made += [d["snapshotFile"] for d in planned if method == COPY]
    if st.get("memoryFile"):
        made.append(st["memoryFile"])
    common.remove_temp_files(made)
    removed, kept = [], {}
    try:
        removed, kept = await common.remove_unreferenced(ctx, [p for p in made if os.path.lexists(p)],
                                                         removing=[common.owner_snapshot(ctx.snapshot)])
    except Exception as err:  # the failure is reported whatever the cleanup meets
        log.exception("cleanup after a failed snapshot")
        notes.append(f"cleanup: {err}")
    if kept:
        notes.append("kept: " + "; ".join(f"{p} ({why})" for p, why in kept.items()))
    text = message + ("" if not notes else " (" + "; ".join(notes) + ")")
    job = dict(st.get("job") or {})
    await st.write(phase="Failed", conditions=[condition("False", reason, text)],
                   job={**job, "step": "Failed", "message": text}, keptFiles=dict(kept))
    with contextlib.suppress(Exception):
        await ctx.event("SnapshotFailed", f"{reason}: {text}", True)
    log.info("snapshot failed (%s): %s; removed %s", reason, text, removed)
