"""revert.run(ctx, request_id): put the VM back to a snapshot (libvirt 9.0 has no revert of NO_METADATA
snapshots: it is done by hand).

Steps (the VM's status.lastRevert.step, written before each runs):
- External: Stop -> Leaves -> Define -> Start -> Cleanup -> Done. The snapshot point replaces the VM's
  state, so a running VM is destroyed; each disk gets a new leaf over the snapshot's file; the definition
  (and the record: ctx.record) points at them; with memory the domain is restored from the memory file
  with its embedded XML pointed at the new leaves (paused when powerState Paused, not at all when
  Stopped), without it the domain starts cold; the leaves the VM ran on before go when nothing else
  references them.
- Copy: Stop -> Safety -> CopyBack -> Start -> Cleanup -> Done: each running disk gets a safety copy,
  the snapshot's copy is put in its place, the memory is restored from the save image; the safety copies
  go once that succeeded.

Re-entered with lastRevert InProgress for the same id, it carries on from the recorded step: a leaf or
a copy that exists is complete (storage.images publishes whole files), a domain that runs is not
restored again.
"""

from __future__ import annotations

import contextlib
import filecmp
import glob
import logging
import os

from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots import common
from libvirt_operator.agent.snapshots.common import blocking
from libvirt_operator.agent.snapshots.plan import EXTERNAL, Refusal, RevertPlan, plan_revert, sanitize
from libvirt_operator.domain.snapshot import retarget_disks
from libvirt_operator.hypervisor import Guest, HypervisorError, readxml
from libvirt_operator.storage import Chain, StorageError, images

log = logging.getLogger(__name__)

STOP, LEAVES, DEFINE, START, CLEANUP, SAFETY, COPY_BACK, DONE = (
    "Stop", "Leaves", "Define", "Start", "Cleanup", "Safety", "CopyBack", "Done")
ORDER = {EXTERNAL: (STOP, LEAVES, DEFINE, START, CLEANUP), "Copy": (STOP, SAFETY, COPY_BACK, START, CLEANUP)}
# The steps whose start is written to status. External: Leaves and Define are quick and idempotent on
# re-entry (an existing leaf is verified, a definition rewritten), so a restart recorded at Stop redoes
# them; each write costs an API round trip on the revert's critical path.
RECORDED = {EXTERNAL: (STOP, START), "Copy": (STOP, SAFETY, COPY_BACK, START, CLEANUP)}


_Failed = common.JobFailed


class _Outcome:
    def __init__(self, ctx: JobContext, request_id: str):
        self.ctx, self.id = ctx, request_id

    async def write(self, result: str, step: str | None, message: str = "") -> None:
        outcome = {"id": self.id, "result": result, "message": message[:4000], "time": common.now()}
        if step is not None:
            outcome["step"] = step
        await self.ctx.write_revert(outcome)


def _power(ctx: JobContext) -> str:
    return ((ctx.vm or {}).get("spec") or {}).get("powerState", "Running")


async def run(ctx: JobContext, request_id: str) -> None:
    out = _Outcome(ctx, request_id)
    last = ((ctx.vm or {}).get("status") or {}).get("lastRevert") or {}
    if last.get("id") == request_id and last.get("result") in ("Succeeded", "Failed"):
        return
    resumed = last.get("id") == request_id and last.get("result") == "InProgress"
    step = last.get("step") if resumed else None
    try:
        await _run(ctx, out, step)
    except Refusal as refused:
        await out.write("Failed", step or "Refused", f"{refused.reason}: {refused.message}")
    except _Failed as failed:
        await _fail(ctx, out, failed.reason, failed.message)


async def _run(ctx: JobContext, out: _Outcome, step: str | None) -> None:
    vm, guest = ctx.vm, ctx.guest
    if vm is None:
        raise Refusal("VMNotFound", "the VM does not exist")
    if guest is None:
        raise Refusal("DomainNotFound", "the VM has no domain on this node")
    disks = await common.disk_states(guest, inactive=True)
    live = await common.full_chains(ctx, guest)
    plan = plan_revert(vm, ctx.snapshot, out.id, disks, ctx.roots)
    steps = ORDER[plan.method]
    if step is None:
        if (await guest.state()).state != "shutoff" and await common.job_active(guest):
            raise Refusal("OperationInProgress", "libvirt has a job running on the domain (a migration or a save)")
        for d in plan.disks:
            fresh = d.new_file if plan.method == EXTERNAL else d.safety
            if os.path.lexists(fresh):
                raise Refusal("FileExists", f"disk {d.name}: {fresh} exists; refusing to overwrite it")
        step = steps[0]
    elif step not in steps:
        raise _Failed("Interrupted", f"unknown step {step} recorded for a {plan.method} revert")
    old = _old_files(vm, live, disks)
    for current in steps[steps.index(step):]:
        if current in RECORDED[plan.method] or current == step:
            await out.write("InProgress", current)
        await _STEPS[current](ctx, guest, plan)
    await _cleanup(ctx, guest, plan, old)
    await out.write("Succeeded", DONE, f"reverted to snapshot {(ctx.snapshot.get('metadata') or {}).get('name')}")
    with contextlib.suppress(Exception):
        await ctx.event("Reverted", f"reverted to snapshot {(ctx.snapshot.get('metadata') or {}).get('name')}",
                        False)


