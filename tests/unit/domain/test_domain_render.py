"""render_domain: representative specs -> the domain XML they ask for."""

import pytest

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import DomainConfig, RenderError, render_domain
from libvirt_operator.domain.naming import generated_mac
from libvirt_operator.domain.render import SPARE_ROOT_PORTS

UUID = "7f0c1c51-9b0e-4d3a-8f4e-2a5b6c7d8e90"


def render(spec: dict, **overrides) -> DomainConfig:
    args = dict(name="team-a_web", uuid=UUID, namespace="team-a", vm_name="web", generation=4,
                domain_type="qemu", console_log="/logs/web.log")
    args.update(overrides)
    return render_domain(VirtualMachineSpec.model_validate(spec), **args)


KERNEL_BOOT = {
    "memory": {"size": "256Mi"},
    "boot": {"kernel": {"kernel": "/img/vmlinuz", "initrd": "/img/initrd.img", "cmdline": "console=ttyS0"}},
    "interfaces": [{"name": "eth0", "type": "user"}],
}
FIRMWARE = {
    "cpu": {"vcpus": 2},
    "memory": {"size": "1Gi"},
    "boot": {"order": ["cdrom", "hd"]},
    "disks": [
        {"name": "root", "path": "/img/root.qcow2"},
        {"name": "install", "device": "cdrom", "path": "/iso/debian.iso"},
        {"name": "data", "path": "/img/data.raw", "format": "raw", "bus": "scsi", "readOnly": True},
        {"name": "tray", "device": "cdrom"},
        {"name": "fixed", "path": "/img/fixed.qcow2", "target": "vda"},
    ],
}


def test_direct_kernel_boot():
    dom = render(KERNEL_BOOT)
    assert (dom.type, dom.name, dom.uuid) == ("qemu", "team-a_web", UUID)
    assert (dom.os.type, dom.os.arch, dom.os.machine) == ("hvm", "x86_64", "q35")
    assert (dom.os.kernel, dom.os.initrd, dom.os.cmdline) == ("/img/vmlinuz", "/img/initrd.img", "console=ttyS0")
    assert dom.os.boot_devices == [] and dom.os.firmware is None
    assert dom.memory_kib == dom.current_memory_kib == 256 * 1024 and dom.max_memory_kib is None
    assert (dom.vcpus_max, dom.vcpus_current, dom.vcpu_placement) == (1, None, "static")
    assert dom.features.acpi and dom.features.apic
    assert dom.cpu is None  # TCG without hot-add: QEMU's default model, no NUMA
    assert dom.clock.offset == "utc"
    assert (dom.on_poweroff, dom.on_reboot, dom.on_crash) == ("destroy", "restart", "destroy")


def test_kernel_boot_without_initrd_or_cmdline():
    dom = render({"memory": {"size": "64Mi"}, "boot": {"kernel": {"kernel": "/img/vmlinuz"}}})
    assert dom.os.kernel == "/img/vmlinuz" and dom.os.initrd is None and dom.os.cmdline is None
    assert "<initrd" not in dom.to_xml() and "<cmdline" not in dom.to_xml()


def test_firmware_boot_with_disks_and_cdroms():
    dom = render(FIRMWARE)
    assert dom.os.firmware is None and dom.os.kernel is None  # BIOS: libvirt's default
    assert dom.os.boot_devices == ["cdrom", "hd"]
    disks = [(d.alias, d.device, d.driver_type, d.target_bus, d.target_dev, d.source_file, d.readonly)
             for d in dom.devices.disks]
    assert disks == [
        ("ua-disk-root", "disk", "qcow2", "virtio", "vdb", "/img/root.qcow2", False),
        ("ua-disk-install", "cdrom", "raw", "sata", "sda", "/iso/debian.iso", True),
        ("ua-disk-data", "disk", "raw", "scsi", "sdb", "/img/data.raw", True),
        ("ua-disk-tray", "cdrom", "raw", "sata", "sdc", None, True),
        ("ua-disk-fixed", "disk", "qcow2", "virtio", "vda", "/img/fixed.qcow2", False),
    ]
    assert all(d.type == "file" and d.driver_name == "qemu" for d in dom.devices.disks)
    assert "<source" not in dom.devices.disks[3].to_xml()


def test_default_boot_order_is_the_disk():
    assert render({"memory": {"size": "1Gi"}, "disks": [{"name": "root", "path": "/r"}]}).os.boot_devices == ["hd"]


def test_uefi():
    dom = render({**FIRMWARE, "boot": {"firmware": "uefi"}})
    assert dom.os.firmware == "efi" and dom.os.boot_devices == ["hd"]
    assert dom.os.loader is None  # libvirt picks the firmware build


