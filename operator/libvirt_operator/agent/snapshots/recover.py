"""After an agent restart: which entry point a VMSnapshot (or its VM's revert) still owes, and calling it.
Every entry point carries on from the step recorded in status, so recovery is calling it again."""

from __future__ import annotations

from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots import create, delete, revert


def owed(vm: dict | None, snapshot: dict) -> str | None:
    """"revert" (the VM's lastRevert is InProgress for this snapshot's request), "delete" (the snapshot is
    being deleted or is Deleting), "create" (InProgress or not started), or None (nothing to do)."""
    meta = snapshot.get("metadata") or {}
    st = snapshot.get("status") or {}
    vm_spec = (vm or {}).get("spec") or {}
    last = ((vm or {}).get("status") or {}).get("lastRevert") or {}
    request = vm_spec.get("revert") or {}
    if (last.get("result") == "InProgress" and request.get("snapshot") == meta.get("name")
            and request.get("id") == last.get("id")):
        return "revert"
    if meta.get("deletionTimestamp") or st.get("phase") == "Deleting":
        return "delete"
    if st.get("phase") in (None, "Pending", "InProgress"):
        return "create"
    return None


async def run(ctx: JobContext) -> bool | None:
    """Calls the owed entry point; delete's result (True: the finalizer may go), else None."""
    kind = owed(ctx.vm, ctx.snapshot)
    if kind == "revert":
        await revert.run(ctx, ctx.vm["status"]["lastRevert"]["id"])
    elif kind == "delete":
        return await delete.run(ctx)
    elif kind == "create":
        await create.run(ctx)
    return None
