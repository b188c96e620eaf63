"""VirtualMachine: a libvirt domain declared as a Kubernetes object."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from libvirt_operator.api.base import (
    CONDITIONS_LIST,
    NAMED_LIST,
    NESTED_DEFAULT,
    ApiModel,
    Condition,
    DnsLabel,
    HostPath,
    Quantity,
    RequestId,
    cel,
    validations,
)
from libvirt_operator.api.qos import QosSpec, QosStatus

PowerState = Literal["Running", "Stopped", "Paused"]
# A host CPU list as virsh writes it: "0-3,6".
CpuSet = Annotated[str, Field(pattern=r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$", max_length=256)]
PciAddress = Annotated[str, Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$",
                                  description="Host PCI address, domain:bus:slot.function, e.g. 0000:03:00.1.")]
UsbId = Annotated[str, Field(pattern=r"^0x[0-9a-f]{4}$", description="USB vendor or product id, e.g. 0x0781.")]
Phase = Literal[
    "Pending", "Scheduled", "Starting", "Running", "Paused", "Stopping", "Stopped", "Failed", "Terminating"
]


class VcpuPin(ApiModel):
    vcpu: int = Field(ge=0, le=255, description="vCPU number (0-based).")
    cpuset: CpuSet = Field(description="Host CPUs this vCPU may run on, e.g. 0-1,3.")


class CpuPinning(ApiModel):
    vcpus: list[VcpuPin] = Field(default_factory=list, max_length=256, json_schema_extra={
        "default": [], "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["vcpu"]})
    emulator: CpuSet | None = Field(None, description="Host CPUs for QEMU's emulator threads.")


class CPU(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.maxVcpus) || self.maxVcpus >= self.vcpus",
            "maxVcpus must be at least vcpus", field_path=".maxVcpus"),
        cel("!has(self.pinning) || "
            "self.pinning.vcpus.all(p, p.vcpu < (has(self.maxVcpus) ? self.maxVcpus : self.vcpus))",
            "cpu.pinning.vcpus names a vCPU at or above maxVcpus", field_path=".pinning.vcpus"),
    )}

    vcpus: int = Field(1, ge=1, le=256, description="vCPUs online at boot.")
    max_vcpus: int | None = Field(
        None, ge=1, le=256, description="Ceiling for vCPU hot-add; defaults to vcpus (no hot-add)."
    )
    pinning: CpuPinning | None = Field(None, description="vCPU and emulator pinning to host CPUs (live).")


class Memory(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.maxSize) || quantity(self.maxSize).compareTo(quantity(self.size)) >= 0",
            "memory.maxSize must be at least memory.size", field_path=".maxSize"),
        cel("quantity(self.size).compareTo(quantity('16Mi')) >= 0",
            "memory.size must be at least 16Mi", field_path=".size"),
    )}

    size: Quantity = Field(description="Guest memory at boot, e.g. 512Mi.")
    max_size: Quantity | None = Field(
        None, description="Ceiling for memory hot-add; defaults to size (no hot-add)."
    )


class KernelBoot(ApiModel):
    kernel: HostPath = Field(description="Host path of the kernel image (under a storage root).")
    initrd: HostPath | None = Field(None, description="Host path of the initramfs (under a storage root).")
    cmdline: str | None = Field(None, max_length=4096, description="Kernel command line.")


class Boot(ApiModel):
    firmware: Literal["bios", "uefi"] = Field("bios", description="Firmware when not booting a kernel directly.")
    kernel: KernelBoot | None = Field(None, description="Direct kernel boot instead of firmware boot.")
    order: list[Literal["hd", "cdrom", "network"]] | None = Field(
        None, max_length=3, description="Firmware boot device order."
    )


_BUS = "(has(self.bus) ? self.bus : (self.device == 'cdrom' ? 'sata' : 'virtio'))"
_TARGET_PREFIX = f"({_BUS} == 'virtio' ? 'vd' : ({_BUS} == 'ide' ? 'hd' : 'sd'))"


class Disk(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.device == 'cdrom' || has(self.path)", "a disk of device 'disk' needs a path",
            reason="FieldValueRequired", field_path=".path"),
        cel("self.device != 'cdrom' || !has(self.bus) || self.bus in ['sata', 'scsi', 'ide', 'usb']",
            "a cdrom must be on bus sata, scsi, ide or usb", field_path=".bus"),
        cel("!has(self.target) || self.target.startsWith(" + _TARGET_PREFIX + ")",
            "target does not fit the bus: virtio disks are vd*, ide hd*, sata/scsi/usb sd*", field_path=".target"),
        cel("!has(self.size) || self.device == 'disk'", "only a disk of device 'disk' has a size",
            field_path=".size"),
        cel("!has(oldSelf.size) || (has(self.size) && quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0)",
            "disks[].size cannot shrink (QEMU would cut off data under the guest's filesystem); "
            "see the README for the safe way to shrink a disk", field_path=".size"),
    )}

    name: DnsLabel = Field(description="Unique name of the disk in this VM.")
    device: Literal["disk", "cdrom"] = "disk"
    path: HostPath | None = Field(None, description="Host path of the image (under a storage root). "
                                  "Empty for a cdrom means no media.")
    format: Literal["qcow2", "raw"] | None = Field(
        None, description="Image format; defaults to qcow2 for disks and raw for cdroms."
    )
    bus: Literal["virtio", "sata", "scsi", "ide", "usb"] | None = Field(
        None, description="Defaults to virtio for disks and sata for cdroms."
    )
    target: str | None = Field(None, pattern=r"^(vd|sd|hd)[a-z]{1,2}$", max_length=4,
                               description="Guest device name; assigned by bus order when empty.")
    read_only: bool = False
    size: Quantity | None = Field(
        None, description="Virtual size of the image; raising it grows the disk online. It never shrinks.")


class Interface(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.type in ['user', 'hostdev'] || has(self.source)",
            "interfaces of type network or bridge need a source", reason="FieldValueRequired",
            field_path=".source"),
        cel("(self.type == 'hostdev') == has(self.pciAddress)",
            "an interface of type hostdev (SR-IOV VF) needs pciAddress, and only it has one",
            field_path=".pciAddress"),
    )}

    name: DnsLabel = Field(description="Unique name of the interface in this VM.")
    type: Literal["network", "bridge", "user", "hostdev"] = Field(
        "network", description="libvirt network, host bridge, user-mode networking, or an SR-IOV VF (hostdev)."
    )
    source: str | None = Field(None, min_length=1, max_length=253,
                               description="Network name or bridge name.")
    mac: str | None = Field(None, pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", max_length=17,
                            description="Lower-case MAC; generated when empty.")
    model: Literal["virtio", "e1000", "e1000e", "rtl8139"] = "virtio"
    pci_address: PciAddress | None = Field(None, description="The VF's host PCI address (type hostdev).")


class HostDevice(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.type != 'pci' || (has(self.address) && !has(self.vendor) && !has(self.product))",
            "a pci host device needs address (and no vendor/product)", field_path=".address"),
        cel("self.type != 'usb' || (has(self.vendor) && has(self.product) && !has(self.address))",
            "a usb host device needs vendor and product (and no address)", field_path=".vendor"),
    )}

    name: DnsLabel = Field(description="Unique name of the host device in this VM.")
    type: Literal["pci", "usb"] = Field(description="PCI passthrough (VFIO) or host USB passthrough.")
    address: PciAddress | None = None
    vendor: UsbId | None = None
    product: UsbId | None = None


class Shutdown(ApiModel):
    mode: Literal["acpi", "agent", "force"] = Field(
        "acpi", description="How to stop the guest: ACPI power button, guest agent, or power-off."
    )
    timeout_seconds: int = Field(120, ge=1, le=3600, description="Wait this long for a graceful shutdown.")
    force_after_timeout: bool = Field(
        False, description="Power off after the timeout instead of reporting ShutdownTimeout."
    )


class RebootRequest(ApiModel):
    id: RequestId = Field(description="A new id asks for one more reboot.")
    mode: Literal["acpi", "agent"] = "acpi"


class ResetRequest(ApiModel):
    id: RequestId = Field(description="A new id asks for one more hard reset.")


class RestartRequest(ApiModel):
    id: RequestId = Field(description="A new id asks for one cold restart (shutdown per spec.shutdown, "
                          "then start), which applies the changes that need one.")


class RevertRequest(ApiModel):
    id: RequestId = Field(description="A new id asks for one revert to the snapshot.")
    snapshot: DnsLabel = Field(description="A Ready VMSnapshot of this VM. A running VM is stopped, reverted, "
                               "and brought back to powerState.")


class CloneSource(ApiModel):
    snapshot: DnsLabel = Field(description="A Ready VMSnapshot with forClone in this namespace; each disk of "
                               "this VM named like one of the snapshot's gets a new leaf at its path over the "
                               "snapshot's read-only file.")


class VirtualMachineSpec(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.shutdown.mode != 'agent' || self.guestAgent",
            "shutdown.mode 'agent' needs guestAgent: true", field_path=".shutdown.mode"),
        cel("!has(self.reboot) || self.reboot.mode != 'agent' || self.guestAgent",
            "reboot.mode 'agent' needs guestAgent: true", field_path=".reboot.mode"),
        cel("!has(oldSelf.nodeName) || (has(self.nodeName) && self.nodeName == oldSelf.nodeName)",
            "nodeName cannot be changed once set; migrate the VM instead", field_path=".nodeName"),
        cel("has(self.cloneFrom) == has(oldSelf.cloneFrom) && (!has(self.cloneFrom) || self.cloneFrom == "
            "oldSelf.cloneFrom)", "cloneFrom is set at creation only", field_path=".cloneFrom"),
        cel("has(self.boot.kernel) || self.disks.size() > 0",
            "a VM needs a disk or a kernel to boot from", reason="FieldValueRequired", field_path=".disks"),
        cel("self.disks.all(d, !has(d.target) || self.disks.exists_one(e, has(e.target) && e.target == d.target))",
            "two disks have the same target", field_path=".disks"),
        cel("self.interfaces.all(i, !has(i.mac) || self.interfaces.exists_one(j, has(j.mac) && j.mac == i.mac))",
            "two interfaces have the same MAC address", field_path=".interfaces"),
    )}

    node_name: str | None = Field(None, min_length=1, max_length=253,
                                  description="Run on this node; chosen by the controller when empty.")
    domain_type: Literal["auto", "kvm", "qemu"] = Field(
        "auto", description="kvm (hardware), qemu (software emulation), or auto (kvm when the node has it)."
    )
    power_state: PowerState = Field("Running", description="Desired power state.")
    restart_policy: Literal["Always", "OnFailure", "Never"] = Field(
        "OnFailure",
        description="When a Running VM stops without being asked to: Always restarts it; OnFailure "
        "restarts it unless the guest shut itself down; Never only reports it.",
    )
    cpu: CPU = Field(default_factory=CPU, json_schema_extra=NESTED_DEFAULT)
    memory: Memory
    boot: Boot = Field(default_factory=Boot, json_schema_extra=NESTED_DEFAULT)
    disks: list[Disk] = Field(default_factory=list, max_length=32, json_schema_extra=NAMED_LIST)
    interfaces: list[Interface] = Field(default_factory=list, max_length=16, json_schema_extra=NAMED_LIST)
    host_devices: list[HostDevice] = Field(default_factory=list, max_length=8, json_schema_extra=NAMED_LIST,
                                           description="PCI and USB devices of the host passed through.")
    guest_agent: bool = Field(True, description="Add the qemu-guest-agent channel.")
    shutdown: Shutdown = Field(default_factory=Shutdown, json_schema_extra=NESTED_DEFAULT)
    reboot: RebootRequest | None = Field(None, description="One-shot reboot request.")
    reset: ResetRequest | None = Field(None, description="One-shot hard reset request.")
    restart: RestartRequest | None = Field(None, description="One-shot cold restart request.")
    revert: RevertRequest | None = Field(None, description="One-shot revert to a VMSnapshot.")
    clone_from: CloneSource | None = Field(None, description="Create this VM's disks as leaves over a "
                                           "snapshot of another VM (online clone); set at creation only.")
    qos: QosSpec | None = Field(None, description="QoS of this VM; each value overrides the VMQosPolicies "
                                "that select it (see api/qos.py for units and mechanisms).")
    disk_deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="Delete removes, when the VM is deleted, the files of its disks' recorded "
        "chains (status.disks) that no VMSnapshot and no other VM references; read-only disks stay."
    )


class RequestOutcome(ApiModel):
    id: str
    result: Literal["InProgress", "Succeeded", "Failed"]
    message: str = ""
    time: str
    step: str | None = Field(None, description="A long request's step reached (recorded before it runs).")


class DomainRef(ApiModel):
    name: str
    uuid: str


class MigrationState(ApiModel):
    """The VM's side of a migration, written by the agent that owns the VM (the durable fact that the
    hand-over reads): Migrating (the source agent's job runs), Landed (the domain runs on the target
    node; the source never starts it again), then Succeeded (the target agent adopted it) or
    Failed/Aborted (the VM runs on the source, unchanged)."""

    name: str = Field(description="The VMMigration.")
    uid: str
    type: str
    state: Literal["Migrating", "Landed", "Succeeded", "Failed", "Aborted"]
    source_node: str
    target_node: str
    message: str = ""
    time: str


class ShutdownProgress(ApiModel):
    mode: str
    requested_at: str
    last_sent_at: str | None = Field(None, description="When the request was last (re)sent to the guest.")
    attempts: int | None = Field(None, description="How often the request was sent.")
    last_error: str | None = Field(None, description="Why libvirt refused the last request (it is sent again "
                                   "until the timeout).")


class DiskStatus(ApiModel):
    """A disk as the running domain (or the definition, when stopped) has it: recorded facts."""

    name: str
    target: str
    bus: str
    device: str
    path: str | None = Field(None, description="The active file (the chain's leaf).")
    format: str | None = None
    backing_chain: list[str] = Field(default_factory=list, description="Backing files, nearest first.")
    capacity_bytes: int | None = None


class InterfaceStatus(ApiModel):
    name: str
    type: str
    source: str | None = None
    model: str | None = None
    mac: str | None = None
    host_device: str | None = Field(None, description="Host-side device, e.g. the tap.")


class QosApplied(ApiModel):
    """What the node agent applied of status.qos, read back from libvirt and the node."""

    network_mechanism: str | None = Field(None, description="libvirt (<bandwidth>), tc (HTB/IFB), or none.")
    cgroup: str | None = Field(None, description="The node's cgroup version, v1 or v2.")
    cpu: dict[str, int] | None = None
    memory: dict[str, int] | None = None
    disks: dict[str, dict[str, int]] | None = None
    interfaces: dict[str, dict[str, int]] | None = Field(None, description="Per NIC: the tc rates in bit/s.")
    generation: int | None = Field(None, description="The status.qos observedGeneration applied.")


class VirtualMachineStatus(ApiModel):
    phase: Phase | None = None
    node_name: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST)
    domain: DomainRef | None = None
    halted_generation: int | None = Field(
        None, description="Generation at which the VM stopped on its own; a newer spec starts it again."
    )
    shutdown: ShutdownProgress | None = None
    last_reboot: RequestOutcome | None = None
    last_reset: RequestOutcome | None = None
    last_restart: RequestOutcome | None = None
    last_revert: RequestOutcome | None = None
    migration: MigrationState | None = Field(None, description="The VM's last migration (see VMMigration).")
    vcpus: int | None = Field(None, description="vCPUs of the running domain.")
    memory: str | None = Field(None, description="Memory of the running domain (boot memory plus DIMMs).")
    disks: list[DiskStatus] = Field(default_factory=list, json_schema_extra=NAMED_LIST)
    interfaces: list[InterfaceStatus] = Field(default_factory=list, json_schema_extra=NAMED_LIST)
    pending_restart: list[str] = Field(default_factory=list, description="Spec fields that apply at the next "
                                       "restart (see the RestartRequired condition).")
    qos: QosStatus | None = Field(None, description="Effective QoS, resolved by the controller.")
    qos_applied: QosApplied | None = Field(None, description="What the node agent applied of it.")


class VirtualMachine(ApiModel):
    """Top-level object; metadata is left to the API server."""

    spec: VirtualMachineSpec
    status: VirtualMachineStatus | None = None
