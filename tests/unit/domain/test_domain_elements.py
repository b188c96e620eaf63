"""Element classes read what libvirt wrote, and one property change makes exactly one XML change."""

from domain_samples import replace_once, same_xml, sample

from libvirt_operator.domain import DomainConfig
from libvirt_operator.domain.devices import Bandwidth, Disk, Inbound, Interface

STORAGE = "/var/tmp/lvo-domain-samples/storage"


def load(name: str) -> DomainConfig:
    return DomainConfig.from_xml(sample(name))


# --- reading -----------------------------------------------------------------------


def test_domain_scalars():
    dom = load("hotplug-kvm")
    assert (dom.type, dom.name, dom.uuid) == ("kvm", "lvo-sample-hotplug-kvm", "0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c03")
    assert dom.max_memory_kib == 4 * 1024 * 1024  # written as unit='GiB', printed by libvirt in KiB
    assert (dom.max_memory_slots, dom.memory_kib, dom.current_memory_kib) == (16, 524288, 524288)
    assert (dom.vcpus_max, dom.vcpus_current, dom.vcpus_online, dom.vcpu_placement) == (4, 2, 2, "static")
    assert (dom.on_poweroff, dom.on_reboot, dom.on_crash) == ("destroy", "restart", "destroy")
    assert dom.id is None


def test_cpu_and_numa():
    cpu = load("hotplug-kvm").cpu
    assert cpu.mode == "host-model"
    [cell] = cpu.numa_cells
    assert (cell.id, cell.cpus, cell.memory_kib) == (0, "0-3", 524288)
    assert load("kernel-boot").cpu.model == "qemu64"  # libvirt's default for TCG


def test_os_kernel_boot_and_firmware():
    kernel_boot = load("kernel-boot").os
    assert kernel_boot.direct_kernel_boot and kernel_boot.cmdline == "console=ttyS0 quiet loglevel=0"
    assert kernel_boot.kernel.endswith("/vmlinuz") and kernel_boot.initrd.endswith("/initrd.img")
    assert (kernel_boot.type, kernel_boot.arch, kernel_boot.machine) == ("hvm", "x86_64", "pc-q35-7.2")
    firmware = load("firmware-disks").os
    assert not firmware.direct_kernel_boot and firmware.boot_devices == ["cdrom", "hd"]
    assert load("uefi").os.firmware == "efi"
    assert load("kernel-boot").features.acpi and load("kernel-boot").features.apic
    assert load("extras").features.pae and not load("kernel-boot").features.pae
    assert load("kernel-boot").clock.offset == "utc"


def test_disks():
    disks = {d.alias: d for d in load("firmware-disks").devices.disks}
    root, data, stick = disks["ua-disk-root"], disks["ua-disk-data"], disks["ua-disk-stick"]
    install, empty = disks["ua-disk-install"], disks["ua-disk-empty"]
    assert (root.type, root.device, root.driver_name, root.driver_type) == ("file", "disk", "qemu", "qcow2")
    assert (root.source_file, root.target_dev, root.target_bus) == (f"{STORAGE}/root.qcow2", "vda", "virtio")
    assert (data.target_dev, data.target_bus, data.driver_type) == ("sda", "scsi", "raw")
    assert stick.readonly and stick.target_bus == "usb" and not root.readonly
    assert install.is_cdrom and install.readonly and install.source_file == f"{STORAGE}/install.iso"
    assert empty.is_cdrom and empty.source_file is None
    assert root.address_type == "pci" and install.address_type == "drive"
    assert root.user_alias == "ua-disk-root"


