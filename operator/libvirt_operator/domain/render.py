"""VirtualMachineSpec -> DomainConfig: the domain a VM's spec asks for.

Pure and deterministic: the same inputs give the same XML (and config hash),
so an agent can tell a stale domain from a current one.
"""

from __future__ import annotations

from collections.abc import Mapping

from libvirt_operator.api.quantity import to_kib
from libvirt_operator.api.virtualmachine import Boot, Disk, HostDevice, Interface, VirtualMachineSpec
from libvirt_operator.domain import devices as dev
from libvirt_operator.domain import naming
from libvirt_operator.domain.clock import Clock
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.cpu import CPU, NumaCell
from libvirt_operator.domain.cputune import CPUTune, VcpuPin
from libvirt_operator.domain.errors import RenderError
from libvirt_operator.domain.features import Features
from libvirt_operator.domain.guest_os import GuestOS
from libvirt_operator.domain.metadata import OperatorMetadata
from libvirt_operator.domain.targets import assign_targets
from libvirt_operator.storage.chain import Chain

ARCH = "x86_64"
# q35 (PCIe) for every VM, except that IDE exists only on the older i440fx 'pc'.
MACHINE = "q35"
IDE_MACHINE = "pc"
MEMORY_SLOTS = 16  # DIMM slots for memory hot-add
# On q35 every PCIe device sits on its own root port, and root ports cannot be
# hot-plugged: these stay free for disks and NICs attached while running.
SPARE_ROOT_PORTS = 8
PCIE_NIC_MODELS = ("virtio", "e1000e")  # e1000/rtl8139 are conventional PCI


def render_domain(
    spec: VirtualMachineSpec,
    *,
    name: str,
    uuid: str,
    namespace: str,
    vm_name: str,
    generation: int,
    domain_type: str,
    console_log: str | None,
    uid: str | None = None,
    disk_chains: Mapping[str, Chain] | None = None,
    disk_origins: Mapping[str, str] | None = None,
) -> DomainConfig:
    """The domain for ``spec``. ``domain_type`` is the resolved 'kvm' or 'qemu';
    ``console_log`` receives the serial console's output; ``uid`` is the
    VirtualMachine's metadata.uid (defaults to ``uuid``). ``disk_chains`` is the record of the disks'
    chains by disk name (after a snapshot the active file is a leaf over the spec's path): a disk
    (not a CD-ROM) named there runs on its chain's active file, in that file's format. The metadata
    records the chain of every file-backed disk (the spec's path alone when it has no record), and
    ``disk_origins`` the spec path each moved disk's chain stands for (after a migration moved it)."""
    if domain_type not in ("kvm", "qemu"):
        raise RenderError(f"domain type must be resolved to 'kvm' or 'qemu', not {domain_type!r}")
    machine = IDE_MACHINE if any(_bus(disk) == "ide" for disk in spec.disks) else MACHINE
    domain = DomainConfig(type=domain_type, name=name, uuid=uuid)
    _set_memory_and_vcpus(domain, spec)
    domain.os = _guest_os(spec.boot, machine)
    domain.features = Features(acpi=True, apic=True)  # ACPI shutdown/reboot need both
    domain.cpu = _cpu(spec, domain_type)
    domain.cputune = _cputune(spec)
    domain.clock = Clock(offset="utc")
    domain.on_poweroff, domain.on_reboot, domain.on_crash = "destroy", "restart", "destroy"
    chains = disk_records(spec, disk_chains or {})
    domain.devices = _devices(spec, uuid, machine, console_log, chains)
    own = OperatorMetadata(vm_namespace=namespace, vm_name=vm_name, vm_uid=uid or uuid, generation=generation)
    own.boot_fields = boot_fields(spec, domain_type, machine)
    own.disks = chains
    own.disk_origins = {k: v for k, v in (disk_origins or {}).items() if k in chains}
    domain.operator_metadata = own
    own.config_hash = domain.config_hash()
    return domain


