"""Guest's live-update methods against a real libvirtd + QEMU (TCG) node and the test guest:
each change is proven from inside the guest (or on QEMU's threads), its event arrives through
Host, and the QEMU process stays the same. Also: which events hand-made changes (virsh) emit,
so the agent can notice drift."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import OperatorMetadata, naming, render_domain
from libvirt_operator.hypervisor import Host, HypervisorError
from localenv.fixtures_libvirt import wait_for_marker
from localenv.guest import BUILD_SCRIPT, make_iso, qemu_pid, thread_affinity, vcpu_thread_affinity

from .hypervisor_support import EventLog, domain_event, run

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 180.0
GUEST_HOTPLUG = BUILD_SCRIPT.parent / "guest" / "hotplug"
READ_LABEL = "dd if=/dev/sr0 bs=1 skip=32808 count=32 2>/dev/null"


class Live:
    """The running guest of this module: its Guest, event log, QEMU pid and files."""

    def __init__(self, guest, log: EventLog, prefix: Path, uri: str):
        self.guest, self.log, self.prefix, self.uri = guest, log, prefix, uri
        self.pid = qemu_pid(guest.uuid)
        assert self.pid is not None

    def same_qemu(self) -> None:
        assert qemu_pid(self.guest.uuid) == self.pid

    def sh(self, script: str) -> str:
        result = run(self.guest.guest_exec(["/bin/sh", "-c", script]))
        assert result.exit_code == 0, result
        return result.stdout

    def wait(self, script: str, expect, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            result = run(self.guest.guest_exec(["/bin/sh", "-c", script]))
            if result.exit_code == 0 and expect(result.stdout):
                return result.stdout
            assert time.monotonic() < deadline, f"{script!r}: last result {result}"
            time.sleep(0.3)

    def event(self, kind: str, mark: int, match=lambda e: True, timeout: float = 30.0):
        return run(self.log.wait_for(lambda e: domain_event(self.guest.uuid, kind)(e) and match(e),
                                     timeout=timeout, after=mark))

    def virsh(self, *args: str) -> str:
        done = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def host(libvirt_nodes):
    h = Host(libvirt_nodes[0].uri)
    run(h.connect())
    yield h
    run(h.close())


@pytest.fixture(scope="module")
def live(host, libvirt_nodes, guest_image, storage_dir):
    name = f"hvl-{uuid.uuid4().hex[:8]}"
    prefix = storage_dir / name
    root = Path(f"{prefix}-root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root), "64M"], check=True)
    iso = make_iso(Path(f"{prefix}-first.iso"), "LVOFIRST")
    spec = {
        "cpu": {"vcpus": 1, "maxVcpus": 2},
        "memory": {"size": "256Mi", "maxSize": "1Gi"},
        "boot": {"kernel": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                            "cmdline": guest_image.cmdline}},
        "disks": [{"name": "root", "path": str(root)}, {"name": "cd", "device": "cdrom", "path": str(iso)}],
        "interfaces": [{"name": "eth0", "type": "user"}],
    }
    console_log = Path(f"{prefix}.console.log")
    rendered = render_domain(VirtualMachineSpec.model_validate(spec), name=name, uuid=str(uuid.uuid4()),
                             namespace="test", vm_name=name, generation=1, domain_type="qemu",
                             console_log=str(console_log))
    log = EventLog()
    unsubscribe = host.subscribe(log)
    guest = run(host.define(rendered.to_xml()))
    try:
        run(guest.start())
        wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
        deadline = time.monotonic() + 60
        while not run(guest.agent_ping(1)):
            assert time.monotonic() < deadline, "guest agent did not answer"
            time.sleep(0.2)
        yield Live(guest, log, prefix, libvirt_nodes[0].uri)
    finally:
        unsubscribe()
        conn = libvirt.open(libvirt_nodes[0].uri)
        dom = conn.lookupByUUIDString(guest.uuid)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()


# -- inside the guest --------------------------------------------------------------------------


def test_guest_exec_returns_exit_code_and_both_streams(live):
    result = run(live.guest.guest_exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.guest_exec(["/bin/sleep", "30"], timeout=1))
    assert caught.value.reason == "GuestExecTimeout"
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.guest_exec(["/no/such/program"]))
    assert caught.value.reason == "GuestExecFailed"


def test_guest_read_file_returns_the_exact_bytes(live):
    assert run(live.guest.guest_read_file("/sbin/hotplug")) == GUEST_HOTPLUG.read_bytes()
    cmdline = run(live.guest.guest_read_file("/proc/cmdline")).decode()
    assert "memhp_default_state=online_movable" in cmdline
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.guest_read_file("/no/such/file"))
    assert caught.value.reason == "GuestFileFailed"


# -- vCPUs and pinning -------------------------------------------------------------------------


def test_set_vcpus_hot_adds_and_guest_vcpus_offline_softly(live):
    run(live.guest.set_vcpus(2))
    live.wait("cat /sys/devices/system/cpu/online", lambda out: out.strip() == "0-1")
    run(live.guest.set_guest_vcpus(1))
    assert live.sh("cat /sys/devices/system/cpu/online").strip() == "0"
    run(live.guest.set_guest_vcpus(2))
    assert live.sh("cat /sys/devices/system/cpu/online").strip() == "0-1"
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.set_vcpus(3))  # above maxVcpus
    assert caught.value.reason == "SetVcpusFailed"
    with pytest.raises(ValueError):
        run(live.guest.set_vcpus(2, live=False, config=False))
    live.same_qemu()


def test_pinning_reads_back_reaches_qemu_threads_and_emits_tunable(live):
    host_cpus = int(run(live.guest.call(lambda d: d.connect().getCPUMap(0)[0])))
    if host_cpus < 2:
        pytest.fail("pinning proofs need a host with at least 2 CPUs")
    everything = f"0-{host_cpus - 1}"
    mark = live.log.mark()
    run(live.guest.pin_vcpu(0, "1"))
    tunable = live.event("tunable", mark, lambda e: "cputune.vcpupin0" in e.info)
    assert tunable.info["cputune.vcpupin0"] == "1"
    run(live.guest.pin_emulator("0"))
    assert live.event("tunable", mark, lambda e: "cputune.emulatorpin" in e.info).info["cputune.emulatorpin"] == "0"
    assert run(live.guest.vcpu_pins())[0] == "1"
    assert run(live.guest.emulator_pin()) == "0"
    assert vcpu_thread_affinity(live.pid)[0] == "1"
    assert thread_affinity(live.pid) == "0"
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.pin_vcpu(0, f"0-{host_cpus}"))
    assert caught.value.reason == "InvalidCpuset"
    run(live.guest.pin_vcpu(0, everything))
    run(live.guest.pin_emulator(everything))
    assert run(live.guest.vcpu_pins())[0] == everything
    assert vcpu_thread_affinity(live.pid)[0] == everything
    live.same_qemu()


# -- memory ------------------------------------------------------------------------------------


def mem_total_kib(live: Live) -> int:
    return int(re.search(r"MemTotal:\s+(\d+) kB", live.sh("cat /proc/meminfo")).group(1))


def dimm(kib: int, alias: str) -> str:
    return (f"<memory model='dimm'><target><size unit='KiB'>{kib}</size><node>0</node></target>"
            f"<alias name='{alias}'/></memory>")


def test_dimm_attach_and_detach_with_events(live):
    before = mem_total_kib(live)
    alias = naming.dimm_alias(0)
    mark = live.log.mark()
    run(live.guest.attach_device(dimm(128 * 1024, alias)))
    # libvirt 9.0 names a DIMM in device-added by its memory backend ("mem" + alias), not its alias
    live.event("device-added", mark, lambda e: e.device == f"mem{alias}")
    live.wait("cat /proc/meminfo", lambda out: f"{before + 128 * 1024} kB" in out)
    mark = live.log.mark()
    run(live.guest.detach_device_alias(alias))
    live.event("device-removed", mark, lambda e: e.device == alias)
    live.wait("cat /proc/meminfo", lambda out: f"{before} kB" in out)
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.attach_device(dimm(1024, "ua-dimm-tiny")))
    assert caught.value.reason == "AttachFailed"
    live.same_qemu()


def test_set_memory_inflates_the_balloon_and_emits_balloon_change(live):
    before = mem_total_kib(live)
    mark = live.log.mark()
    run(live.guest.set_memory(200 * 1024))
    live.event("balloon-change", mark, lambda e: e.info["actual"] == 200 * 1024)
    live.wait("cat /proc/meminfo", lambda out: int(re.search(r"MemTotal:\s+(\d+)", out).group(1)) < before - 40000)
    run(live.guest.set_memory(256 * 1024))
    live.wait("cat /proc/meminfo", lambda out: f"{before} kB" in out)
    live.same_qemu()


# -- disks, NICs -------------------------------------------------------------------------------


def test_disk_and_nic_attach_detach_with_events(live):
    marker = b"LVO-HV-LIVE-DISK"
    image = Path(f"{live.prefix}-data.raw")
    image.write_bytes(marker * (1 << 16))
    alias = naming.disk_alias("data")
    mark = live.log.mark()
    run(live.guest.attach_device(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>"
        f"<target dev='vdb' bus='virtio'/><alias name='{alias}'/></disk>"))
    live.event("device-added", mark, lambda e: e.device == alias)
    live.wait("dd if=/dev/vdb bs=16 count=1 2>/dev/null", lambda out: out == marker.decode())
    mark = live.log.mark()
    run(live.guest.detach_device_alias(alias))
    live.event("device-removed", mark, lambda e: e.device == alias)
    live.wait("ls /sys/block", lambda out: "vdb" not in out.split())

    mac = "52:54:00:aa:bb:02"
    nic = (f"<interface type='user'><mac address='{mac}'/><model type='virtio'/>"
           f"<alias name='{naming.nic_alias('hot')}'/></interface>")
    run(live.guest.attach_device(nic))
    live.wait("ip -o link", lambda out: mac in out)
    mark = live.log.mark()
    run(live.guest.detach_device(nic))  # by its XML this time
    live.event("device-removed", mark, lambda e: e.device == naming.nic_alias("hot"))
    live.wait("ip -o link", lambda out: mac not in out)
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.detach_device_alias("ua-disk-absent"))
    assert caught.value.reason == "DetachFailed"
    live.same_qemu()


def test_block_resize_grows_refuses_shrink_and_block_info_follows(live):
    capacity, _allocation, _physical = run(live.guest.block_info("vda"))
    assert capacity == 64 << 20
    run(live.guest.block_resize("vda", 80 << 20))
    assert run(live.guest.block_info("vda"))[0] == 80 << 20
    live.wait("cat /sys/block/vda/size", lambda out: out.strip() == str(80 * 2048))
    with pytest.raises(HypervisorError) as caught:
        run(live.guest.block_resize("vda", 64 << 20))
    assert caught.value.reason == "ShrinkRefused"
    assert run(live.guest.block_info("vda"))[0] == 80 << 20
    live.same_qemu()


# -- CD-ROM ------------------------------------------------------------------------------------


def cdrom(source: Path | None) -> str:
    src = f"<source file='{source}'/>" if source else ""
    return (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{src}"
            f"<target dev='sda' bus='sata'/><readonly/><alias name='{naming.disk_alias('cd')}'/></disk>")


def test_update_device_changes_and_ejects_the_cdrom_with_tray_events(live):
    alias = naming.disk_alias("cd")
    assert re.search(rf"<target dev='sda' bus='sata'/>\s*<readonly/>\s*<alias name='{alias}'/>",
                     run(live.guest.xml())), "the rendered CD-ROM is sata sda"
    live.wait(READ_LABEL, lambda out: out.strip() == "LVOFIRST")
    second = make_iso(Path(f"{live.prefix}-second.iso"), "LVOSECOND")
    mark = live.log.mark()
    run(live.guest.update_device(cdrom(second)))
    opened = live.event("tray-change", mark, lambda e: e.event == libvirt.VIR_DOMAIN_EVENT_TRAY_CHANGE_OPEN)
    assert opened.device == alias
    live.event("tray-change", mark, lambda e: e.event == libvirt.VIR_DOMAIN_EVENT_TRAY_CHANGE_CLOSE)
    live.wait(READ_LABEL, lambda out: out.strip() == "LVOSECOND")
    run(live.guest.update_device(cdrom(None)))  # eject
    live.wait(f"{READ_LABEL} || echo NOMEDIUM", lambda out: out.strip() in ("", "NOMEDIUM"))
    run(live.guest.update_device(cdrom(second), force=True))
    live.wait(READ_LABEL, lambda out: out.strip() == "LVOSECOND")
    live.same_qemu()


# -- operator metadata -------------------------------------------------------------------------


def test_operator_metadata_live_update_and_event(live):
    stored = OperatorMetadata.from_api_xml(run(live.guest.operator_metadata()))
    assert stored.vm_name == live.guest.name and stored.generation == 1
    stored.generation = 2
    mark = live.log.mark()
    run(live.guest.set_operator_metadata(stored.to_api_xml()))  # live only
    changed = live.event("metadata-change", mark)
    assert changed.event == libvirt.VIR_DOMAIN_METADATA_ELEMENT
    assert OperatorMetadata.from_api_xml(run(live.guest.operator_metadata())).generation == 2
    assert OperatorMetadata.from_api_xml(run(live.guest.operator_metadata(live=False))).generation == 1
    run(live.guest.set_operator_metadata(stored.to_api_xml(), live=False, config=True))
    assert OperatorMetadata.from_api_xml(run(live.guest.operator_metadata(live=False))).generation == 2


# -- changes made by hand (drift) --------------------------------------------------------------


def test_hand_changes_emit_events(live):
    """What the agent can notice when someone uses virsh behind its back."""
    name = live.guest.name
    mark = live.log.mark()
    live.virsh("setmem", name, "230M", "--live")
    live.event("balloon-change", mark, lambda e: e.info["actual"] == 230 * 1024)
    live.virsh("vcpupin", name, "0", "1", "--live")
    live.event("tunable", mark, lambda e: e.info.get("cputune.vcpupin0") == "1")
    live.virsh("emulatorpin", name, "0", "--live")
    live.event("tunable", mark, lambda e: e.info.get("cputune.emulatorpin") == "0")
    live.virsh("change-media", name, "sda", "--eject", "--live")
    live.event("tray-change", mark, lambda e: e.device == naming.disk_alias("cd"))
    live.virsh("metadata", name, "--uri", "https://example.invalid/x", "--key", "x", "--set", "<x/>", "--live")
    live.event("metadata-change", mark, lambda e: e.info["nsuri"] == "https://example.invalid/x")
    image = Path(f"{live.prefix}-hand.raw")
    image.write_bytes(b"\0" * (1 << 20))
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>"
            f"<target dev='vdc' bus='virtio'/><alias name='ua-disk-hand'/></disk>")
    xml_file = Path(f"{live.prefix}-hand.xml")
    xml_file.write_text(disk)
    live.virsh("attach-device", name, str(xml_file), "--live")
    live.event("device-added", mark, lambda e: e.device == "ua-disk-hand")
    live.virsh("detach-device", name, str(xml_file), "--live")
    live.event("device-removed", mark, lambda e: e.device == "ua-disk-hand")
    live.same_qemu()