def test_interfaces():
    nics = {n.alias: n for n in load("interfaces").devices.interfaces}
    net, br, user = nics["ua-nic-net"], nics["ua-nic-br"], nics["ua-nic-user"]
    assert (net.type, net.source, net.source_network, net.mac_address, net.model_type) == (
        "network", "default", "default", "52:54:00:00:05:01", "virtio")
    inbound, outbound = net.bandwidth.inbound, net.bandwidth.outbound
    assert (inbound.average, inbound.peak, inbound.burst, inbound.floor) == (1000, 5000, 1024, 200)
    assert (outbound.average, outbound.peak) == (500, None)
    assert (br.type, br.source, br.source_bridge, br.model_type) == ("bridge", "br0", "br0", "e1000e")
    assert [tag.id for tag in br.vlan.tags] == [42] and br.vlan.trunk is None
    assert (user.type, user.source, user.model_type, user.bandwidth, user.vlan) == ("user", None, "rtl8139",
                                                                                    None, None)
    assert nics["ua-nic-nomac"].mac_address.startswith("52:54:00:")  # libvirt drew one


def test_controllers_and_balloon():
    devices = load("firmware-disks").devices
    by_type = {(c.type, c.model) for c in devices.controllers}
    assert {("usb", "qemu-xhci"), ("scsi", "virtio-scsi"), ("virtio-serial", None), ("sata", None),
            ("pci", "pcie-root"), ("pci", "pcie-root-port")} <= by_type
    port = devices.controllers.find(lambda c: c.model == "pcie-root-port")
    assert port.index >= 1 and port.target_chassis == port.index
    assert devices.memballoon.model == "virtio"
    assert devices.by_alias("ua-scsi").type == "scsi"
    assert devices.by_alias("ua-disk-data").target_dev == "sda"
    assert devices.by_alias("nope") is None


def test_live_details_of_a_running_domain():
    dom = load("running")
    assert dom.id == 1
    devices = dom.devices
    [channel] = devices.channels
    assert channel.is_guest_agent and channel.agent_connected and channel.target_state == "connected"
    assert channel.source_mode == "bind" and channel.source_path.endswith("/org.qemu.guest_agent.0")
    [serial], [console] = devices.serials, devices.consoles
    assert serial.type == "pty" and serial.source_path.startswith("/dev/pts/")
    assert serial.log_file == f"{STORAGE}/lvo-sample-running.console.log" and serial.log_append is True
    assert (serial.target_type, serial.target_port, serial.target_model) == ("isa-serial", 0, "isa-serial")
    assert console.tty == serial.source_path and console.target_type == "serial"
    assert console.alias == serial.alias == "ua-serial0"  # libvirt mirrors the serial into the console
    # devices libvirt added itself carry its own aliases, ours keep ours
    assert devices.controllers.find(lambda c: c.type == "virtio-serial").alias == "virtio-serial0"
    assert devices.controllers.find(lambda c: c.type == "virtio-serial").user_alias is None
    assert devices.by_alias("ua-balloon") == devices.memballoon


def test_inactive_definition_has_no_live_details():
    dom = load("running-inactive")
    assert dom.id is None
    assert not dom.devices.channels[0].agent_connected and dom.devices.channels[0].source_path is None
    assert dom.devices.serials[0].source_path is None and dom.devices.consoles[0].tty is None


def test_operator_metadata_next_to_foreign_metadata():
    own = load("extras").operator_metadata
    assert (own.vm_namespace, own.vm_name, own.vm_uid, own.generation, own.config_hash) == (
        "team-a", "web", "9d1f6a2e-1111-4c55-9d7e-1f0d2a3b4c06", 7, "sha256:0000")
    assert load("kernel-boot").operator_metadata is None


# --- modifying: exactly the intended change --------------------------------------


def test_change_disk_source():
    text = sample("firmware-disks")
    dom = DomainConfig.from_xml(text)
    dom.devices.by_alias("ua-disk-root").source_file = "/images/new.qcow2"
    expected = replace_once(text, f"<source file='{STORAGE}/root.qcow2'/>", "<source file='/images/new.qcow2'/>")
    assert same_xml(dom.to_xml(), expected)


