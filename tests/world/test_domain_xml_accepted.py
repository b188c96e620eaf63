"""Every rendered domain is accepted by a real libvirtd, keeps what we put in it,
and the rendered test guest really runs: console log, agent channel, hot-add."""

import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import METADATA_NAMESPACE, DomainConfig, OperatorMetadata, render_domain
from libvirt_operator.domain.addresses import carry_over_addresses
from libvirt_operator.domain.render import SPARE_ROOT_PORTS
from localenv.fixtures_libvirt import wait_for_marker

pytestmark = pytest.mark.world

DISKS = [
    {"name": "root", "path": "/images/root.qcow2"},
    {"name": "install", "device": "cdrom", "path": "/images/install.iso"},
    {"name": "tray", "device": "cdrom"},
    {"name": "data", "path": "/images/data.raw", "format": "raw", "bus": "scsi", "readOnly": True},
    {"name": "stick", "path": "/images/stick.raw", "format": "raw", "bus": "usb"},
]
KERNEL = {"kernel": {"kernel": "/images/vmlinuz", "initrd": "/images/initrd.img", "cmdline": "console=ttyS0"}}

SPECS = {
    "kernel-boot": {"memory": {"size": "256Mi"}, "boot": KERNEL},
    "firmware-disks": {"cpu": {"vcpus": 2}, "memory": {"size": "1Gi"}, "boot": {"order": ["cdrom", "hd"]},
                       "disks": DISKS},
    "uefi": {"memory": {"size": "1Gi"}, "boot": {"firmware": "uefi"}, "disks": DISKS[:2]},
    "hot-add": {"cpu": {"vcpus": 1, "maxVcpus": 4}, "memory": {"size": "512Mi", "maxSize": "4Gi"},
                "boot": KERNEL},
    "interfaces": {"memory": {"size": "256Mi"}, "boot": KERNEL, "interfaces": [
        {"name": "net", "type": "network", "source": "default"},
        {"name": "br", "type": "bridge", "source": "br0", "model": "e1000e", "mac": "52:54:00:12:34:56"},
        {"name": "user", "type": "user", "model": "e1000"},
        {"name": "old", "type": "user", "model": "rtl8139"},
    ]},
    "ide": {"memory": {"size": "256Mi"}, "disks": [{"name": "old", "path": "/images/old.qcow2", "bus": "ide"},
                                                   {"name": "cd", "device": "cdrom", "bus": "ide"}]},
    "no-agent": {"memory": {"size": "256Mi"}, "boot": KERNEL, "guestAgent": False},
}


def render(spec: dict, domain_type: str, console_log: str | None = "/var/log/lvo/console.log",
           vm_name: str | None = None) -> DomainConfig:
    vm_name = vm_name or f"dx-{uuid.uuid4().hex[:8]}"
    return render_domain(VirtualMachineSpec.model_validate(spec), name=f"test_{vm_name}", uuid=str(uuid.uuid4()),
                         namespace="test", vm_name=vm_name, generation=1, domain_type=domain_type,
                         console_log=console_log)


def free_root_ports(dom: DomainConfig) -> int:
    """Root ports that no device (or bridge) sits behind, in libvirt's addressed XML."""
    used_buses = {int(el.get("bus"), 16) for el in dom.element.iter("address") if el.get("type") == "pci"}
    ports = [c.index for c in dom.devices.controllers if c.model == "pcie-root-port"]
    return sum(1 for index in ports if index not in used_buses)


@pytest.mark.parametrize("domain_type", ["qemu", "kvm"])
@pytest.mark.parametrize("sample", sorted(SPECS))
def test_rendered_domain_is_accepted(libvirt_nodes, sample, domain_type):
    rendered = render(SPECS[sample], domain_type)
    conn = libvirt_nodes[0].connect()
    dom = conn.defineXMLFlags(rendered.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        stored = DomainConfig.from_xml(dom.XMLDesc(0))
        # libvirt kept our identity, metadata and device names
        assert (stored.name, stored.uuid, stored.type) == (rendered.name, rendered.uuid, domain_type)
        assert not stored.is_stale(rendered)
        # the agent can read our element alone through libvirt's metadata API
        own = OperatorMetadata.from_api_xml(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE))
        assert (own.vm_name, own.config_hash) == (rendered.operator_metadata.vm_name, rendered.config_hash())
        assert [(d.alias, d.target_dev, d.source_file) for d in stored.devices.disks] == [
            (d.alias, d.target_dev, d.source_file) for d in rendered.devices.disks]
        assert [(n.alias, n.mac_address, n.type, n.source) for n in stored.devices.interfaces] == [
            (n.alias, n.mac_address, n.type, n.source) for n in rendered.devices.interfaces]
        assert (stored.memory_kib, stored.max_memory_kib, stored.vcpus_max, stored.vcpus_current) == (
            rendered.memory_kib, rendered.max_memory_kib, rendered.vcpus_max, rendered.vcpus_current)
        if rendered.os.machine == "q35":
            assert stored.os.machine.startswith("pc-q35-")
            assert free_root_ports(stored) == SPARE_ROOT_PORTS
        else:
            assert stored.os.machine.startswith("pc-i440fx-")
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def test_memory_hot_add_needs_a_numa_cell_on_libvirt_9_0(libvirt_nodes):
    """Why render_domain writes a NUMA cell: without one libvirt 9.0 refuses maxMemory."""
    rendered = render(SPECS["hot-add"], "qemu")
    rendered.cpu = None
    with pytest.raises(libvirt.libvirtError, match="numa node has to be configured"):
        libvirt_nodes[0].connect().defineXMLFlags(rendered.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)


