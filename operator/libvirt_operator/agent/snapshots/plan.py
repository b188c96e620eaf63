"""What a snapshot, a revert or a clone will do, decided before anything is touched (pure but for
reading which files exist and where symlinks resolve).

- Which disks: every `device: disk` of the VM spec that has a path, is not `readOnly`, and is not
  listed in the VMSnapshot with `snapshot: no`.
- The system disk: the disk with the lowest `bootOrder` if any disk has one, else the first
  `device: disk` of `spec.disks`. A disk-only snapshot of it is refused (SystemDiskSnapshot) unless
  `forClone`: a crash-consistent copy of the disk the guest booted from is what the handbook warns about.
- Generated paths, next to the disk's active file (its recorded leaf, not spec.disks[].path):
  External leaf `<vm>-<disk>.<snapshot>.qcow2`, Copy `<vm>-<disk>.<snapshot>.copy`, memory
  `<vm>.<snapshot>.mem` (beside the first snapshotted disk), revert leaf
  `<vm>-<disk>.<snapshot>.r-<revert id>.qcow2` (beside the snapshot's file), safety copy of a Copy revert
  `<vm>-<disk>.<snapshot>.r-<revert id>.safety`. Every path is confined to the storage roots; a file that
  exists is refused (never overwritten) unless the disk says reuseExisting.
- A disk-only snapshot of a stopped VM is refused (VMNotRunning) like the others: the engine works on
  a running domain only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from libvirt_operator.storage import Chain, StorageError
from libvirt_operator.storage.images import confine

EXTERNAL, COPY = "External", "Copy"


class Refusal(Exception):
    """Refused before anything was touched: a reason for the Ready condition and a message."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DiskState:
    """One disk of the domain as libvirt has it now: its name (spec.disks[].name), target and chain."""

    name: str
    target: str
    chain: Chain


@dataclass(frozen=True)
class DiskPlan:
    name: str
    target: str
    chain: Chain  # the disk's chain when the snapshot is taken
    file: str  # External: the new leaf; Copy: the copy
    method: str
    reuse: bool = False  # External: `file` exists already (verified to be an overlay of the active file)

    @property
    def snapshot_file(self) -> str:
        return self.chain.active.path if self.method == EXTERNAL else self.file

    @property
    def snapshot_format(self) -> str:
        return self.chain.active.format or "qcow2"

    @property
    def active_file(self) -> str:
        return self.file if self.method == EXTERNAL else self.chain.active.path

    @property
    def created(self) -> bool:
        return self.method == EXTERNAL and not self.reuse

    def status(self) -> dict:
        return {"name": self.name, "target": self.target, "snapshotFile": self.snapshot_file,
                "snapshotFormat": self.snapshot_format, "activeFile": self.active_file, "created": self.created}


@dataclass(frozen=True)
class CreatePlan:
    method: str
    memory_file: str | None
    disks: tuple[DiskPlan, ...]
    for_clone: bool = False
    stop_after: bool = False

    @property
    def leaves(self) -> dict[str, str]:
        """External: {target: new leaf}."""
        return {d.target: d.file for d in self.disks}

    def status_disks(self) -> list[dict]:
        return [d.status() for d in self.disks]


@dataclass(frozen=True)
class RevertDisk:
    name: str
    target: str
    snapshot_file: str
    snapshot_format: str
    new_file: str  # External: the new leaf over snapshot_file; Copy: the active file the copy goes back to
    safety: str | None = None  # Copy: where the running disk is copied first


@dataclass(frozen=True)
class RevertPlan:
    method: str
    memory_file: str | None
    disks: tuple[RevertDisk, ...]

    @property
    def leaves(self) -> dict[str, str]:
        return {d.target: d.new_file for d in self.disks}


# -- small pure helpers ---------------------------------------------------------------------------------


def _spec(obj: Mapping) -> Mapping:
    return obj.get("spec") or {}


def _name(obj: Mapping) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def sanitize(text: str) -> str:
    """A file-name-safe form of a request id or object name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip(".") or "x"


def system_disk(vm_spec: Mapping) -> str | None:
    """The disk the guest boots from: lowest bootOrder if any disk has one, else the first device: disk."""
    disks = [d for d in vm_spec.get("disks") or [] if d.get("device", "disk") == "disk"]
    ordered = [d for d in disks if d.get("bootOrder") is not None]
    if ordered:
        return min(ordered, key=lambda d: d["bootOrder"])["name"]
    return disks[0]["name"] if disks else None


def selected_disks(vm_spec: Mapping, snap_spec: Mapping) -> list[Mapping]:
    """The VM's disks this snapshot takes (see the module doc); DiskNotFound for a listed unknown disk."""
    listed = {d["name"]: d for d in snap_spec.get("disks") or []}
    names = {d.get("name") for d in vm_spec.get("disks") or []}
    unknown = sorted(set(listed) - names)
    if unknown:
        raise Refusal("DiskNotFound", f"the VM has no disk {', '.join(unknown)}")
    chosen = []
    for disk in vm_spec.get("disks") or []:
        if disk.get("device", "disk") != "disk" or disk.get("readOnly") or not disk.get("path"):
            continue
        if listed.get(disk["name"], {}).get("snapshot", "external") == "no":
            continue
        chosen.append(disk)
    return chosen