def disk_records(spec: VirtualMachineSpec, disk_chains: Mapping[str, Chain]) -> dict[str, Chain]:
    """The chain each file-backed disk (not a CD-ROM) runs on: its record, else its spec path alone."""
    out = {}
    for disk in spec.disks:
        if disk.device != "disk" or not disk.path:
            continue
        chain = disk_chains.get(disk.name)
        out[disk.name] = chain if chain is not None else Chain.of((disk.path, disk.format or "qcow2"))
    return out


def boot_fields(spec: VirtualMachineSpec, domain_type: str, machine: str) -> dict:
    """The spec fields that only a (re)start of the domain applies, by field path."""
    boot = spec.boot
    return {
        "domainType": domain_type,
        "machine": machine,
        "boot": boot.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "cpu.maxVcpus": spec.cpu.max_vcpus or spec.cpu.vcpus,
        "memory.maxSize": to_kib(spec.memory.max_size or spec.memory.size),
        "guestAgent": spec.guest_agent,
    }


def _cputune(spec: VirtualMachineSpec) -> CPUTune | None:
    pinning = spec.cpu.pinning
    if pinning is None or not (pinning.vcpus or pinning.emulator):
        return None
    tune = CPUTune()
    for pin in sorted(pinning.vcpus, key=lambda p: p.vcpu):
        tune.vcpupins.append(VcpuPin(vcpu=pin.vcpu, cpuset=pin.cpuset))
    if pinning.emulator:
        tune.emulator_cpuset = pinning.emulator
    return tune


def _set_memory_and_vcpus(domain: DomainConfig, spec: VirtualMachineSpec) -> None:
    size = to_kib(spec.memory.size)
    ceiling = to_kib(spec.memory.max_size) if spec.memory.max_size else size
    domain.memory_kib = domain.current_memory_kib = size
    if ceiling > size:
        domain.max_memory_kib, domain.max_memory_slots = ceiling, MEMORY_SLOTS
    max_vcpus = spec.cpu.max_vcpus or spec.cpu.vcpus
    domain.vcpus_max, domain.vcpu_placement = max_vcpus, "static"
    if spec.cpu.vcpus < max_vcpus:  # libvirt drops current= when it equals the maximum
        domain.vcpus_current = spec.cpu.vcpus


def _guest_os(boot: Boot, machine: str) -> GuestOS:
    os = GuestOS(type="hvm", arch=ARCH, machine=machine)
    if boot.kernel:
        os.kernel, os.initrd, os.cmdline = boot.kernel.kernel, boot.kernel.initrd, boot.kernel.cmdline
        return os
    if boot.firmware == "uefi":
        os.firmware = "efi"
    os.boot_devices = list(boot.order or ["hd"])
    return os


def _cpu(spec: VirtualMachineSpec, domain_type: str) -> CPU | None:
    """host-model under KVM (migratable: libvirt fixes a named model at start);
    QEMU's default model under TCG. Memory hot-add on libvirt 9.0 needs an
    explicit guest NUMA cell holding all (also not yet online) vCPUs."""
    cpu = CPU(mode="host-model") if domain_type == "kvm" else CPU()
    if spec.memory.max_size and to_kib(spec.memory.max_size) > to_kib(spec.memory.size):
        max_vcpus = spec.cpu.max_vcpus or spec.cpu.vcpus
        cpus = "0" if max_vcpus == 1 else f"0-{max_vcpus - 1}"
        cpu.numa_cells.append(NumaCell(id=0, cpus=cpus, memory_kib=to_kib(spec.memory.size)))
    return cpu if cpu.element.attrib or len(cpu.element) else None