def addresses(dom: DomainConfig) -> dict[str, str]:
    found = {}
    for element in dom.devices.element:
        alias, address = element.find("alias"), element.find("address")
        if alias is not None and address is not None and alias.get("name").startswith("ua-"):
            found[alias.get("name")] = ET.tostring(address, encoding="unicode").strip()
    return found


def test_redefinition_keeps_device_addresses(libvirt_nodes):
    nics = [{"name": "a", "type": "user"}, {"name": "b", "type": "user", "model": "e1000"}]
    before_spec = {"memory": {"size": "256Mi"}, "disks": DISKS[:1] + DISKS[3:4], "interfaces": nics}
    after_spec = {**before_spec, "disks": [*before_spec["disks"], {"name": "more", "path": "/images/more.qcow2"}],
                  "interfaces": [{"name": "first", "type": "user"}, *nics]}
    conn = libvirt_nodes[0].connect()
    first = render(before_spec, "qemu")
    dom = conn.defineXMLFlags(first.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        stored = DomainConfig.from_xml(dom.XMLDesc(0))
        old = addresses(stored)

        def redefine(carry: bool) -> dict[str, str]:
            desired = render(after_spec, "qemu", vm_name=first.operator_metadata.vm_name)
            desired.uuid, desired.name = first.uuid, first.name
            if carry:
                assert carry_over_addresses(desired, stored) >= len(old)
            return addresses(DomainConfig.from_xml(conn.defineXML(desired.to_xml()).XMLDesc(0)))

        moved = redefine(carry=False)
        assert any(moved[alias] != old[alias] for alias in old)  # what a plain redefinition does
        conn.defineXML(stored.to_xml())
        kept = redefine(carry=True)
        assert {alias: kept[alias] for alias in old} == old
        assert {"ua-nic-first", "ua-disk-more"} <= set(kept)  # new devices got addresses of their own
    finally:
        dom.undefine()


@pytest.fixture
def running_guest(libvirt_nodes, guest_image, storage_dir):
    """The test guest rendered from a spec with hot-add ceilings, a disk and a NIC, started."""
    name = f"dx-run-{uuid.uuid4().hex[:8]}"
    root = storage_dir / f"{name}-root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root), "64M"], check=True)
    spec = {
        "cpu": {"vcpus": 1, "maxVcpus": 2},
        "memory": {"size": "256Mi", "maxSize": "1Gi"},
        "boot": {"kernel": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                            "cmdline": guest_image.cmdline}},
        "disks": [{"name": "root", "path": str(root)}],
        "interfaces": [{"name": "eth0", "type": "user"}],
    }
    console_log = storage_dir / f"{name}.console.log"
    rendered = render(spec, "qemu", console_log=str(console_log), vm_name=name)
    conn = libvirt_nodes[0].connect()
    dom = conn.defineXMLFlags(rendered.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.create()
    try:
        yield dom, console_log, storage_dir / name
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def wait_agent_connected(dom: libvirt.virDomain, timeout: float = 60.0) -> DomainConfig:
    deadline = time.monotonic() + timeout
    while True:
        live = DomainConfig.from_xml(dom.XMLDesc(0))
        if live.devices.channels[0].agent_connected:
            return live
        assert time.monotonic() < deadline, "guest agent channel never connected"
        time.sleep(0.2)


def test_rendered_guest_runs(running_guest, guest_image):
    dom, console_log, _ = running_guest
    wait_for_marker(console_log, guest_image.ready_marker)  # serial console logged via <log file>
    live = wait_agent_connected(dom)
    assert live.id is not None
    assert live.devices.serials[0].source_path.startswith("/dev/pts/")
    assert {d.alias for d in live.devices.disks} == {"ua-disk-root"}
    assert live.devices.by_alias("ua-nic-eth0").type == "user"


def test_hot_add_memory_vcpus_and_disk(running_guest, guest_image):
    dom, console_log, prefix = running_guest
    wait_for_marker(console_log, guest_image.ready_marker)
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.attachDeviceFlags(
        "<memory model='dimm'><target><size unit='MiB'>256</size><node>0</node></target></memory>", live)
    dom.setVcpusFlags(2, live)
    data = Path(f"{prefix}-data.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "16M"], check=True)
    dom.attachDeviceFlags(  # lands on a spare root port
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{data}'/>"
        "<target dev='vdb' bus='virtio'/><alias name='ua-disk-data'/></disk>", live)
    after = DomainConfig.from_xml(dom.XMLDesc(0))
    assert after.memory_kib == 512 * 1024
    assert after.vcpus_online == 2
    assert after.devices.by_alias("ua-disk-data").target_dev == "vdb"