def test_hot_add_ceilings():
    dom = render({**KERNEL_BOOT, "cpu": {"vcpus": 2, "maxVcpus": 4}, "memory": {"size": "512Mi", "maxSize": "4Gi"}})
    assert (dom.memory_kib, dom.current_memory_kib) == (512 * 1024, 512 * 1024)
    assert (dom.max_memory_kib, dom.max_memory_slots) == (4 * 1024 * 1024, 16)
    assert (dom.vcpus_max, dom.vcpus_current, dom.vcpus_online) == (4, 2, 2)
    [cell] = dom.cpu.numa_cells  # libvirt 9.0 needs an explicit cell for memory hot-add
    assert (cell.id, cell.cpus, cell.memory_kib) == (0, "0-3", 512 * 1024)
    assert dom.cpu.mode is None


def test_numa_cell_of_a_single_vcpu():
    dom = render({**KERNEL_BOOT, "memory": {"size": "512Mi", "maxSize": "1Gi"}})
    assert dom.cpu.numa_cells[0].cpus == "0"


def test_equal_ceilings_mean_no_hot_add():
    dom = render({**KERNEL_BOOT, "cpu": {"vcpus": 2, "maxVcpus": 2}, "memory": {"size": "1Gi", "maxSize": "1Gi"}})
    assert dom.max_memory_kib is None and dom.max_memory_slots is None and dom.cpu is None
    assert (dom.vcpus_max, dom.vcpus_current) == (2, None)


def test_memory_quantities_round_up_to_kib():
    assert render({**KERNEL_BOOT, "memory": {"size": "1G"}}).memory_kib == 976563  # 10**9 / 1024, rounded up


def test_kvm_uses_host_model():
    dom = render({**KERNEL_BOOT, "memory": {"size": "512Mi", "maxSize": "1Gi"}}, domain_type="kvm")
    assert dom.type == "kvm" and dom.cpu.mode == "host-model" and len(dom.cpu.numa_cells) == 1
    assert render(KERNEL_BOOT, domain_type="kvm").cpu.mode == "host-model"


def test_unresolved_domain_type_is_refused():
    with pytest.raises(RenderError, match="'auto'"):
        render(KERNEL_BOOT, domain_type="auto")


@pytest.mark.parametrize(
    ("interface", "source_network", "source_bridge"),
    [
        ({"name": "n", "type": "network", "source": "default"}, "default", None),
        ({"name": "n", "type": "bridge", "source": "br0"}, None, "br0"),
        ({"name": "n", "type": "user"}, None, None),
    ],
)
def test_interface_types(interface, source_network, source_bridge):
    [nic] = render({**KERNEL_BOOT, "interfaces": [interface]}).devices.interfaces
    assert (nic.type, nic.source_network, nic.source_bridge) == (interface["type"], source_network, source_bridge)
    assert (nic.alias, nic.model_type, nic.mac_address) == ("ua-nic-n", "virtio", generated_mac(UUID, "n"))


def test_interface_mac_and_model_from_the_spec():
    nic = {"name": "eth0", "type": "bridge", "source": "br0", "mac": "52:54:00:aa:bb:cc", "model": "e1000e"}
    [rendered] = render({**KERNEL_BOOT, "interfaces": [nic]}).devices.interfaces
    assert (rendered.mac_address, rendered.model_type) == ("52:54:00:aa:bb:cc", "e1000e")


def test_console_guest_agent_and_balloon():
    devices = render(KERNEL_BOOT).devices
    [serial], [console], [channel] = devices.serials, devices.consoles, devices.channels
    assert (serial.type, serial.target_port, serial.alias) == ("pty", 0, "ua-serial0")
    assert (serial.log_file, serial.log_append) == ("/logs/web.log", True)
    assert (console.type, console.target_type, console.target_port) == ("pty", "serial", 0)
    assert (channel.type, channel.is_guest_agent, channel.source_path) == ("unix", True, None)
    assert channel.alias == "ua-guest-agent"
    assert (devices.memballoon.model, devices.memballoon.alias) == ("virtio", "ua-balloon")
    controllers = {(c.type, c.model, c.alias) for c in devices.controllers if c.type != "pci"}
    assert controllers == {("usb", "qemu-xhci", "ua-usb"), ("scsi", "virtio-scsi", "ua-scsi"),
                           ("virtio-serial", None, "ua-virtio-serial")}


def test_no_agent_no_log():
    devices = render({**KERNEL_BOOT, "guestAgent": False}, console_log=None).devices
    assert len(devices.channels) == 0
    assert not any(c.type == "virtio-serial" for c in devices.controllers)
    assert devices.serials[0].log_file is None and "<log" not in devices.to_xml()


def root_ports(dom: DomainConfig) -> int:
    return sum(1 for c in dom.devices.controllers if c.model == "pcie-root-port")


