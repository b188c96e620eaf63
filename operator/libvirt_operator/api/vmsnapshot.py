"""VMSnapshot: a point-in-time copy of a VM's disks, optionally with its memory."""

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


class SnapshotDisk(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.snapshot == 'no' || has(self.overlayPath) || !has(self.reuseExisting) || !self.reuseExisting",
            "reuseExisting needs overlayPath", field_path=".reuseExisting"),
    )}

    name: DnsLabel = Field(description="Name of the VM disk.")
    snapshot: Literal["external", "no"] = "external"
    overlay_path: HostPath | None = Field(
        None, description="The new leaf the VM keeps running on; generated next to the disk when empty."
    )
    reuse_existing: bool = Field(False, description="Use a pre-created overlay instead of creating one.")


class VMSnapshotSpec(ApiModel):
    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    memory: bool = Field(False, description="Also save the guest memory (the VM keeps running).")
    memory_path: HostPath | None = Field(None, description="Where to save memory; generated when empty.")
    disks: list[SnapshotDisk] = Field(default_factory=list, max_length=32, json_schema_extra=NAMED_LIST)


class VMSnapshotStatus(ApiModel):
    phase: Literal["Pending", "InProgress", "Ready", "Failed"] | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    node_name: str | None = None
    creation_time: str | None = None


class VMSnapshot(ApiModel):
    spec: VMSnapshotSpec
    status: VMSnapshotStatus | None = None
