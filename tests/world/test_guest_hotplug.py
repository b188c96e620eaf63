"""The test guest sees every live change from inside, with raw libvirt on a domain rendered
like the operator renders it (q35, spare root ports, qemu-xhci, virtio-scsi, ua- aliases).

Each proof comes from inside the guest (qemu-ga guest-exec) or from QEMU's threads, and the
QEMU process is the same before and after: nothing here restarts the domain.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import naming, render_domain
from localenv.fixtures_libvirt import wait_for_marker
from localenv.guest import (
    guest_exec,
    guest_sh,
    make_iso,
    qemu_pid,
    thread_affinity,
    vcpu_thread_affinity,
    wait_in_guest,
)

pytestmark = pytest.mark.world

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
BOOT_TIMEOUT = 180.0
BLOCK_KIB = 128 * 1024  # the guest's memory block: the smallest DIMM it can online
ISO_LABEL_AT = 32808  # ISO 9660 primary volume descriptor (sector 16) + 40: the 32-byte volume label


class Running:
    """A started guest rendered from a spec; remembers its QEMU pid."""

    def __init__(self, dom: libvirt.virDomain, prefix: Path):
        self.dom, self.prefix = dom, prefix
        self.pid = qemu_pid(dom.UUIDString())
        assert self.pid is not None

    def same_qemu(self) -> None:
        assert self.dom.isActive() and qemu_pid(self.dom.UUIDString()) == self.pid

    def sh(self, script: str) -> str:
        return guest_sh(self.dom, script)

    def wait(self, script: str, expect, timeout: float = 60.0) -> str:
        return wait_in_guest(self.dom, script, expect, timeout)

    def aliases(self) -> set[str]:
        return set(re.findall(r"<alias name='([^']+)'/>", self.dom.XMLDesc(0)))


def boot_rendered(conn: libvirt.virConnect, guest_image, storage_dir: Path, name: str, **spec) -> Running:
    prefix = storage_dir / name
    root = Path(f"{prefix}-root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root), "64M"], check=True)
    iso = make_iso(Path(f"{prefix}-first.iso"), "LVOFIRST")
    full = {
        "cpu": {"vcpus": 1, "maxVcpus": 3},
        "memory": {"size": "256Mi", "maxSize": "1Gi"},
        "boot": {"kernel": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                            "cmdline": guest_image.cmdline}},
        "disks": [{"name": "root", "path": str(root)}, {"name": "cd", "device": "cdrom", "path": str(iso)}],
        "interfaces": [{"name": "eth0", "type": "user"}],
        **spec,
    }
    console_log = Path(f"{prefix}.console.log")
    rendered = render_domain(VirtualMachineSpec.model_validate(full), name=name, uuid=str(uuid.uuid4()),
                             namespace="test", vm_name=name, generation=1, domain_type="qemu",
                             console_log=str(console_log))
    dom = conn.defineXMLFlags(rendered.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    dom.create()
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    wait_in_guest(dom, "true", lambda _: True, timeout=60)  # the agent answers
    return Running(dom, prefix)


def remove(dom: libvirt.virDomain) -> None:
    if dom.isActive():
        dom.destroy()
    dom.undefine()


@pytest.fixture(scope="module")
def conn(libvirt_nodes):
    c = libvirt_nodes[0].connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def guest(conn, guest_image, storage_dir):
    """One running guest shared by the tests that leave it healthy."""
    running = boot_rendered(conn, guest_image, storage_dir, f"hp-{uuid.uuid4().hex[:8]}")
    yield running
    remove(running.dom)


def wait_gone(running: Running, alias: str, timeout: float = 30.0) -> None:
    """Detach is asynchronous: wait until the alias leaves the live XML."""
    deadline = time.monotonic() + timeout
    while alias in running.aliases():
        assert time.monotonic() < deadline, f"{alias} still in the live XML after {timeout} s"
        time.sleep(0.2)


def mem_total_kib(running: Running) -> int:
    return int(re.search(r"MemTotal:\s+(\d+) kB", running.sh("cat /proc/meminfo")).group(1))


# -- the guest image ---------------------------------------------------------------------------


def test_guest_has_the_hotplug_drivers_and_agent_commands(guest):
    modules = guest.sh("cat /proc/modules")
    for module in ("virtio_scsi", "sd_mod", "xhci_pci", "usb_storage", "ahci", "sr_mod", "isofs"):
        assert re.search(rf"^{module} ", modules, re.M), module
    assert "memhp_default_state=online_movable" in guest.sh("cat /proc/cmdline")
    info = guest_exec(guest.dom, ["/bin/cat", "/sys/devices/system/memory/block_size_bytes"])
    assert int(info.stdout, 16) == BLOCK_KIB * 1024


# -- vCPUs -------------------------------------------------------------------------------------


def test_hot_added_vcpus_come_online(guest):
    assert guest.sh("cat /sys/devices/system/cpu/online").strip() == "0"
    guest.dom.setVcpusFlags(2, LIVE)
    guest.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() == "0-1")
    guest.dom.setVcpusFlags(3, LIVE)
    guest.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() == "0-2")
    assert guest.dom.vcpusFlags(LIVE) == 3
    guest.same_qemu()


def test_guest_agent_offlines_and_onlines_vcpus_without_unplug(guest):
    """The soft decrease: VCPU_GUEST offlines CPUs in the guest; the vCPUs stay plugged."""
    guest.dom.setVcpusFlags(3, LIVE)
    guest.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() == "0-2")
    guest.dom.setVcpusFlags(1, libvirt.VIR_DOMAIN_VCPU_GUEST)
    assert guest.sh("cat /sys/devices/system/cpu/online /sys/devices/system/cpu/present").split() == ["0", "0-2"]
    assert guest.dom.vcpusFlags(LIVE) == 3
    guest.dom.setVcpusFlags(3, libvirt.VIR_DOMAIN_VCPU_GUEST)
    assert guest.sh("cat /sys/devices/system/cpu/online").strip() == "0-2"
    guest.same_qemu()


def test_live_vcpu_unplug_is_ejected_by_the_guest_but_libvirt_never_learns_it(conn, guest_image, storage_dir):
    """QEMU 7.2 reports the unplug only for the vCPU's lapic, so libvirt 9.0 times out and keeps
    counting the vCPU. If this starts failing, live vCPU unplug may have become usable."""
    running = boot_rendered(conn, guest_image, storage_dir, f"hp-unplug-{uuid.uuid4().hex[:8]}")
    try:
        running.dom.setVcpusFlags(2, LIVE)
        running.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() == "0-1")
        with pytest.raises(libvirt.libvirtError, match="vcpu unplug request timed out") as caught:
            running.dom.setVcpusFlags(1, LIVE)
        assert caught.value.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
        running.wait("cat /sys/devices/system/cpu/present", lambda out: out.strip() == "0")  # ejected
        assert running.dom.vcpusFlags(LIVE) == 2  # libvirt still counts it
        running.same_qemu()
    finally:
        remove(running.dom)


def test_vcpu_and_emulator_pinning_reach_qemu_threads(guest):
    host_cpus = guest.dom.connect().getCPUMap(0)[0]
    if host_cpus < 2:
        pytest.fail("pinning proofs need a host with at least 2 CPUs")
    if guest.dom.vcpusFlags(LIVE) < 2:  # never fewer: a live decrease would be an unplug
        guest.dom.setVcpusFlags(2, LIVE)
    guest.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() in ("0-1", "0-2"))
    only = lambda cpu: tuple(i == cpu for i in range(host_cpus))  # noqa: E731
    guest.dom.pinVcpuFlags(0, only(1), LIVE)
    guest.dom.pinVcpuFlags(1, only(0), LIVE)
    guest.dom.pinEmulator(only(0), LIVE)
    assert guest.dom.vcpuPinInfo(LIVE)[:2] == [only(1), only(0)]
    assert guest.dom.emulatorPinInfo(LIVE) == only(0)
    threads = vcpu_thread_affinity(guest.pid)
    assert (threads[0], threads[1]) == ("1", "0")
    assert thread_affinity(guest.pid) == "0"  # QEMU's main thread is an emulator thread
    everything = tuple(True for _ in range(host_cpus))
    guest.dom.pinVcpuFlags(0, everything, LIVE)
    guest.dom.pinEmulator(everything, LIVE)
    assert vcpu_thread_affinity(guest.pid)[0] == f"0-{host_cpus - 1}"
    guest.same_qemu()


# -- memory ------------------------------------------------------------------------------------


def dimm(kib: int, alias: str) -> str:
    return (f"<memory model='dimm'><target><size unit='KiB'>{kib}</size><node>0</node></target>"
            f"<alias name='{alias}'/></memory>")


def test_dimm_hot_add_onlines_movable_and_unplugs(guest):
    before = mem_total_kib(guest)
    guest.dom.attachDeviceFlags(dimm(BLOCK_KIB, naming.dimm_alias(0)), LIVE)
    guest.wait("cat /proc/meminfo", lambda out: f"{before + BLOCK_KIB} kB" in out)
    zones = guest.sh("cat /sys/devices/system/memory/memory*/valid_zones")
    assert "Movable" in zones.split()
    guest.dom.detachDeviceAlias(naming.dimm_alias(0), LIVE)
    wait_gone(guest, naming.dimm_alias(0))
    guest.wait("cat /proc/meminfo", lambda out: f"{before} kB" in out)
    guest.same_qemu()


def test_dimm_sizes_below_or_off_the_memory_block_are_not_usable(guest):
    with pytest.raises(libvirt.libvirtError, match="multiple of 0x200000"):
        guest.dom.attachDeviceFlags(dimm(1024, "ua-dimm-odd1"), LIVE)
    before = mem_total_kib(guest)
    guest.dom.attachDeviceFlags(dimm(64 * 1024, "ua-dimm-odd64"), LIVE)  # QEMU takes it ...
    guest.wait("dmesg", lambda out: "add_memory failed" in out)  # ... the guest cannot online it
    assert mem_total_kib(guest) == before
    guest.dom.detachDeviceAlias("ua-dimm-odd64", LIVE)
    wait_gone(guest, "ua-dimm-odd64")
    guest.same_qemu()


# -- disks, NICs -------------------------------------------------------------------------------


def pattern_disk(path: Path, marker: bytes, size: int = 4 << 20) -> Path:
    path.write_bytes((marker * (size // len(marker) + 1))[:size])
    return path


FIND_MARKER = "for b in /sys/block/*; do echo ${b##*/} $(dd if=/dev/${b##*/} bs=16 count=1 2>/dev/null); done"


@pytest.mark.parametrize(("bus", "target"), [("virtio", "vdb"), ("scsi", "sdb"), ("usb", "sdc")])
def test_disk_hot_plug_appears_reads_and_goes(guest, bus, target):
    marker = f"LVO-{bus.upper()}-DISK-".encode()[:16].ljust(16, b"-")
    image = pattern_disk(Path(f"{guest.prefix}-{bus}.raw"), marker)
    alias = naming.disk_alias(f"hot-{bus}")
    guest.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>"
        f"<target dev='{target}' bus='{bus}'/><alias name='{alias}'/></disk>", LIVE)
    listing = guest.wait(FIND_MARKER, lambda out: marker.decode() in out)
    device = next(line.split()[0] for line in listing.splitlines() if marker.decode() in line)
    # the whole disk reads back as written: its last 16 bytes too
    size = int(guest.sh(f"cat /sys/block/{device}/size")) * 512
    assert size == image.stat().st_size
    tail = guest.sh(f"dd if=/dev/{device} bs=16 skip={size // 16 - 1} count=1 2>/dev/null")
    assert tail.encode() == image.read_bytes()[-16:]
    guest.dom.detachDeviceAlias(alias, LIVE)
    wait_gone(guest, alias)
    guest.wait("ls /sys/block", lambda out: device not in out.split())
    guest.same_qemu()


def test_nic_hot_plug_comes_up_and_goes(guest):
    alias = naming.nic_alias("hot")
    mac = "52:54:00:aa:bb:01"
    guest.dom.attachDeviceFlags(
        f"<interface type='user'><mac address='{mac}'/><model type='virtio'/><alias name='{alias}'/></interface>", LIVE)
    # brought up by the uevent helper (a moment after it appears)
    guest.wait("ip -o link", lambda out: any(mac in line and re.search(r"[<,]UP[,>]", line)
                                             for line in out.splitlines()))
    guest.dom.detachDeviceAlias(alias, LIVE)
    wait_gone(guest, alias)
    guest.wait("ip -o link", lambda out: mac not in out)
    guest.same_qemu()


def test_online_disk_grow_is_seen_by_the_guest(guest):
    assert guest.sh("cat /sys/block/vda/size").strip() == str(64 * 2048)
    guest.dom.blockResize("vda", 96 << 20, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    guest.wait("cat /sys/block/vda/size", lambda out: out.strip() == str(96 * 2048))
    assert guest.dom.blockInfo("vda", 0)[0] == 96 << 20
    guest.same_qemu()


# -- CD-ROM ------------------------------------------------------------------------------------


def cdrom_xml(running: Running, source: Path | None) -> str:
    """The CD-ROM drive as in the live XML, with another medium (or none)."""
    alias = naming.disk_alias("cd")
    target = re.search(rf"<target dev='(\w+)' bus='sata'/>.*?<alias name='{alias}'/>", running.dom.XMLDesc(0), re.S)
    src = f"<source file='{source}'/>" if source else ""
    return (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{src}"
            f"<target dev='{target.group(1)}' bus='sata'/><readonly/><alias name='{alias}'/></disk>")


READ_LABEL = f"dd if=/dev/sr0 bs=1 skip={ISO_LABEL_AT} count=32 2>/dev/null"


def test_sata_cdrom_change_eject_insert(guest):
    assert guest.sh("ls /sys/block").split().count("sr0") == 1
    assert guest.wait(READ_LABEL, lambda out: out.strip() == "LVOFIRST")
    second = make_iso(Path(f"{guest.prefix}-second.iso"), "LVOSECOND")
    guest.dom.updateDeviceFlags(cdrom_xml(guest, second), LIVE)  # straight from one medium to another
    # the first read after a change can fail (unit attention): wait_in_guest retries
    guest.wait(READ_LABEL, lambda out: out.strip() == "LVOSECOND")
    guest.dom.updateDeviceFlags(cdrom_xml(guest, None), LIVE)  # eject
    assert f"source file='{second}'" not in guest.dom.XMLDesc(0)
    guest.wait(f"{READ_LABEL} || echo NOMEDIUM", lambda out: out.strip() in ("", "NOMEDIUM"))
    third = make_iso(Path(f"{guest.prefix}-third.iso"), "LVOTHIRD")
    guest.dom.updateDeviceFlags(cdrom_xml(guest, third), LIVE)  # insert
    guest.wait(READ_LABEL, lambda out: out.strip() == "LVOTHIRD")
    guest.same_qemu()
