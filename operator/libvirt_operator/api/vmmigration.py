"""VMMigration: move a VM to another node (live) or its disks to other files (storage)."""

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


class DiskMove(ApiModel):
    name: DnsLabel = Field(description="Name of the VM disk.")
    destination_path: HostPath


class VMMigrationSpec(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.type != 'Storage' || size(self.disks) > 0", "a Storage migration needs disks",
            reason="FieldValueRequired", field_path=".disks"),
        cel("self == oldSelf", "a VMMigration is immutable; delete it to abort and create a new one"),
    )}

    vm_name: DnsLabel = Field(description="VirtualMachine in the same namespace.")
    type: Literal["Live", "Storage", "WholeMachine"] = Field(
        "Live", description="Live: shared storage; Storage: disks on the same node; WholeMachine: with local disks."
    )
    target_node: str | None = Field(None, min_length=1, max_length=253,
                                    description="Destination node; chosen by the controller when empty.")
    disks: list[DiskMove] = Field(default_factory=list, max_length=32,
                                  json_schema_extra={"default": [], "x-kubernetes-list-type": "map",
                                                     "x-kubernetes-list-map-keys": ["name"]})
    auto_converge: bool = Field(True, description="Throttle vCPUs so that a busy guest converges.")
    bandwidth_mib_per_second: int | None = Field(None, ge=1, le=1_000_000)
    max_downtime_milliseconds: int | None = Field(None, ge=1, le=600_000)
    timeout_seconds: int = Field(600, ge=1, le=86_400, description="Abort the migration after this long.")


class MigrationProgress(ApiModel):
    data_total_bytes: int | None = None
    data_processed_bytes: int | None = None
    percent: int | None = Field(None, ge=0, le=100)


class VMMigrationStatus(ApiModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Aborted"] | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    source_node: str | None = None
    target_node: str | None = None
    progress: MigrationProgress | None = None
    start_time: str | None = None
    completion_time: str | None = None


class VMMigration(ApiModel):
    spec: VMMigrationSpec
    status: VMMigrationStatus | None = None
