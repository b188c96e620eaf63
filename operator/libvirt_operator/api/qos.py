"""QoS settings (FEATURES.md Q1-Q12 and per-disk I/O): the blocks shared by a VM's `spec.qos` and VMQosPolicy.

Every value is applied live (no restart). Item, field (unit): mechanism.

- Q1 network[].inbound/outbound average, peak (KiB/s), burst (KiB): libvirt `<bandwidth>` where the node has
  sfq and police; else tc: HTB on the tap (to the guest), ingress -> mirred -> IFB -> HTB (from the guest).
- Q2 policy network.portGroup ceiling (KiB/s): one HTB tree on a shared IFB per direction, members are leaves.
- Q3 network[].queues (DSCP list, percent): leaf HTB classes under the NIC's class, u32 match on the DSCP.
- Q4 network[].priority (0-7, higher first): HTB `prio` of the NIC's class inside its port group.
- Q5 network[].vlan (802.1Q id): `<vlan><tag>` on OVS, SR-IOV VFs, macvtap passthrough; elsewhere the agent
  reports HostUnsupported and keeps the tag for a node that can (never dropped).
- Q6 memory.hardLimit (quantity): `hard_limit` (v1 memory.limit_in_bytes, v2 memory.max).
- Q7 memory.guarantee (quantity): a floor: the soft limit is never set below it, the balloon is never
  inflated below it, and placement counts it (it cannot exceed memory.size, which placement reserves).
- Q8 memory.softLimit (quantity): `soft_limit` (v1 memory.soft_limit_in_bytes: reclaimed first above it
  under host pressure; v2 memory.high: throttled above it).
- Q9 cpu.shares (weight): `cpu_shares` (v1 cpu.shares [2, 262144]; v2 cpu.weight [1, 10000]).
- Q10 cpu.limitPercent (% of one host CPU, whole VM): `global_period` 100000 us, `global_quota` percent x 1000.
- Q11 cpu.minPercent (% of one host CPU): a floor under contention: the node raises the VM's shares so that
  its proportional part of the node's CPUs is at least this (hypervisor/tuning.py: floor_shares).
- Q12 cpu.reservationPercent (% of one host CPU): Q11's floor, and placement sets it aside: the sum of
  reservations on a node never exceeds its CPUs x 100.
- disk disks[] bytes/s and IOPS, total or read/write: `setBlockIoTune` on the disk's target.

Q3, priority queues: a NIC's traffic (per direction) is split into up to four queues by the DSCP of its IP
packets; queue i is served with HTB prio i (queue 0 first) and guaranteed `ratePercent` of the NIC's
average; whatever is left goes to an implicit last queue for unmatched traffic. Spare bandwidth up to the
NIC's peak goes to the lowest-numbered queue that wants it.

Q4, network priority: where NICs share one ceiling (a port group), spare bandwidth goes first to the NIC
with the higher priority (7 first); each member keeps its own average as its guaranteed part.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from libvirt_operator.api.base import NAMED_LIST, ApiModel, DnsLabel, Quantity, cel, validations

MAX_RATE = 2**32 - 1
MAX_PERCENT = 25600  # 256 host CPUs


class Rate(ApiModel):
    """One direction of a NIC: libvirt's <bandwidth> units (KiB/s for rates, KiB for burst)."""

    model_config = {"json_schema_extra": validations(
        cel("!has(self.peakKibPerSecond) || self.peakKibPerSecond >= self.averageKibPerSecond",
            "peakKibPerSecond cannot be below averageKibPerSecond", field_path=".peakKibPerSecond"),
    )}

    average_kib_per_second: int = Field(ge=1, le=MAX_RATE, description="Sustained rate, KiB/s.")
    peak_kib_per_second: int | None = Field(None, ge=1, le=MAX_RATE,
                                            description="Rate while the burst lasts, KiB/s (default: average).")
    burst_kib: int | None = Field(None, ge=1, le=MAX_RATE, description="KiB that may pass at peak rate.")


class PriorityQueue(ApiModel):
    """Q3: one queue of a NIC, selected by DSCP; earlier queues are served first."""

    dscp: list[Annotated[int, Field(ge=0, le=63)]] = Field(min_length=1, max_length=64,
                                                          description="IP DSCP values (0-63) of this queue.")
    rate_percent: int = Field(ge=1, le=100, description="Guaranteed part of the NIC's average rate, percent.")