def _old_files(vm: dict, *domain_disks) -> set[str]:
    """The files the VM ran on before the revert: the domain's chains now and the VM's recorded ones."""
    files: set[str] = set()
    for disks in domain_disks:
        for state in disks.values():
            files.update(state.chain.paths)
    for d in (vm.get("status") or {}).get("disks") or []:
        if d.get("path"):
            files.add(os.path.normpath(d["path"]))
        files.update(os.path.normpath(p) for p in d.get("backingChain") or [] if os.path.isabs(p))
    return files


# -- steps ---------------------------------------------------------------------------------------------------


async def _stop(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    await common.wait_idle(guest)
    if (await guest.state()).state != "shutoff":
        try:
            await guest.destroy()
        except HypervisorError as err:
            if (await guest.state()).state != "shutoff":
                raise _Failed(err.reason, err.message) from None


async def _leaves(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    for d in plan.disks:
        try:
            if os.path.lexists(d.new_file):  # made by this revert before a restart: complete
                await blocking(images.verify_overlay, d.new_file, d.snapshot_file, roots=ctx.roots)
            else:
                await blocking(images.create_overlay, d.new_file, d.snapshot_file, d.snapshot_format, roots=ctx.roots)
        except StorageError as err:
            raise _Failed(err.reason, f"disk {d.name}: {err.message}") from None


async def _new_chains(ctx: JobContext, guest: Guest, plan: RevertPlan) -> dict[str, Chain]:
    """Every disk's chain once the revert is done (computed once per job: qemu-img per disk)."""
    if "revert_chains" not in ctx.scratch:
        ctx.scratch["revert_chains"] = await _compute_chains(ctx, guest, plan)
    return ctx.scratch["revert_chains"]


async def _compute_chains(ctx: JobContext, guest: Guest, plan: RevertPlan) -> dict[str, Chain]:
    chains = {name: s.chain for name, s in (await common.disk_states(guest, inactive=True)).items()}
    for d in plan.disks:
        try:
            chains[d.name] = await blocking(images.chain, d.new_file, roots=ctx.roots)
        except StorageError as err:
            raise _Failed(err.reason, f"disk {d.name}: {err.message}") from None
    return chains


async def _define(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    try:
        await ctx.record(guest, await _new_chains(ctx, guest, plan))  # retargets the disks and records them
    except HypervisorError as err:
        raise _Failed(err.reason, err.message) from None


async def _start(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    power = _power(ctx)
    if (await guest.state()).state != "shutoff" or power == "Stopped":
        return  # restored (or started) before a restart; or to be left stopped
    paused = power == "Paused"
    try:
        if plan.memory_file:
            xml = await ctx.host.save_image_xml(plan.memory_file)
            if plan.method == EXTERNAL:
                xml = await _restore_xml(guest, xml, plan)
            await ctx.host.restore(plan.memory_file, xml, paused=paused, running=not paused)
        else:
            await guest.start(paused=paused)
    except HypervisorError as err:
        raise _Failed(err.reason, err.message) from None
    if plan.method == EXTERNAL:
        with contextlib.suppress(HypervisorError):  # the live metadata: the restored XML carried the old record
            await ctx.record(guest, await _new_chains(ctx, guest, plan))


async def _restore_xml(guest: Guest, saved_xml: str, plan: RevertPlan) -> str:
    """The memory file's XML with each reverted disk on its new leaf, and every other disk on the file it
    runs on now (the saved XML names the files of the snapshot's time)."""
    xml = retarget_disks(saved_xml, plan.leaves)
    present = {s.target for s in readxml.disk_sources(xml)}
    others: dict[str, dict[str, str]] = {}
    for state in (await common.disk_states(guest, inactive=True)).values():
        if state.target in present and state.target not in plan.leaves:
            others.setdefault(state.chain.active.format or "qcow2", {})[state.target] = state.chain.active.path
    for fmt, leaves in others.items():
        xml = retarget_disks(xml, leaves, fmt)
    return xml


async def _safety(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    common.remove_temp_files(d.safety for d in plan.disks)
    for d in plan.disks:
        if os.path.lexists(d.safety):
            continue
        try:
            await blocking(images.copy_sparse, d.new_file, d.safety, roots=ctx.roots)
        except StorageError as err:
            raise _Failed(err.reason, f"disk {d.name}: safety copy: {err.message}") from None


async def _copy_back(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    common.remove_temp_files(d.new_file for d in plan.disks)
    for d in plan.disks:
        if not os.path.lexists(d.safety):
            raise _Failed("FileNotFound", f"disk {d.name}: the safety copy {d.safety} is missing")
        if os.path.lexists(d.new_file):
            if await blocking(filecmp.cmp, d.new_file, d.snapshot_file, False):
                continue  # put back before a restart
            try:
                await blocking(images.remove, d.new_file, roots=ctx.roots)  # its safety copy exists
            except StorageError as err:
                raise _Failed(err.reason, f"disk {d.name}: {err.message}") from None
        try:
            await blocking(images.copy_sparse, d.snapshot_file, d.new_file, roots=ctx.roots)
        except StorageError as err:
            raise _Failed(err.reason, f"disk {d.name}: copy back: {err.message}") from None


async def _no_op(ctx: JobContext, guest: Guest, plan: RevertPlan) -> None:
    """Cleanup runs after the loop (it needs the old files)."""


_STEPS = {STOP: _stop, LEAVES: _leaves, DEFINE: _define, START: _start, SAFETY: _safety, COPY_BACK: _copy_back,
          CLEANUP: _no_op}


async def _cleanup(ctx: JobContext, guest: Guest, plan: RevertPlan, old: set[str]) -> None:
    if plan.method != EXTERNAL:
        for d in plan.disks:
            with contextlib.suppress(StorageError):
                await blocking(images.remove, d.safety, roots=ctx.roots)
        return
    snap = ctx.snapshot
    vm_name = sanitize((ctx.vm.get("metadata") or {}).get("name", ""))
    candidates = set(old)
    # this snapshot's own leaves, and earlier revert leaves of this VM (found again after a restart)
    candidates.update(os.path.normpath(d["activeFile"]) for d in (snap.get("status") or {}).get("disks") or []
                      if d.get("activeFile"))
    for d in plan.disks:
        pattern = os.path.join(glob.escape(os.path.dirname(d.snapshot_file)),
                               f"{glob.escape(vm_name)}-{d.name}.*.r-*.qcow2")
        candidates.update(glob.glob(pattern))
    new = set()
    for chain in (await _new_chains(ctx, guest, plan)).values():
        new.update(chain.paths)
    removed, kept = await common.remove_unreferenced(ctx, sorted(candidates), removing=[common.owner_vm(ctx.vm)],
                                                     keep=new)
    log.info("revert cleanup: removed %s, kept %s", removed, kept)


async def _fail(ctx: JobContext, out: _Outcome, reason: str, message: str) -> None:
    """A failed revert: the new leaves nothing uses go; the domain is left as it is (stopped, when the stop
    ran: the power loop brings it back to powerState on its definition's chain)."""
    notes = []
    try:
        vm, guest = ctx.vm, ctx.guest
        if vm is not None and guest is not None:
            disks = await common.disk_states(guest, inactive=True)
            plan = plan_revert(vm, ctx.snapshot, out.id, disks, ctx.roots)
            if plan.method == EXTERNAL:
                made = [d.new_file for d in plan.disks if os.path.lexists(d.new_file)]
                _, kept = await common.remove_unreferenced(ctx, made, removing=[common.owner_vm(vm)])
                if kept:
                    notes.append("kept " + ", ".join(kept))
            else:
                for d in plan.disks:  # the running disk comes back from its safety copy
                    if not os.path.lexists(d.new_file) and os.path.lexists(d.safety):
                        await blocking(images.copy_sparse, d.safety, d.new_file, roots=ctx.roots)
                    if os.path.lexists(d.new_file) and os.path.lexists(d.safety):
                        notes.append(f"safety copy kept: {d.safety}")
    except Exception as err:
        log.exception("cleanup after a failed revert")
        notes.append(f"cleanup: {err}")
    await out.write("Failed", "Failed", f"{reason}: {message}" + (f" ({'; '.join(notes)})" if notes else ""))
    with contextlib.suppress(Exception):
        await ctx.event("RevertFailed", f"{reason}: {message}", True)