def _confined(path: str, roots: Iterable[str], what: str) -> str:
    try:
        return confine(path, roots)
    except StorageError as err:
        raise Refusal(err.reason, f"{what}: {err.message}") from None


# -- create -------------------------------------------------------------------------------------------


def plan_create(vm: Mapping, snapshot: Mapping, disks: Mapping[str, DiskState], roots: Iterable[str], *,
                running: bool, exists: Callable[[str], bool] = os.path.lexists) -> CreatePlan:
    """The snapshot of `vm` that `snapshot` asks for, given the domain's disks now (by disk name).
    Raises Refusal (nothing touched)."""
    roots = tuple(roots)
    vm_spec, snap_spec = _spec(vm), _spec(snapshot)
    vm_name, snap_name = sanitize(_name(vm)), sanitize(_name(snapshot))
    method = snap_spec.get("method", EXTERNAL)
    memory = bool(snap_spec.get("memory")) or method == COPY
    for_clone = bool(snap_spec.get("forClone"))
    if not running:
        raise Refusal("VMNotRunning", "a snapshot is taken of a running (or paused) VM; this one is not running")
    if memory and vm_spec.get("hostDevices"):
        names = ", ".join(d.get("name", "?") for d in vm_spec["hostDevices"])
        raise Refusal("PassthroughDevice", f"the memory of a VM with host devices ({names}) cannot be saved")
    chosen = selected_disks(vm_spec, snap_spec)
    if not chosen:
        raise Refusal("NoDisks", "no disk to snapshot (cdroms, read-only disks and snapshot: no are left out)")
    if method == EXTERNAL and not memory and not for_clone:
        system = system_disk(vm_spec)
        if system in {d["name"] for d in chosen}:
            raise Refusal("SystemDiskSnapshot", f"a disk-only snapshot of the system disk {system} is refused "
                          "(its copy would not be consistent); list it with snapshot: no, or take the memory too")
    listed = {d["name"]: d for d in snap_spec.get("disks") or []}
    plans, seen = [], set()
    for disk in chosen:
        name = disk["name"]
        state = disks.get(name)
        if state is None:
            raise Refusal("DiskNotFound", f"disk {name} is not a file disk of the running domain")
        opts = listed.get(name, {})
        beside = os.path.join(os.path.dirname(state.chain.active.path), f"{vm_name}-{name}.{snap_name}")
        if method == EXTERNAL:
            path = opts.get("overlayPath") or f"{beside}.qcow2"
            reuse = bool(opts.get("reuseExisting"))
        else:
            path = opts.get("copyPath") or f"{beside}.copy"
            reuse = False
        path = _confined(path, roots, f"disk {name}")
        if path in seen or path in state.chain:
            raise Refusal("FileExists", f"disk {name}: {path} is already used by this snapshot or the disk's chain")
        seen.add(path)
        if exists(path) and not reuse:
            raise Refusal("FileExists", f"disk {name}: {path} exists; refusing to overwrite it (reuseExisting "
                          "takes a pre-created overlay)")
        if reuse and not exists(path):
            raise Refusal("FileNotFound", f"disk {name}: reuseExisting, but {path} does not exist")
        plans.append(DiskPlan(name, state.target, state.chain, path, method, reuse))
    memory_file = None
    if memory:
        first = plans[0].chain.active.path
        memory_file = _confined(snap_spec.get("memoryPath")
                                or os.path.join(os.path.dirname(first), f"{vm_name}.{snap_name}.mem"),
                                roots, "memory")
        if exists(memory_file) or memory_file in seen:
            raise Refusal("FileExists", f"memory: {memory_file} exists; refusing to overwrite it")
    return CreatePlan(method, memory_file, tuple(plans), for_clone, bool(snap_spec.get("stopAfter")))


# -- revert ---------------------------------------------------------------------------------------------


