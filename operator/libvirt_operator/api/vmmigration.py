"""VMMigration: move a running VM to another node (Live, WholeMachine) or its disks to other files on
its node (Storage). Deleting a running VMMigration aborts it; the VM stays where it was.

Phases: Pending (validated by the controller, or queued behind the parallel limits) → PreChecking
(the target node's agent checks roots, networks, memory, CPU) → Running (the source agent's job) →
HandingOver (the domain runs on the target; the controller moves the VM's node label) → Succeeded.
Failed and Aborted leave the VM running on its source, unchanged."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from libvirt_operator.api.base import (
    CONDITIONS_LIST,
    ApiModel,
    Condition,
    DnsLabel,
    HostPath,
    cel,
    validations,
)

MigrationType = Literal["Live", "Storage", "WholeMachine"]
MigrationPhase = Literal["Pending", "PreChecking", "Running", "HandingOver", "Succeeded", "Failed", "Aborted"]
TERMINAL_PHASES = ("Succeeded", "Failed", "Aborted")


class DiskMove(ApiModel):
    name: DnsLabel = Field(description="Name of the VM disk.")
    destination_path: HostPath = Field(
        description="The disk's new active file (its leaf). Storage: on the same node, required. "
        "WholeMachine: on the target node; default: the same file name under the target's local storage root.")


class VMMigrationSpec(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.type != 'Storage' || size(self.disks) > 0", "a Storage migration needs disks",
            reason="FieldValueRequired", field_path=".disks"),
        cel("self.type != 'Storage' || !has(self.targetNode)", "a Storage migration stays on the VM's node",
            reason="FieldValueForbidden", field_path=".targetNode"),
        cel("self.type != 'Live' || size(self.disks) == 0",
            "a Live migration keeps the disks where they are (shared storage); use WholeMachine to move them",
            reason="FieldValueForbidden", field_path=".disks"),
        cel("self == oldSelf", "a VMMigration is immutable; delete it to abort and create a new one"),
    )}

    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    type: MigrationType = Field(
        "Live", description="Live: to another node, disks on shared storage; Storage: the disks to other files on the "
        "same node (blockcopy); WholeMachine: to another node with its local disks copied.")
    target_node: str | None = Field(None, min_length=1, max_length=253,
                                    description="Destination node; chosen by the controller when empty.")
    disks: list[DiskMove] = Field(default_factory=list, max_length=32,
                                  json_schema_extra={"default": [], "x-kubernetes-list-type": "map",
                                                     "x-kubernetes-list-map-keys": ["name"]})
    auto_converge: bool = Field(True, description="Throttle vCPUs so that a busy guest converges (AUTO_CONVERGE).")
    allow_post_copy: bool = Field(False, description="Switch to post-copy when pre-copy makes no progress "
                                  "(or at the completion timeout). A post-copy migration cannot be aborted.")
    bandwidth_mib_per_second: int | None = Field(None, ge=1, le=1_000_000,
                                                 description="Bandwidth limit; unlimited when empty.")
    max_downtime_milliseconds: int | None = Field(None, ge=1, le=600_000,
                                                  description="Longest pause at the switch-over (libvirt: 300).")
    completion_timeout_per_gi_b: int = Field(
        150, ge=1, le=86_400, alias="completionTimeoutPerGiB",
        description="Abort (or switch to post-copy) after this many seconds per GiB of memory and copied disk.")
    progress_timeout_seconds: int = Field(150, ge=1, le=86_400,
                                          description="Abort when the data remaining has not shrunk for this long.")


class MigrationProgress(ApiModel):
    percent: int | None = Field(None, ge=0, le=100)
    data_total_bytes: int | None = None
    data_processed_bytes: int | None = None
    data_remaining_bytes: int | None = None
    memory_dirty_rate_bytes_per_second: int | None = None
    memory_bytes_per_second: int | None = None
    iteration: int | None = None
    auto_converge_throttle: int | None = Field(None, description="vCPU throttle in percent.")
    downtime_milliseconds: int | None = Field(None, description="The switch-over pause (when it is known).")
    elapsed_milliseconds: int | None = None
    postcopy: bool | None = None
    update_time: str | None = None


class MigrationTarget(ApiModel):
    """What the target agent's pre-check found: where the source migrates to."""

    node: str
    migration_uri: str = Field(description="libvirt URI the source's libvirtd connects to (peer to peer).")
    address: str | None = Field(None, description="Address for the migration data stream (and NBD).")
    storage_root: str | None = Field(None, description="WholeMachine: the local root the disks are copied into.")


class DiskMoved(ApiModel):
    name: str
    source_file: str | None = None
    destination_file: str | None = None
    copied_files: list[str] = Field(default_factory=list, description="Parents copied before the leaf.")


class VMMigrationStatus(ApiModel):
    phase: MigrationPhase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    vm_uid: str | None = None
    source_node: str | None = None
    target_node: str | None = None
    target: MigrationTarget | None = None
    step: str | None = Field(None, description="The job's step reached (recorded before it runs).")
    progress: MigrationProgress | None = None
    disks: list[DiskMoved] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    start_time: str | None = None
    completion_time: str | None = None
    duration_milliseconds: int | None = None


class VMMigration(ApiModel):
    spec: VMMigrationSpec
    status: VMMigrationStatus | None = None
