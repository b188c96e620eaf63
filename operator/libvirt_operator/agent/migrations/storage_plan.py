"""What a Storage migration (M2, blockcopy on the same node) will do, decided before anything is touched
(pure but for reading which files exist and where symlinks resolve), and the small decisions its steps
take from the facts (a disk's block job, the old files to remove, the progress figures).

- Which disks: spec.disks [{name, destinationPath}]; each must be a file-backed `device: disk` of the
  running domain (DiskNotFound), listed once (DuplicateDisk), not read-only (DiskReadOnly).
- Its chain: the recorded chain (agent/disks: the domain's <lvo:disks> record) names the active file; the
  backing files below it are the ones QEMU runs on (the live XML). A disk that does not run on its recorded
  file is refused (DiskDrifted): the record is the truth the move starts from, never the spec path.
- The new chain: the new leaf at destinationPath, in the format of the old leaf (a qcow2 leaf over the copies
  of its backing files; a qcow2 without backing file: an empty qcow2 of the same size; a raw leaf: an empty
  sparse raw file of the same size, copied whole by the mirror). Each backing file is copied next to the new
  leaf under its own file name (`<dir of destinationPath>/<name>`), nearest first, until a backing file
  whose copy would be itself (it lies in that directory already): it and the layers below it stay in place.
  Two disks over the same backing file share its copy.
- Refused: a destination outside the storage roots (PathNotAllowed), in a directory that does not exist
  (DirectoryNotFound), equal to the disk's current file (SamePath), or any planned file that exists and
  is not this migration's own from an earlier, interrupted run (FileExists: never overwritten), or planned
  twice (FileExists). Formats other than qcow2 and raw: UnsupportedFormat.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from libvirt_operator.agent.migrations.context import MigrationFailed
from libvirt_operator.agent.snapshots.plan import DiskState
from libvirt_operator.storage import Chain, Layer, StorageError
from libvirt_operator.storage.images import confine

COPY_PARENTS, PREPARE_LEAVES, COPYING, PIVOT, RECORD, CLEANUP, DONE = (
    "CopyParents", "PrepareLeaves", "Copying", "Pivot", "Record", "Cleanup", "Done")
STEPS = (COPY_PARENTS, PREPARE_LEAVES, COPYING, PIVOT, RECORD, CLEANUP, DONE)
FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class ParentCopy:
    """One backing file copied (sparse) to `dest`; `backing` (with its format): the layer below the copy in
    the new chain, written into the copy's header (None for a base)."""

    source: str
    dest: str
    format: str
    backing: str | None = None
    backing_format: str = ""


@dataclass(frozen=True)
class DiskPlan:
    name: str
    target: str
    old: Chain  # what the disk runs on now
    new: Chain  # the new leaf, then the copies, then the layers kept in place
    copies: tuple[ParentCopy, ...]  # this disk's copies, nearest first

    @property
    def leaf(self) -> str:
        return self.new.active.path

    @property
    def leaf_format(self) -> str:
        return self.new.active.format

    @property
    def parent(self) -> Layer | None:
        return self.new.backing[0] if self.new.backing else None

    @property
    def old_files(self) -> tuple[str, ...]:
        """The files of the old chain the new chain does not use (removed after success if unreferenced)."""
        return tuple(p for p in self.old.paths if p not in self.new)

    def status(self) -> dict:
        return {"name": self.name, "sourceFile": self.old.active.path, "destinationFile": self.leaf,
                "copiedFiles": [c.dest for c in self.copies]}


@dataclass(frozen=True)
class Plan:
    disks: tuple[DiskPlan, ...]

    @property
    def copies(self) -> tuple[ParentCopy, ...]:
        """Every copy once, bases first (a copy's backing copy exists before its header names it)."""
        seen: dict[str, ParentCopy] = {}
        for d in self.disks:
            for c in reversed(d.copies):
                seen.setdefault(c.dest, c)
        return tuple(seen.values())

    @property
    def made(self) -> tuple[str, ...]:
        """Every file this migration creates."""
        return tuple(dict.fromkeys([*(c.dest for c in self.copies), *(d.leaf for d in self.disks)]))

    def status_disks(self) -> list[dict]:
        return [d.status() for d in self.disks]


