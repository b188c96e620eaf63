"""VirtualMachine: a libvirt domain declared as a Kubernetes object."""

from __future__ import annotations

from typing import Literal

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

PowerState = Literal["Running", "Stopped", "Paused"]
Phase = Literal[
    "Pending", "Scheduled", "Starting", "Running", "Paused", "Stopping", "Stopped", "Failed", "Terminating"
]


class CPU(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("!has(self.maxVcpus) || self.maxVcpus >= self.vcpus",
            "maxVcpus must be at least vcpus", field_path=".maxVcpus"),
    )}

    vcpus: int = Field(1, ge=1, le=256, description="vCPUs online at boot.")
    max_vcpus: int | None = Field(
        None, ge=1, le=256, description="Ceiling for vCPU hot-add; defaults to vcpus (no hot-add)."
    )


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


class Disk(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.device == 'cdrom' || has(self.path)", "a disk of device 'disk' needs a path",
            reason="FieldValueRequired", field_path=".path"),
        cel("self.device != 'cdrom' || !has(self.bus) || self.bus in ['sata', 'scsi', 'ide', 'usb']",
            "a cdrom must be on bus sata, scsi, ide or usb", field_path=".bus"),
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
    target: str | None = Field(None, pattern=r"^(vd|sd|hd)[a-z]{1,2}$",
                               description="Guest device name; assigned by bus order when empty.")
    read_only: bool = False


class Interface(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.type == 'user' || has(self.source)",
            "interfaces of type network or bridge need a source", reason="FieldValueRequired",
            field_path=".source"),
    )}

    name: DnsLabel = Field(description="Unique name of the interface in this VM.")
    type: Literal["network", "bridge", "user"] = Field(
        "network", description="libvirt network, host bridge, or user-mode networking."
    )
    source: str | None = Field(None, min_length=1, max_length=253,
                               description="Network name or bridge name.")
    mac: str | None = Field(None, pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$",
                            description="Lower-case MAC; generated when empty.")
    model: Literal["virtio", "e1000", "e1000e", "rtl8139"] = "virtio"


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


class VirtualMachineSpec(ApiModel):
    model_config = {"json_schema_extra": validations(
        cel("self.shutdown.mode != 'agent' || self.guestAgent",
            "shutdown.mode 'agent' needs guestAgent: true", field_path=".shutdown.mode"),
        cel("!has(self.reboot) || self.reboot.mode != 'agent' || self.guestAgent",
            "reboot.mode 'agent' needs guestAgent: true", field_path=".reboot.mode"),
        cel("!has(oldSelf.nodeName) || (has(self.nodeName) && self.nodeName == oldSelf.nodeName)",
            "nodeName cannot be changed once set; migrate the VM instead", field_path=".nodeName"),
        cel("has(self.boot.kernel) || self.disks.size() > 0",
            "a VM needs a disk or a kernel to boot from", reason="FieldValueRequired", field_path=".disks"),
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
    guest_agent: bool = Field(True, description="Add the qemu-guest-agent channel.")
    shutdown: Shutdown = Field(default_factory=Shutdown, json_schema_extra=NESTED_DEFAULT)
    reboot: RebootRequest | None = Field(None, description="One-shot reboot request.")
    reset: ResetRequest | None = Field(None, description="One-shot hard reset request.")
    disk_deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="Delete removes the VM's writable disk files (not their backing files) "
        "when the VM is deleted."
    )


class RequestOutcome(ApiModel):
    id: str
    result: Literal["InProgress", "Succeeded", "Failed"]
    message: str = ""
    time: str


class DomainRef(ApiModel):
    name: str
    uuid: str


class ShutdownProgress(ApiModel):
    mode: str
    requested_at: str


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


class VirtualMachine(ApiModel):
    """Top-level object; metadata is left to the API server."""

    spec: VirtualMachineSpec
    status: VirtualMachineStatus | None = None