class NicSettings(ApiModel):
    """Q1, Q3, Q4, Q5 for one NIC (both directions are seen from the guest)."""

    model_config = {"json_schema_extra": validations(
        cel("!has(self.queues) || self.queues.map(q, q.ratePercent).sum() <= 100",
            "queues: the ratePercent values add up to more than 100", field_path=".queues"),
    )}

    inbound: Rate | None = Field(None, description="Traffic to the guest.")
    outbound: Rate | None = Field(None, description="Traffic from the guest.")
    queues: list[PriorityQueue] | None = Field(None, max_length=4, description="Q3 priority queues.")
    priority: int | None = Field(None, ge=0, le=7, description="Q4: higher gets a shared ceiling's spare first.")
    vlan: int | None = Field(None, ge=1, le=4094, description="Q5: 802.1Q tag (only where the host can tag).")


class InterfaceQos(NicSettings):
    name: DnsLabel = Field(description="The interface (spec.interfaces[].name).")


class CpuQos(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.limitPercent) || !has(self.reservationPercent) || "
            "self.reservationPercent <= self.limitPercent",
            "cpu.reservationPercent cannot exceed cpu.limitPercent", field_path=".reservationPercent"),
        cel("!has(self.limitPercent) || !has(self.minPercent) || self.minPercent <= self.limitPercent",
            "cpu.minPercent cannot exceed cpu.limitPercent", field_path=".minPercent"),
    )}

    shares: int | None = Field(None, ge=1, le=262144, description="Q9: relative weight (cgroup v1 [2, 262144], "
                               "v2 [1, 10000]; the node reports values outside its range).")
    limit_percent: int | None = Field(None, ge=1, le=MAX_PERCENT,
                                      description="Q10: ceiling for the whole VM, percent of one host CPU.")
    min_percent: int | None = Field(None, ge=1, le=MAX_PERCENT,
                                    description="Q11: floor under contention, percent of one host CPU.")
    reservation_percent: int | None = Field(None, ge=1, le=MAX_PERCENT,
                                            description="Q12: a floor that placement also sets aside on the node.")


class MemoryQos(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.hardLimit) || !has(self.guarantee) || "
            "quantity(self.guarantee).compareTo(quantity(self.hardLimit)) <= 0",
            "memory.guarantee cannot exceed memory.hardLimit", field_path=".guarantee"),
        cel("!has(self.hardLimit) || !has(self.softLimit) || "
            "quantity(self.softLimit).compareTo(quantity(self.hardLimit)) <= 0",
            "memory.softLimit cannot exceed memory.hardLimit", field_path=".softLimit"),
    )}

    hard_limit: Quantity | None = Field(None, description="Q6: the VM's memory cgroup never exceeds this.")
    soft_limit: Quantity | None = Field(None, description="Q8: above this the VM is reclaimed first.")
    guarantee: Quantity | None = Field(None, description="Q7: never reclaimed or ballooned below this.")


class DiskIoTune(ApiModel):
    """Per-disk limits (setBlockIoTune); a total excludes its read/write pair."""

    model_config = {"json_schema_extra": validations(
        cel("!has(self.totalBytesPerSecond) || (!has(self.readBytesPerSecond) && !has(self.writeBytesPerSecond))",
            "totalBytesPerSecond excludes readBytesPerSecond and writeBytesPerSecond"),
        cel("!has(self.totalIops) || (!has(self.readIops) && !has(self.writeIops))",
            "totalIops excludes readIops and writeIops"),
    )}

    total_bytes_per_second: int | None = Field(None, ge=1, le=2**53)
    read_bytes_per_second: int | None = Field(None, ge=1, le=2**53)
    write_bytes_per_second: int | None = Field(None, ge=1, le=2**53)
    total_iops: int | None = Field(None, ge=1, le=2**53)
    read_iops: int | None = Field(None, ge=1, le=2**53)
    write_iops: int | None = Field(None, ge=1, le=2**53)


class DiskQos(DiskIoTune):
    name: DnsLabel = Field(description="The disk (spec.disks[].name).")


class QosSpec(ApiModel):
    """A VM's own QoS (`spec.qos`): every value here overrides the policies."""

    network: list[InterfaceQos] = Field(default_factory=list, max_length=16, json_schema_extra=NAMED_LIST)
    cpu: CpuQos | None = None
    memory: MemoryQos | None = None
    disks: list[DiskQos] = Field(default_factory=list, max_length=32, json_schema_extra=NAMED_LIST)