def ours_from_status(status: Mapping) -> frozenset[str]:
    """The files an earlier run of this migration planned (status.disks): found existing on re-entry, they
    are its own, not somebody else's."""
    out = set()
    for d in status.get("disks") or []:
        for path in [d.get("destinationFile"), *(d.get("copiedFiles") or [])]:
            if isinstance(path, str) and path.startswith("/"):
                out.add(os.path.normpath(path))
    return frozenset(out)


def plan_storage(moves: Sequence[Mapping], vm_spec: Mapping, live: Mapping[str, DiskState],
                 recorded: Mapping[str, Chain], roots: Iterable[str], *, ours: frozenset[str] = frozenset(),
                 exists: Callable[[str], bool] = os.path.lexists,
                 isdir: Callable[[str], bool] = os.path.isdir) -> Plan:
    """The plan for spec.disks `moves` (see the module doc); MigrationFailed(reason, message) when refused."""
    roots = tuple(roots)
    if not moves:
        raise MigrationFailed("DiskNotFound", "a Storage migration needs at least one disk")
    names = [m.get("name") for m in moves]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MigrationFailed("DuplicateDisk", f"disk {', '.join(twice)} listed more than once")
    spec_disks = {d.get("name"): d for d in vm_spec.get("disks") or []}
    planned: dict[str, str] = {}  # new path -> what it is (to refuse clashes), copies deduplicated by source
    disks = []
    for move in moves:
        name = move.get("name")
        state = live.get(name)
        if state is None:
            raise MigrationFailed("DiskNotFound", f"the VM has no file-backed disk {name!r} "
                                                  f"(its disks: {', '.join(sorted(live)) or 'none'})")
        if (spec_disks.get(name) or {}).get("readOnly"):
            raise MigrationFailed("DiskReadOnly", f"disk {name} is read-only: nothing to mirror")
        chain = state.chain
        record = recorded.get(name)
        if record is not None and record.active.path != chain.active.path:
            raise MigrationFailed("DiskDrifted", f"disk {name} runs on {chain.active.path}, not on its recorded "
                                                 f"file {record.active.path}")
        for layer in chain:
            if (layer.format or "qcow2") not in FORMATS:
                raise MigrationFailed("UnsupportedFormat", f"disk {name}: {layer.path} is {layer.format}")
        dest = _confined(move.get("destinationPath") or "", roots, name)
        if dest == chain.active.path:
            raise MigrationFailed("SamePath", f"disk {name} runs on {dest} already")
        if not isdir(os.path.dirname(dest)):
            raise MigrationFailed("DirectoryNotFound", f"disk {name}: directory {os.path.dirname(dest)} does "
                                                       f"not exist")
        _claim(planned, dest, f"the new file of disk {name}", name)
        _fresh(dest, ours, exists, name)
        copies, kept = _copies(chain, os.path.dirname(dest), roots, name)
        for c in copies:
            if planned.get(c.dest) != f"the copy of {c.source}":
                _claim(planned, c.dest, f"the copy of {c.source}", name)
                _fresh(c.dest, ours, exists, name)
        new_backing = [Layer(c.dest, c.format) for c in copies] + list(kept)
        leaf_format = chain.active.format or "qcow2"
        new = Chain((Layer(dest, leaf_format), *new_backing))
        disks.append(DiskPlan(name, state.target, chain, new, tuple(copies)))
    return Plan(tuple(disks))


def _confined(path: str, roots: tuple[str, ...], name: str) -> str:
    try:
        return confine(path, roots)
    except StorageError as err:
        raise MigrationFailed(err.reason, f"disk {name}: {err.message}") from None


def _claim(planned: dict[str, str], path: str, what: str, name: str) -> None:
    if path in planned:
        raise MigrationFailed("FileExists", f"disk {name}: {path} would be both {planned[path]} and {what}")
    planned[path] = what


def _fresh(path: str, ours: frozenset[str], exists: Callable[[str], bool], name: str) -> None:
    if exists(path) and path not in ours:
        raise MigrationFailed("FileExists", f"disk {name}: {path} exists; refusing to overwrite it")


