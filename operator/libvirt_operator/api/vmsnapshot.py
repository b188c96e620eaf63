"""VMSnapshot: a point-in-time copy of a VM's disks, optionally with its memory.

Two methods, after the handbook:
- External (qcow2): each snapshotted disk gets a new leaf the VM keeps running on (`overlayPath`);
  the file it ran on until then becomes read-only and is the snapshot (`status.disks[].snapshotFile`).
  With `memory`, the guest's RAM goes to `memoryPath` while the VM runs (S3). Without it, only
  data disks may be snapshotted (S5): a disk-only snapshot of the system disk is refused, unless
  `forClone` (the handbook's online clone, S7, whose clones boot from a crash-consistent copy).
- Copy (raw disks, S1): the memory is saved (the VM stops), each disk is copied to `copyPath`, and
  the VM is restored from the save image unless `stopAfter`. The copies are the snapshot.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from libvirt_operator.api.base import (
    CONDITIONS_LIST,
    NAMED_LIST,
    ApiModel,
    Condition,
    DnsLabel,
    HostPath,
    cel,
    validations,
)

Method = Literal["External", "Copy"]
SnapshotPhase = Literal["Pending", "InProgress", "Ready", "Failed", "Deleting"]


class SnapshotDisk(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.snapshot == 'no' || has(self.overlayPath) || !has(self.reuseExisting) || !self.reuseExisting",
            "reuseExisting needs overlayPath", field_path=".reuseExisting"),
    )}

    name: DnsLabel = Field(description="Name of the VM disk.")
    snapshot: Literal["external", "no"] = Field("external", description="no leaves the disk out.")
    overlay_path: HostPath | None = Field(
        None, description="External: the new leaf the VM keeps running on (the handbook's running file); "
        "generated next to the disk's active file when empty.")
    copy_path: HostPath | None = Field(
        None, description="Copy: where the disk's copy goes; generated next to the disk when empty.")
    reuse_existing: bool = Field(False, description="External: use a pre-created qcow2 overlay, whose backing "
                                 "file must be the disk's active file.")


class VMSnapshotSpec(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self == oldSelf", "a VMSnapshot's spec cannot change; delete it and create another",
            reason="FieldValueForbidden"),
        cel("self.method != 'Copy' || self.memory", "method Copy needs memory: true (the handbook's raw "
            "snapshot saves the memory, then copies the disks)", field_path=".memory"),
        cel("!self.forClone || (self.method == 'External' && !self.memory)",
            "forClone is a disk-only External snapshot", field_path=".forClone"),
        cel("!self.stopAfter || self.method == 'Copy'", "stopAfter applies to method Copy",
            field_path=".stopAfter"),
    )}

    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    method: Method = Field("External", description="External (qcow2 overlays, the VM keeps running) or "
                           "Copy (save the memory, copy the disks: for raw disks).")
    memory: bool = Field(False, description="Also save the guest memory.")
    memory_path: HostPath | None = Field(None, description="Where the memory goes; generated when empty.")
    disks: list[SnapshotDisk] = Field(default_factory=list, max_length=32, json_schema_extra=NAMED_LIST,
                                      description="Per-disk settings; a disk not listed takes the defaults "
                                      "(external, generated paths). cdroms and read-only disks are never "
                                      "snapshotted.")
    for_clone: bool = Field(False, description="A disk-only snapshot of every disk, system disk included, "
                            "for VirtualMachines created with spec.cloneFrom.")
    stop_after: bool = Field(False, description="Copy: leave the VM stopped (saved) after the copy.")


class SnapshotDiskStatus(ApiModel):
    name: str
    target: str | None = None
    snapshot_file: str = Field(description="The snapshot's read-only file: the backing node (External) or "
                               "the copy (Copy).")
    snapshot_format: str = "qcow2"
    active_file: str | None = Field(None, description="External: the leaf the VM ran on after the snapshot.")
    created: bool = Field(False, description="The operator created active_file (and removes it on failure).")


class SnapshotJob(ApiModel):
    step: str = Field(description="The step reached; recorded before the step runs.")
    started_at: str
    message: str = ""


class VMSnapshotStatus(ApiModel):
    phase: SnapshotPhase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    node_name: str | None = None
    vm_uid: str | None = Field(None, description="The VM's uid: a snapshot belongs to that VM object only.")
    creation_time: str | None = Field(None, description="When the snapshot point was taken.")
    memory_file: str | None = None
    disks: list[SnapshotDiskStatus] = Field(default_factory=list, json_schema_extra=NAMED_LIST)
    job: SnapshotJob | None = None
    downtime_ms: int | None = Field(None, description="How long the guest was paused or stopped.")
    duration_ms: int | None = Field(None, description="From the job's start to Ready.")
    kept_files: dict[str, str] = Field(default_factory=dict, description="Deleting: files kept, and why.")


class VMSnapshot(ApiModel):
    spec: VMSnapshotSpec
    status: VMSnapshotStatus | None = None