def plan_revert(vm: Mapping, snapshot: Mapping, request_id: str, disks: Mapping[str, DiskState],
                roots: Iterable[str], *, exists: Callable[[str], bool] = os.path.lexists) -> RevertPlan:
    """The revert of `vm` to `snapshot` for request `request_id`, given the domain's disks now (by
    name). Raises Refusal. An existing new leaf is NOT refused here (a re-entered revert finds its own);
    the caller refuses it on a fresh start."""
    roots = tuple(roots)
    st = snapshot.get("status") or {}
    snap_spec = _spec(snapshot)
    snap_name = _name(snapshot)
    vm_uid = (vm.get("metadata") or {}).get("uid")
    if snap_spec.get("vmName") not in (None, _name(vm)) or (st.get("vmUid") and st.get("vmUid") != vm_uid):
        raise Refusal("SnapshotOfAnotherVM", f"snapshot {snap_name} belongs to another VM "
                      f"({snap_spec.get('vmName')}, uid {st.get('vmUid')})")
    if st.get("phase") != "Ready":
        raise Refusal("SnapshotNotReady", f"snapshot {snap_name} is {st.get('phase') or 'not taken yet'}, not Ready")
    if snap_spec.get("forClone"):
        raise Refusal("NotRevertible", f"snapshot {snap_name} is a forClone snapshot (crash-consistent, "
                      "for clones); it cannot be reverted to")
    method = snap_spec.get("method", EXTERNAL)
    memory_file = st.get("memoryFile")
    if memory_file is not None:
        memory_file = _confined(memory_file, roots, "memory")
        if not exists(memory_file):
            raise Refusal("FileNotFound", f"the snapshot's memory file {memory_file} is gone")
    if method == COPY and memory_file is None:
        raise Refusal("FileNotFound", f"snapshot {snap_name} (method Copy) has no memory file")
    rid, vm_name, snap_part = sanitize(request_id), sanitize(_name(vm)), sanitize(snap_name)
    out = []
    for d in st.get("disks") or []:
        name = d["name"]
        state = disks.get(name)
        if state is None:
            raise Refusal("DiskNotFound", f"the VM has no file disk {name} any more")
        snap_file = _confined(d["snapshotFile"], roots, f"disk {name}")
        if not exists(snap_file):
            raise Refusal("FileNotFound", f"disk {name}: the snapshot's file {snap_file} is gone")
        fmt = d.get("snapshotFormat") or "qcow2"
        if method == EXTERNAL:
            leaf = _confined(os.path.join(os.path.dirname(snap_file), f"{vm_name}-{name}.{snap_part}.r-{rid}.qcow2"),
                             roots, f"disk {name}")
            out.append(RevertDisk(name, state.target, snap_file, fmt, leaf))
        else:
            active = state.chain.active.path
            if d.get("activeFile") and os.path.normpath(d["activeFile"]) != active:
                raise Refusal("ChainChanged", f"disk {name} runs on {active} now, not on {d['activeFile']} "
                              "which the copy was taken of")
            safety = _confined(os.path.join(os.path.dirname(active), f"{vm_name}-{name}.{snap_part}.r-{rid}.safety"),
                               roots, f"disk {name}")
            out.append(RevertDisk(name, state.target, snap_file, fmt, active, safety))
    if not out:
        raise Refusal("NoDisks", f"snapshot {snap_name} records no disk")
    return RevertPlan(method, memory_file, tuple(out))


# -- clone ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloneLeaf:
    name: str
    path: str  # the clone's spec.disks[].path
    backing: str  # the snapshot's read-only file
    backing_format: str


def plan_clone(clone_spec: Mapping, snapshot: Mapping, roots: Iterable[str]) -> tuple[CloneLeaf, ...]:
    """The leaves of a clone: each clone disk named like one of the snapshot's disks, at its spec path,
    over that disk's snapshotFile. Raises Refusal."""
    roots = tuple(roots)
    st = snapshot.get("status") or {}
    if not _spec(snapshot).get("forClone"):
        raise Refusal("NotForClone", f"snapshot {_name(snapshot)} is not a forClone snapshot")
    if st.get("phase") != "Ready":
        raise Refusal("SnapshotNotReady", f"snapshot {_name(snapshot)} is {st.get('phase') or 'not taken yet'}")
    files = {d["name"]: d for d in st.get("disks") or []}
    out = []
    for disk in clone_spec.get("disks") or []:
        taken = files.get(disk.get("name"))
        if taken is None or disk.get("device", "disk") != "disk" or not disk.get("path"):
            continue
        path = _confined(disk["path"], roots, f"disk {disk['name']}")
        backing = _confined(taken["snapshotFile"], roots, f"disk {disk['name']}")
        if path == backing:
            raise Refusal("FileExists", f"disk {disk['name']}: the clone's path is the snapshot's own file {path}")
        out.append(CloneLeaf(disk["name"], path, backing, taken.get("snapshotFormat") or "qcow2"))
    if not out:
        raise Refusal("NoDisks", "no disk of the clone is named like a disk of the snapshot")
    return tuple(out)