def _copies(chain: Chain, directory: str, roots: tuple[str, ...],
            name: str) -> tuple[list[ParentCopy], tuple[Layer, ...]]:
    """The copies of the chain's backing files into `directory` (nearest first) and the layers kept in place."""
    backing = chain.backing
    targets = []
    for i, layer in enumerate(backing):
        dest = os.path.normpath(os.path.join(directory, os.path.basename(layer.path)))
        if dest == layer.path:  # in place already: it and everything below stay
            return _link(targets, backing[i]), backing[i:]
        targets.append((layer, _confined(dest, roots, name)))
    return _link(targets, None), ()


def _link(targets: list[tuple[Layer, str]], below_kept: Layer | None) -> list[ParentCopy]:
    out = []
    for i, (layer, dest) in enumerate(targets):
        if i + 1 < len(targets):
            below: Layer | None = Layer(targets[i + 1][1], targets[i + 1][0].format)
        else:
            below = below_kept
        out.append(ParentCopy(layer.path, dest, layer.format or "qcow2",
                              below.path if below else None, (below.format or "qcow2") if below else ""))
    return out


# -- facts of a running move ----------------------------------------------------------------------------------

PIVOTED, WAIT, START, BUSY = "Pivoted", "Wait", "Start", "Busy"


def mirrors(domain_xml: str) -> dict[str, tuple[str | None, bool]]:
    """{target: (mirror destination file, ready)} of the disks with a <mirror> (a block copy) in a live XML."""
    out = {}
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        target, mirror = disk.find("target"), disk.find("mirror")
        if target is None or mirror is None:
            continue
        source = mirror.find("source")
        path = source.get("file") if source is not None else mirror.get("file")
        out[target.get("dev", "")] = (os.path.normpath(path) if path else None, mirror.get("ready") == "yes")
    return out


def disk_action(leaf: str, active: str, job_type: str | None, mirror: str | None) -> str:
    """What a (re-entered) Copying or Pivot step does with one disk: PIVOTED (it runs on its new leaf), WAIT
    (our copy job runs: wait for READY), START (no job: (re)make the leaf and start the copy), BUSY (some other
    block job runs on the disk)."""
    if active == leaf:
        return PIVOTED
    if job_type is None:
        return START
    if job_type == "copy" and mirror == leaf:
        return WAIT
    return BUSY


def removal_order(old: Sequence[str], keep: Iterable[str]) -> list[str]:
    """The old files to remove, base first (so that the files still there always form the top of the old
    chain, which a re-entered cleanup finds again from the old leaf's header), without those in `keep`
    (files the new chains use)."""
    keep = {os.path.normpath(p) for p in keep}
    return [p for p in reversed([os.path.normpath(p) for p in old]) if p not in keep]


def walk_old_chain(leaf: str, backing_of: Callable[[str], str | None], stop: Iterable[str]) -> list[str]:
    """The old chain's files that are still there, top first: from `leaf` down through each header's backing
    file, ending at a file that is gone (`backing_of` returns None for a missing file too) or in `stop`."""
    stop = {os.path.normpath(p) for p in stop}
    out: list[str] = []
    current: str | None = os.path.normpath(leaf)
    while current is not None and current not in stop and current not in out:
        out.append(current)
        current = backing_of(current)
    return out


def copy_progress(jobs: Sequence[tuple[int, int]], pending_bytes: int = 0) -> dict:
    """status.progress while the top layers are mirrored: `jobs` the (cur, end) of each started copy job (a
    ready one has cur == end), `pending_bytes` an estimate for the disks not started yet."""
    processed = sum(cur for cur, _ in jobs)
    total = sum(end for _, end in jobs) + max(0, pending_bytes)
    percent = None if total <= 0 else max(0, min(100, int(100 * processed / total)))
    if total <= 0 and jobs:
        percent = 100 if all(cur >= end for cur, end in jobs) else 0
    out = {"percent": percent, "dataTotalBytes": total, "dataProcessedBytes": processed,
           "dataRemainingBytes": max(0, total - processed)}
    return {k: v for k, v in out.items() if v is not None}