def test_spare_root_ports_on_q35():
    # usb, scsi, virtio-serial, balloon, 1 virtio NIC: 5 PCIe devices
    assert root_ports(render(KERNEL_BOOT)) == 5 + SPARE_ROOT_PORTS
    # + 2 virtio disks; cdroms and scsi disks sit on their controllers
    assert root_ports(render(FIRMWARE)) == 4 + 2 + SPARE_ROOT_PORTS
    # conventional PCI NICs share one pcie-to-pci-bridge, whose root port libvirt adds
    legacy = [{"name": "a", "type": "user", "model": "e1000"}, {"name": "b", "type": "user", "model": "rtl8139"}]
    assert root_ports(render({**KERNEL_BOOT, "interfaces": legacy})) == 4 + SPARE_ROOT_PORTS
    indexes = [c.index for c in render(KERNEL_BOOT).devices.controllers if c.type == "pci"]
    assert indexes == list(range(len(indexes)))  # pcie-root is 0, ports follow


def test_ide_needs_the_pc_machine():
    dom = render({**FIRMWARE, "disks": [{"name": "old", "path": "/img/old.qcow2", "bus": "ide"}]})
    assert dom.os.machine == "pc" and dom.devices.disks[0].target_dev == "hda"
    assert root_ports(dom) == 0 and not any(c.type == "pci" for c in dom.devices.controllers)


def test_bad_explicit_target_is_a_render_error():
    with pytest.raises(RenderError, match="does not fit"):
        render({**FIRMWARE, "disks": [{"name": "root", "path": "/r", "target": "hda"}]})


def test_operator_metadata():
    dom = render(KERNEL_BOOT)
    own = dom.operator_metadata
    assert (own.vm_namespace, own.vm_name, own.vm_uid, own.generation) == ("team-a", "web", UUID, 4)
    assert own.config_hash == dom.config_hash() and own.config_hash.startswith("sha256:")
    assert render(KERNEL_BOOT, uid="another-uid").operator_metadata.vm_uid == "another-uid"


def test_rendering_is_deterministic():
    assert render(FIRMWARE).to_xml() == render(FIRMWARE).to_xml()


def test_config_hash_follows_the_config_not_the_generation():
    base = render(KERNEL_BOOT).operator_metadata.config_hash
    assert render(KERNEL_BOOT, generation=9).operator_metadata.config_hash == base
    assert render({**KERNEL_BOOT, "powerState": "Stopped"}).operator_metadata.config_hash == base
    assert render({**KERNEL_BOOT, "memory": {"size": "512Mi"}}).operator_metadata.config_hash != base
    assert render(KERNEL_BOOT, console_log="/logs/other.log").operator_metadata.config_hash != base


def test_staleness():
    stored = DomainConfig.from_xml(render(KERNEL_BOOT).to_xml())
    assert not stored.is_stale(render(KERNEL_BOOT, generation=5))
    assert stored.is_stale(render({**KERNEL_BOOT, "cpu": {"vcpus": 2}}))
    stored.operator_metadata = None
    assert stored.is_stale(render(KERNEL_BOOT))


def test_rendered_xml_parses_back_identically():
    text = render(FIRMWARE).to_xml()
    assert DomainConfig.from_xml(text).to_xml() == text


def test_disks_run_on_their_recorded_active_file():
    from libvirt_operator.storage.chain import Chain

    leaf = Chain.of(("/img/root.s1.qcow2", "qcow2"), ("/img/root.qcow2", "qcow2"))
    data = Chain.of(("/img/data.s1.qcow2", "qcow2"), ("/img/data.raw", "raw"))
    plain = render(FIRMWARE)
    dom = render(FIRMWARE, disk_chains={"root": leaf, "data": data, "install": Chain.of(("/iso/other.iso", "raw"))})
    disks = {d.alias: d for d in dom.devices.disks}
    assert (disks["ua-disk-root"].source_file, disks["ua-disk-root"].driver_type) == ("/img/root.s1.qcow2", "qcow2")
    assert (disks["ua-disk-data"].source_file, disks["ua-disk-data"].driver_type) == ("/img/data.s1.qcow2", "qcow2")
    assert disks["ua-disk-data"].readonly and disks["ua-disk-data"].target_bus == "scsi"
    # a CD-ROM is media, never a chain: the spec's ISO stays
    assert disks["ua-disk-install"].source_file == "/iso/debian.iso"
    assert dom.config_hash() != plain.config_hash()  # a new active file redefines the domain
    # the record of every file-backed disk; a disk without one is its spec path alone
    assert dom.operator_metadata.disks == {"root": leaf, "data": data,
                                           "fixed": Chain.of(("/img/fixed.qcow2", "qcow2"))}
    assert plain.operator_metadata.disks == {"root": Chain.of(("/img/root.qcow2", "qcow2")),
                                             "data": Chain.of(("/img/data.raw", "raw")),
                                             "fixed": Chain.of(("/img/fixed.qcow2", "qcow2"))}
    # without a record (or with the one-layer record of the spec paths) the render is the spec's
    assert render(FIRMWARE, disk_chains=plain.operator_metadata.disks).to_xml() == plain.to_xml()
