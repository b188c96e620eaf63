"""VMQosPolicy: network, CPU and memory limits applied live to the VMs it selects."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from libvirt_operator.api.base import CONDITIONS_LIST, ApiModel, Condition, Quantity, cel, validations


class LabelSelectorRequirement(ApiModel):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(ApiModel):
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


class Rate(ApiModel):
    """libvirt <bandwidth> units: KiB/s for rates, KiB for burst."""

    average_kib_per_second: int = Field(ge=1, le=2**32 - 1)
    peak_kib_per_second: int | None = Field(None, ge=1, le=2**32 - 1)
    burst_kib: int | None = Field(None, ge=1, le=2**32 - 1)
    floor_kib_per_second: int | None = Field(None, ge=1, le=2**32 - 1,
                                             description="Guaranteed minimum (inbound, libvirt networks only).")


class NetworkQos(ApiModel):
    inbound: Rate | None = None
    outbound: Rate | None = None
    priority: int | None = Field(None, ge=0, le=7)
    vlan: int | None = Field(None, ge=1, le=4094)


class CpuQos(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.limitPercent) || !has(self.reservationPercent) || "
            "self.reservationPercent <= self.limitPercent",
            "cpu.reservationPercent cannot exceed cpu.limitPercent"),
    )}

    shares: int | None = Field(None, ge=2, le=262144, description="Relative CPU priority (cgroup shares).")
    limit_percent: int | None = Field(None, ge=1, le=25600, description="Ceiling, in percent of one host CPU.")
    reservation_percent: int | None = Field(None, ge=1, le=25600)


class MemoryQos(ApiModel):
    hard_limit: Quantity | None = None
    soft_limit: Quantity | None = None
    min_guarantee: Quantity | None = None


class VMQosPolicySpec(ApiModel):
    selector: LabelSelector = Field(description="VMs in this namespace that the policy applies to.")
    priority: int = Field(0, ge=0, le=1000, description="Where policies overlap, the higher priority wins.")
    network: NetworkQos | None = None
    cpu: CpuQos | None = None
    memory: MemoryQos | None = None


class VMQosPolicyStatus(ApiModel):
    phase: Literal["Active", "Degraded"] | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    matched_vms: int | None = None


class VMQosPolicy(ApiModel):
    spec: VMQosPolicySpec
    status: VMQosPolicyStatus | None = None
