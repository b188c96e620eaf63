"""delete.run(ctx) -> bool: deal with a VMSnapshot's files before its finalizer goes (S8).

The snapshot's files are its snapshotFiles (External: the read-only backing nodes; Copy: the copies)
and its memory file. Each one:
- held by another owner (another snapshot's chain, a clone's chain, another VM): kept, and said why
  (status.keptFiles, phase Deleting, condition Ready=False FilesHeld); run returns False and the runner
  tries again later;
- in the VM's own chain (External): merged out of it while the VM runs. Directly below the active file:
  active blockCommit into it and pivot (the VM then runs on the snapshot's file again, and the leaf above
  goes); deeper: the layer above it is committed into it (when nothing else holds that layer). A stopped
  VM's chain is not merged (kept, VMNotRunning);
- referenced by nothing: removed.
Every run decides from the facts (the domain's chains, ctx.references()), so a restart during a merge
just finds the job (pivots a READY active commit, waits for a commit) and carries on.
"""

from __future__ import annotations

import logging
import os

from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots import common, create
from libvirt_operator.agent.snapshots.common import Status, condition
from libvirt_operator.agent.snapshots.plan import EXTERNAL
from libvirt_operator.hypervisor import Guest, HypervisorError

log = logging.getLogger(__name__)

MERGE, REMOVE = "Merge", "Remove"


async def run(ctx: JobContext) -> bool:
    st = Status(ctx)
    if st.get("phase") == "InProgress" and ctx.vm is not None:
        # an interrupted create is converged first (finished or failed cleanly), then deleted
        ctx.snapshot = {**ctx.snapshot, "status": await create.converge(ctx)}
        st = Status(ctx)
    if st.get("phase") not in ("Ready", "Deleting"):
        return True  # never taken, or failed (its own files were removed then): nothing of its own
    spec = ctx.snapshot.get("spec") or {}
    method = spec.get("method", EXTERNAL)
    own = common.owner_snapshot(ctx.snapshot)
    ns = (ctx.snapshot.get("metadata") or {}).get("namespace", "")
    vm_owner = f"vm/{ns}/{spec.get('vmName', '')}"
    mem = st.get("memoryFile")
    files = [os.path.normpath(d["snapshotFile"]) for d in st.get("disks") or [] if d.get("snapshotFile")]
    ours = [*files, *([os.path.normpath(mem)] if mem else [])]
    held_before = st.get("phase") == "Deleting" and bool(st.get("keptFiles"))  # a retry: FilesHeld stays said
    await st.write(phase="Deleting", job={**(st.get("job") or {}), "step": MERGE, "message": ""},
                   **({} if held_before else {"conditions": [
                       condition("False", "SnapshotDeleting", "the snapshot's files are being dealt with")]}))
    refs = ctx.references()
    held = {p: "held by " + ", ".join(sorted(refs.owners(p) - {own, vm_owner}))
            for p in ours if refs.owners(p) - {own, vm_owner}}
    guest = ctx.guest if ctx.vm is not None else None
    removing, candidates, notes = [own], [p for p in ours if p not in held], {}
    in_vm: set[str] = set()
    if guest is not None:
        removing.append(vm_owner)  # the VM is judged by its domain's own chains, not by its recorded copy
        if method == EXTERNAL:
            leftovers, notes = await _merge(ctx, guest, [p for p in files if p not in held], own, vm_owner)
            candidates += leftovers
        chains = await common.full_chains(ctx, guest)
        in_vm = {p for s in chains.values() for p in s.chain.paths}
        if (await guest.state()).state != "shutoff":
            try:
                await ctx.record(guest, {n: s.chain for n, s in chains.items()})
            except HypervisorError as err:
                log.warning("record after merging: %s", err)
    # the leaves this snapshot made, once the VM no longer runs on them (a merge before a restart, a revert)
    candidates += [os.path.normpath(d["activeFile"]) for d in st.get("disks") or []
                   if method == EXTERNAL and d.get("created") and d.get("activeFile")]
    await st.write(job={**(st.get("job") or {}), "step": REMOVE, "message": ""})
    existing = [p for p in dict.fromkeys(candidates) if p not in in_vm and os.path.lexists(p)]
    _, kept = await common.remove_unreferenced(ctx, existing, removing=removing, keep=in_vm)
    held.update({p: why for p, why in kept.items() if p in ours})
    held = {p: why for p, why in held.items() if os.path.lexists(p)}
    stays = {p: notes.get(p, "part of the VM's chain") for p in ours if p in in_vm and p not in held}
    if held:
        text = "; ".join(f"{p}: {why}" for p, why in held.items())
        await st.write(keptFiles=held, conditions=[condition("False", "FilesHeld", text)],
                       job={**(st.get("job") or {}), "step": REMOVE, "message": text})
        return False
    message = "" if not stays else "left in the VM's chain: " + "; ".join(f"{p} ({w})" for p, w in stays.items())
    await st.write(keptFiles={}, job={**(st.get("job") or {}), "step": "Done", "message": message})
    return True


async def _finish_jobs(guest: Guest, targets: list[str]) -> None:
    """A merge a restart interrupted: pivot a READY active commit, wait for a commit to end."""
    for target in targets:
        job = await guest.block_job_info(target)
        if job is None:
            continue
        if job.type in ("active-commit", "copy"):
            await guest.wait_block_job(target, "ready")
            await guest.block_job_pivot(target)
        else:
            await guest.wait_block_job(target, "gone")


async def _merge(ctx: JobContext, guest: Guest, files: list[str], own: str,
                 vm_owner: str) -> tuple[list[str], dict[str, str]]:
    """Merges each of the snapshot's files that only the VM's own running chain holds out of it. Returns
    (files the merges left unused, {kept file: why})."""
    kept: dict[str, str] = {}
    leftovers: list[str] = []
    running = (await guest.state()).state != "shutoff"
    states = await common.full_chains(ctx, guest)
    if running:
        await common.wait_idle(guest)
        try:
            await _finish_jobs(guest, sorted({s.target for s in states.values()}))
        except HypervisorError as err:
            return [], {p: f"{err.reason}: {err.message}" for p in files}
        states = await common.disk_states(guest)
    refs = ctx.references()
    for path in files:
        others = sorted(refs.owners(path) - {own, vm_owner})
        if others:
            kept[path] = "held by " + ", ".join(others)
            continue
        holder = next((s for s in states.values() if path in s.chain), None)
        if holder is None:
            continue  # not in the VM's chain: removed if nothing references it
        if not running:
            kept[path] = "VMNotRunning: the VM's chain runs on it and a merge needs the running VM"
            continue
        chain = holder.chain
        i = chain.index(path)
        if i == 0:
            kept[path] = "the VM runs on it (active file)"
            continue
        above = chain.layers[i - 1].path
        if i > 1 and sorted(refs.owners(above) - {own, vm_owner}):
            kept[path] = f"the layer above it ({above}) is held by " + ", ".join(sorted(refs.owners(above) - {own}))
            continue
        try:
            if i == 1:
                await guest.block_commit_active(holder.target)
                await guest.wait_block_job(holder.target, "ready")
                await guest.block_job_pivot(holder.target)
            else:
                await guest.block_commit(holder.target, base=path, top=above)
                await guest.wait_block_job(holder.target, "gone")
        except HypervisorError as err:
            kept[path] = f"merge failed: {err.reason}: {err.message}"
            continue
        leftovers.append(above)
        states = await common.disk_states(guest)
    return leftovers, kept
