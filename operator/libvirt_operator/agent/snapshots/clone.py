"""clone.leaves(clone_spec, snapshot_obj, roots): the disks of a VM created with spec.cloneFrom (S7).

Each disk of the clone named like one of the forClone snapshot's disks gets a new qcow2 leaf at its own
spec.disks[].path over that disk's snapshotFile (read-only, shared with the source and other clones).
An existing file is never overwritten: it is accepted only when it already is a qcow2 overlay of that
file (a clone whose leaves were made before an agent restart), else StorageError FileExists /
BackingMismatch. Blocking (qemu-img): call it in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from libvirt_operator.agent.snapshots.plan import plan_clone
from libvirt_operator.storage import Chain, StorageError, images


def leaves(clone_spec: Mapping, snapshot_obj: Mapping, roots: Iterable[str]) -> dict[str, Chain]:
    """{disk name: chain to render with} for the clone's disks over the snapshot. Raises
    plan.Refusal (not a Ready forClone snapshot, no disk in common, a path outside the roots) or
    StorageError. A leaf this call made is removed again if a later disk fails."""
    if hasattr(clone_spec, "model_dump"):
        clone_spec = clone_spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    roots = tuple(roots)
    made: list[str] = []
    out: dict[str, Chain] = {}
    try:
        for leaf in plan_clone(clone_spec, snapshot_obj, roots):
            if os.path.lexists(leaf.path):
                try:
                    out[leaf.name] = images.verify_overlay(leaf.path, leaf.backing, roots=roots)
                except StorageError as err:
                    raise StorageError("FileExists" if err.reason == "BackingMismatch" else err.reason,
                                       f"disk {leaf.name}: {leaf.path} exists and is not a qcow2 overlay of "
                                       f"{leaf.backing}; refusing to overwrite it ({err.message})") from None
                continue
            out[leaf.name] = images.create_overlay(leaf.path, leaf.backing, leaf.backing_format, roots=roots)
            made.append(leaf.path)
    except Exception:
        for path in made:
            images.remove(path, roots=roots)
        raise
    return out