def _devices(spec: VirtualMachineSpec, uuid: str, machine: str, console_log: str | None,
             chains: Mapping[str, Chain]) -> dev.Devices:
    devices = dev.Devices()
    targets = assign_targets([(_bus(disk), disk.target) for disk in spec.disks])
    for disk, target in zip(spec.disks, targets, strict=True):
        devices.disks.append(_disk(disk, target, chains.get(disk.name)))
    controllers = [
        dev.Controller(type="usb", index=0, model="qemu-xhci", alias=naming.USB_CONTROLLER_ALIAS),
        # always present, so SCSI disks attached later land on virtio-scsi, not libvirt's default lsilogic
        dev.Controller(type="scsi", index=0, model="virtio-scsi", alias=naming.SCSI_CONTROLLER_ALIAS),
    ]
    if spec.guest_agent:
        controllers.append(dev.Controller(type="virtio-serial", index=0, alias=naming.VIRTIO_SERIAL_ALIAS))
    if machine == MACHINE:
        controllers += _pcie_controllers(spec, len(controllers))
    for controller in controllers:
        devices.controllers.append(controller)
    for interface in spec.interfaces:
        devices.interfaces.append(_interface(interface, uuid))
    for hostdev in spec.host_devices:
        devices.hostdevs.append(_hostdev(hostdev))
    serial = dev.Serial(type="pty", target_port=0, alias=naming.SERIAL_ALIAS)
    if console_log:
        serial.log_file, serial.log_append = console_log, True
    devices.serials.append(serial)
    devices.consoles.append(dev.Console(type="pty", target_type="serial", target_port=0))
    if spec.guest_agent:
        devices.channels.append(dev.Channel(
            type="unix", target_type="virtio", target_name=dev.GUEST_AGENT_CHANNEL,
            alias=naming.GUEST_AGENT_ALIAS,
        ))
    devices.memballoon = dev.MemBalloon(model="virtio", alias=naming.BALLOON_ALIAS)
    return devices


def _pcie_controllers(spec: VirtualMachineSpec, pcie_controllers: int) -> list[dev.Controller]:
    """pcie-root plus one root port per PCIe device and SPARE_ROOT_PORTS more."""
    # Conventional PCI NICs go behind a pcie-to-pci-bridge, for which libvirt adds a root port itself.
    in_use = (
        pcie_controllers
        + 1  # memballoon
        + sum(1 for disk in spec.disks if _bus(disk) == "virtio")
        + sum(1 for nic in spec.interfaces if nic.model in PCIE_NIC_MODELS or nic.type == "hostdev")
        + sum(1 for hostdev in spec.host_devices if hostdev.type == "pci")
    )
    ports = [
        dev.Controller(type="pci", index=index, model="pcie-root-port")
        for index in range(1, in_use + SPARE_ROOT_PORTS + 1)
    ]
    return [dev.Controller(type="pci", index=0, model="pcie-root"), *ports]


def _bus(disk: Disk) -> str:
    return disk.bus or ("sata" if disk.device == "cdrom" else "virtio")


def _disk(disk: Disk, target: str, chain: Chain | None) -> dev.Disk:
    cdrom = disk.device == "cdrom"
    fmt, path = disk.format or ("raw" if cdrom else "qcow2"), disk.path  # None: an empty CD-ROM drive
    if chain is not None and not cdrom:  # the recorded active file (a snapshot's leaf over the spec's path)
        fmt, path = chain.active.format or fmt, chain.active.path
    element = dev.Disk(
        type="file",
        device=disk.device,
        driver_name="qemu",
        driver_type=fmt,
        source_file=path,
        target_dev=target,
        target_bus=_bus(disk),
        alias=naming.disk_alias(disk.name),
    )
    element.readonly = cdrom or disk.read_only
    return element


def _interface(interface: Interface, uuid: str) -> dev.Interface:
    element = dev.Interface(
        type=interface.type,
        mac_address=interface.mac or naming.generated_mac(uuid, interface.name),
        model_type=interface.model,
        alias=naming.nic_alias(interface.name),
    )
    if interface.type == "network":
        element.source_network = interface.source
    elif interface.type == "bridge":
        element.source_bridge = interface.source
    elif interface.type == "hostdev":
        element.managed = True
        element.model_type = None  # a VF is the guest's NIC itself
        element.set_pci_address(interface.pci_address)
    return element


def _hostdev(hostdev: HostDevice) -> dev.HostDev:
    element = dev.HostDev(mode="subsystem", type=hostdev.type, managed=True,
                          alias=naming.hostdev_alias(hostdev.name))
    if hostdev.type == "pci":
        element.set_pci_address(hostdev.address)
    else:
        element.usb_vendor, element.usb_product = hostdev.vendor, hostdev.product
    return element