# -- status.qos: each effective value with its source -------------------------------------------
# source: "spec" (the VM's own) or "policy/<name>" (a VMQosPolicy in the VM's namespace).

class SourcedInt(ApiModel):
    value: int
    source: str


class SourcedQuantity(ApiModel):
    value: str
    source: str


class SourcedRate(ApiModel):
    value: Rate
    source: str


class SourcedQueues(ApiModel):
    value: list[PriorityQueue]
    source: str


class PortGroupRef(ApiModel):
    """A shared ceiling (Q2): its members on one node share one HTB tree per direction."""

    name: str = Field(description="<namespace>/<policy name>: the policy that defines it.")
    inbound: Rate | None = None
    outbound: Rate | None = None


class SourcedPortGroup(ApiModel):
    value: PortGroupRef
    source: str


class SourcedIoTune(ApiModel):
    value: DiskIoTune
    source: str


class EffectiveNic(ApiModel):
    name: str
    inbound: SourcedRate | None = None
    outbound: SourcedRate | None = None
    queues: SourcedQueues | None = None
    priority: SourcedInt | None = None
    vlan: SourcedInt | None = None
    port_group: SourcedPortGroup | None = None


class EffectiveCpu(ApiModel):
    shares: SourcedInt | None = None
    limit_percent: SourcedInt | None = None
    min_percent: SourcedInt | None = None
    reservation_percent: SourcedInt | None = None


class EffectiveMemory(ApiModel):
    hard_limit: SourcedQuantity | None = None
    soft_limit: SourcedQuantity | None = None
    guarantee: SourcedQuantity | None = None


class EffectiveDisk(ApiModel):
    name: str
    io_tune: SourcedIoTune | None = None


class QosConflict(ApiModel):
    field: str = Field(description="e.g. cpu.shares or network[nic0].inbound")
    winner: str
    losers: list[str]
    message: str


class QosStatus(ApiModel):
    """`status.qos`, written by the controller: what the agent must apply, and why."""

    valid: bool = Field(description="False: the values contradict each other; the agent keeps what it applied.")
    reason: str | None = None
    message: str | None = None
    policies: list[str] = Field(default_factory=list, description="Matching policies, strongest first.")
    cpu: EffectiveCpu | None = None
    memory: EffectiveMemory | None = None
    network: list[EffectiveNic] = Field(default_factory=list)
    disks: list[EffectiveDisk] = Field(default_factory=list)
    conflicts: list[QosConflict] = Field(default_factory=list)
    observed_generation: int | None = Field(None, description="The VM's generation these values were resolved at.")


class NicEffective(ApiModel):
    """Plain effective values of one NIC, for the agent."""

    name: str
    inbound: Rate | None = None
    outbound: Rate | None = None
    queues: list[PriorityQueue] | None = None
    priority: int | None = None
    vlan: int | None = None
    port_group: PortGroupRef | None = None


class EffectiveQos(ApiModel):
    """status.qos without the sources: what the agent applies."""

    cpu: CpuQos = Field(default_factory=CpuQos)
    memory: MemoryQos = Field(default_factory=MemoryQos)
    network: list[NicEffective] = Field(default_factory=list)
    disks: list[DiskQos] = Field(default_factory=list)


def effective(status_qos: dict | QosStatus | None) -> EffectiveQos | None:
    """The plain values of a VM's status.qos; None when there is none or it is not valid."""
    if status_qos is None:
        return None
    st = status_qos if isinstance(status_qos, QosStatus) else QosStatus.model_validate(status_qos)
    if not st.valid:
        return None

    def plain(block, model):
        if block is None:
            return model()
        return model(**{k: getattr(block, k).value for k in type(block).model_fields if getattr(block, k)})

    nics = []
    for nic in st.network:
        values = {k: getattr(nic, k).value for k in ("inbound", "outbound", "queues", "priority", "vlan", "port_group")
                  if getattr(nic, k) is not None}
        nics.append(NicEffective(name=nic.name, **values))
    disks = [DiskQos(name=d.name, **d.io_tune.value.model_dump(exclude_none=True)) for d in st.disks if d.io_tune]
    return EffectiveQos(cpu=plain(st.cpu, CpuQos), memory=plain(st.memory, MemoryQos), network=nics, disks=disks)