def test_eject_and_insert_cdrom_media():
    text = sample("firmware-disks")
    dom = DomainConfig.from_xml(text)
    dom.devices.by_alias("ua-disk-install").source_file = None
    ejected = replace_once(text, f"<source file='{STORAGE}/install.iso'/>\n", "")
    assert same_xml(dom.to_xml(), ejected)
    dom.devices.by_alias("ua-disk-empty").source_file = "/isos/new.iso"
    inserted = replace_once(ejected, "<target dev='sdd' bus='sata'/>",
                            "<source file='/isos/new.iso'/><target dev='sdd' bus='sata'/>")
    assert same_xml(dom.to_xml(), inserted)


def test_change_memory_and_vcpus():
    text = sample("hotplug-kvm")
    dom = DomainConfig.from_xml(text)
    dom.current_memory_kib = 262144
    dom.vcpus_current = None
    expected = replace_once(text, "<currentMemory unit='KiB'>524288</currentMemory>",
                            "<currentMemory unit='KiB'>262144</currentMemory>")
    expected = replace_once(expected, "<vcpu placement='static' current='2'>4</vcpu>",
                            "<vcpu placement='static'>4</vcpu>")
    assert same_xml(dom.to_xml(), expected)


def test_add_a_console_log():
    text = sample("running-inactive")
    dom = DomainConfig.from_xml(text)
    serial = dom.devices.serials[0]
    serial.log_file, serial.log_append = "/logs/new.log", False
    old = f"<log file='{STORAGE}/lvo-sample-running.console.log' append='on'/>"
    expected = text.replace(old, "@", 1)  # only the serial's log, the console keeps its copy
    expected = replace_once(expected, "@", "<log file='/logs/new.log' append='off'/>")
    assert same_xml(dom.to_xml(), expected)


def test_set_bandwidth_on_an_interface():
    text = sample("interfaces")
    dom = DomainConfig.from_xml(text)
    nic = dom.devices.by_alias("ua-nic-user")
    nic.bandwidth = Bandwidth(inbound=Inbound(average=100, burst=50))
    expected = replace_once(text, "<mac address='52:54:00:00:05:03'/>",
                            "<mac address='52:54:00:00:05:03'/>"
                            "<bandwidth><inbound average='100' burst='50'/></bandwidth>")
    assert same_xml(dom.to_xml(), expected)
    nic.bandwidth = None
    assert same_xml(dom.to_xml(), text)


def test_remove_vlan_and_append_a_device():
    text = sample("interfaces")
    dom = DomainConfig.from_xml(text)
    dom.devices.by_alias("ua-nic-br").vlan = None
    expected = replace_once(text, "<vlan>\n        <tag id='42'/>\n      </vlan>\n", "")
    assert same_xml(dom.to_xml(), expected)
    new = Interface(type="user", mac_address="52:54:00:00:05:09", model_type="virtio", alias="ua-nic-new")
    dom.devices.interfaces.append(new)
    last_nic_end = expected.rindex("</interface>") + len("</interface>")
    expected = (expected[:last_nic_end] + "<interface type='user'><mac address='52:54:00:00:05:09'/>"
                "<model type='virtio'/><alias name='ua-nic-new'/></interface>" + expected[last_nic_end:])
    assert same_xml(dom.to_xml(), expected)


def test_remove_a_disk_and_change_boot_order():
    text = sample("firmware-disks")
    dom = DomainConfig.from_xml(text)
    dom.devices.disks.remove(dom.devices.by_alias("ua-disk-stick"))
    dom.os.boot_devices = ["hd"]
    start = text.index("<disk type='file' device='disk'>", text.index("data.raw"))
    end = text.index("</disk>", start) + len("</disk>")
    expected = replace_once(text[:start] + text[end:], "<boot dev='cdrom'/>\n    ", "")
    assert same_xml(dom.to_xml(), expected)


def test_new_disk_gets_children_in_libvirt_order():
    disk = Disk(alias="ua-disk-x", target_bus="sata", target_dev="sdz", source_file="/x", driver_type="raw",
                driver_name="qemu", type="file", device="cdrom")
    disk.readonly = True
    assert same_xml(disk.to_xml(), "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                    "<source file='/x'/><target dev='sdz' bus='sata'/><readonly/><alias name='ua-disk-x'/></disk>")
