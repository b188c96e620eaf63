"""VMQosPolicy: network, CPU, memory and disk I/O settings applied live to the VMs it selects.

A policy selects VirtualMachines of its own namespace by label. For each setting, a VM's own
`spec.qos` wins over every policy; among policies the higher `priority` wins, and between equal
priorities the policy whose name sorts first wins (a conflict is then reported in both the VM's
`status.qos.conflicts` and the policies' status). Settings are merged one by one: a policy that sets
only `cpu.shares` leaves `cpu.limitPercent` to others. Meaning and units: see api/qos.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from libvirt_operator.api.base import CONDITIONS_LIST, ApiModel, Condition, DnsLabel, cel, validations
from libvirt_operator.api.qos import CpuQos, DiskIoTune, MemoryQos, NicSettings, Rate


class LabelSelectorRequirement(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.operator in ['Exists', 'DoesNotExist'] ? (!has(self.values) || self.values.size() == 0) "
            ": (has(self.values) && self.values.size() > 0)",
            "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
            field_path=".values"),
    )}

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(ApiModel):
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


class PortGroup(ApiModel):
    """Q2: one ceiling shared by every selected NIC on the same node (per direction)."""

    model_config = {"json_schema_extra": validations(
        cel("has(self.inbound) || has(self.outbound)", "a portGroup needs an inbound or outbound ceiling"),
    )}

    inbound: Rate | None = None
    outbound: Rate | None = None


class PolicyNetwork(NicSettings):
    interfaces: list[DnsLabel] | None = Field(
        None, max_length=16, description="The VMs' interfaces this applies to (by name); empty: all of them.")
    port_group: PortGroup | None = Field(None, description="Q2: the selected NICs share this ceiling per node; "
                                         "the group is named after the policy.")


class PolicyDiskIo(DiskIoTune):
    disks: list[DnsLabel] | None = Field(
        None, max_length=32, description="The VMs' disks this applies to (by name); empty: every non-cdrom disk.")


class VMQosPolicySpec(ApiModel):
    selector: LabelSelector = Field(description="VMs in this namespace that the policy applies to; "
                                    "an empty selector selects every VM of the namespace.")
    priority: int = Field(0, ge=0, le=1000, description="Where policies overlap, the higher priority wins; "
                          "between equal priorities, the name that sorts first.")
    network: PolicyNetwork | None = None
    cpu: CpuQos | None = None
    memory: MemoryQos | None = None
    disk_io: PolicyDiskIo | None = None


class PolicyConflict(ApiModel):
    vm: str
    field: str
    winner: str
    message: str


class VMQosPolicyStatus(ApiModel):
    phase: Literal["Active", "Idle", "Degraded"] | None = Field(
        None, description="Active: it selects VMs; Idle: its selector matches nothing; Degraded: it loses "
        "a tie against a policy of equal priority somewhere.")
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    matched_vms: int | None = None
    conflicts: list[PolicyConflict] = Field(default_factory=list, max_length=100)


class VMQosPolicy(ApiModel):
    spec: VMQosPolicySpec
    status: VMQosPolicyStatus | None = None
