"""FEATURES D1-D10: a running VM follows its spec live, proven from inside the guest (qemu-ga
guest-exec), with the same QEMU process before and after; what cannot change live is reported."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest

from localenv.guest import make_iso
from tests.e2e.vmtools import condition, guest_run, manifest, qemu_pid, wait_guest

MiB = 1 << 20


def image(cluster, name: str, size: str = "64M", fmt: str = "qcow2", pattern: bytes | None = None) -> Path:
    path = cluster.storage_dir / "images" / name
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    if pattern is not None:
        raw = path.with_suffix(".raw-src")
        raw.write_bytes(pattern + b"\0" * (4096 - len(pattern)))
        subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", fmt, f"if={raw}", f"of={path}", "bs=4096",
                        "count=1"], check=True, capture_output=True)
        raw.unlink()
        if fmt == "qcow2":  # qemu-img dd recreates the image at the source's size
            subprocess.run(["qemu-img", "resize", "-q", str(path), size], check=True)
    return path


def iso(cluster, name: str, label: str) -> Path:
    return make_iso(cluster.storage_dir / "images" / name, label)


def boot(vms, cluster, name, **spec):
    vm = vms.create(manifest(cluster, name, **spec))
    vm = vms.wait(name, lambda v: condition(v, "Ready").get("status") == "True", "Ready", 90)
    vms.wait(name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 90)
    dom = vms.domain(vm)
    return vm, dom, qemu_pid(vm["metadata"]["uid"])


def applied(vms, name, gen_after_patch: int, timeout: float = 90) -> dict:
    """Waits until the running domain matches the patched generation (Ready True for it)."""
    return vms.wait(name, lambda v: (v["status"].get("observedGeneration") or 0) >= gen_after_patch
                    and condition(v, "Ready").get("status") == "True", f"generation {gen_after_patch} applied",
                    timeout)


def patch(vms, name, spec) -> int:
    return vms.patch_spec(name, spec)["metadata"]["generation"]


def test_D2_D3_vcpus_and_memory_hot_add(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name, cpu={"vcpus": 1, "maxVcpus": 3},
                        memory={"size": "192Mi", "maxSize": "448Mi"})
    before = int(guest_run(dom, "awk '/MemTotal/ {print $2}' /proc/meminfo"))
    gen = patch(vms, vm_name, {"cpu": {"vcpus": 3, "maxVcpus": 3}, "memory": {"size": "320Mi", "maxSize": "448Mi"}})
    vm = applied(vms, vm_name, gen)
    assert vm["status"]["vcpus"] == 3 and vm["status"]["memory"] == "320Mi"
    wait_guest(dom, "cat /sys/devices/system/cpu/online", lambda o: o.strip() == "0-2", "3 CPUs online")
    after = int(wait_guest(dom, "awk '/MemTotal/ {print $2}' /proc/meminfo",
                           lambda o: o.strip().isdigit() and int(o) >= before + 128 * 1024 - 4096, "MemTotal +128Mi"))
    assert after - before >= 128 * 1024 - 4096
    assert qemu_pid(vm["metadata"]["uid"]) == pid
    # memory back down: the hot-added DIMM is unplugged live
    gen = patch(vms, vm_name, {"memory": {"size": "192Mi", "maxSize": "448Mi"}})
    applied(vms, vm_name, gen)
    wait_guest(dom, "awk '/MemTotal/ {print $2}' /proc/meminfo",
               lambda o: o.strip().isdigit() and int(o) <= before + 4096, "MemTotal back")
    # fewer vCPUs cannot be applied live on this QEMU: reported, and written to the definition
    gen = patch(vms, vm_name, {"cpu": {"vcpus": 2, "maxVcpus": 3}})
    vm = vms.wait(vm_name, lambda v: condition(v, "RestartRequired").get("status") == "True", "RestartRequired")
    assert "cpu.vcpus" in condition(vm, "RestartRequired")["message"]
    assert vm["status"]["pendingRestart"] == ["cpu.vcpus"]
    assert condition(vm, "Ready")["status"] == "False" and vm["status"]["observedGeneration"] < gen
    assert "current='2'" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace('"', "'")
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_restart_request_applies_what_needs_a_restart(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name, cpu={"vcpus": 2, "maxVcpus": 2})
    patch(vms, vm_name, {"cpu": {"vcpus": 2, "maxVcpus": 3}})
    vms.wait(vm_name, lambda v: condition(v, "RestartRequired").get("status") == "True", "RestartRequired")
    gen = patch(vms, vm_name, {"restart": {"id": "r1"}})
    vm = vms.wait(vm_name, lambda v: (v["status"].get("lastRestart") or {}).get("result") == "Succeeded",
                  "restart r1 done", 120)
    vm = applied(vms, vm_name, gen)
    assert condition(vm, "RestartRequired") == {} and vm["status"].get("pendingRestart") is None
    dom = vms.domain(vm)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM | libvirt.VIR_DOMAIN_AFFECT_LIVE) == 3
    assert qemu_pid(vm["metadata"]["uid"]) != pid
    assert any(e.reason == "Restarted" for e in vms.events(vm_name))


@pytest.mark.parametrize("bus", ["virtio", "scsi", "usb"])
def test_D4_D8_disk_attach_and_detach(vms, cluster, vm_name, bus):
    vm, dom, pid = boot(vms, cluster, vm_name)
    marker = f"LVO-DATA-{bus}".encode()
    path = image(cluster, f"{vm_name}.qcow2", pattern=marker)
    gen = patch(vms, vm_name, {"disks": [{"name": "data", "path": str(path), "bus": bus}]})
    vm = applied(vms, vm_name, gen)
    disk = next(d for d in vm["status"]["disks"] if d["name"] == "data")
    dev = "vda" if bus == "virtio" else "sda"
    assert disk["target"] == dev and disk["bus"] == bus and disk["path"] == str(path)
    wait_guest(dom, "ls /sys/block", lambda o: dev in o.split(), f"{dev} in the guest")
    assert marker.decode() in guest_run(dom, f"dd if=/dev/{dev} bs=64 count=1 2>/dev/null | head -c {len(marker)}")
    gen = patch(vms, vm_name, {"disks": []})
    vm = applied(vms, vm_name, gen)
    wait_guest(dom, "ls /sys/block", lambda o: dev not in o.split(), f"{dev} gone from the guest")
    assert vm["status"].get("disks") in (None, [])
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_D5_D6_nic_attach_and_detach(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name)
    links = guest_run(dom, "ls /sys/class/net").split()
    gen = patch(vms, vm_name, {"interfaces": [{"name": "nic0", "type": "user", "mac": "52:54:00:aa:bb:01"}]})
    vm = applied(vms, vm_name, gen)
    assert vm["status"]["interfaces"][0]["mac"] == "52:54:00:aa:bb:01"
    out = wait_guest(dom, "ip -o link", lambda o: "52:54:00:aa:bb:01" in o, "the NIC in the guest")
    new = next(line.split(":")[1].strip() for line in out.splitlines() if "52:54:00:aa:bb:01" in line)
    assert new not in links and "UP" in guest_run(dom, f"ip -o link show {new}")
    gen = patch(vms, vm_name, {"interfaces": []})
    applied(vms, vm_name, gen)
    wait_guest(dom, "ip -o link", lambda o: "52:54:00:aa:bb:01" not in o, "the NIC gone")
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_D5_passthrough_without_vfio_is_reported_and_nothing_else_changes(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name)
    patch(vms, vm_name, {"interfaces": [{"name": "vf0", "type": "hostdev", "pciAddress": "0000:3b:02.1"}],
                         "hostDevices": [{"name": "key", "type": "usb", "vendor": "0x0781", "product": "0x5567"}]})
    vm = vms.wait(vm_name, lambda v: condition(v, "HostDeviceUnavailable").get("status") == "True",
                  "HostDeviceUnavailable")
    msg = condition(vm, "HostDeviceUnavailable")["message"]
    assert "interfaces[vf0]" in msg and "hostDevices[key]" in msg
    assert condition(vm, "Ready")["reason"] == "HostDeviceUnavailable" and vm["status"]["phase"] == "Running"
    assert dom.isActive() and qemu_pid(vm["metadata"]["uid"]) == pid
    assert "<hostdev" not in dom.XMLDesc(0)


def test_D7_cdrom_insert_change_eject(vms, cluster, vm_name):
    a, b = iso(cluster, f"{vm_name}-a.iso", "LVOMEDIAA"), iso(cluster, f"{vm_name}-b.iso", "LVOMEDIAB")
    vm, dom, pid = boot(vms, cluster, vm_name, disks=[{"name": "cd", "device": "cdrom"}])
    label = "dd if=/dev/sr0 bs=1 skip=32808 count=32 2>/dev/null"
    for path, want in ((a, "LVOMEDIAA"), (b, "LVOMEDIAB")):
        gen = patch(vms, vm_name, {"disks": [{"name": "cd", "device": "cdrom", "path": str(path)}]})
        vm = applied(vms, vm_name, gen)
        assert vm["status"]["disks"][0]["path"] == str(path)
        wait_guest(dom, label, lambda o, w=want: w in o, f"volume label {want}")
    gen = patch(vms, vm_name, {"disks": [{"name": "cd", "device": "cdrom"}]})
    vm = applied(vms, vm_name, gen)
    assert "path" not in vm["status"]["disks"][0]
    wait_guest(dom, f"{label} || echo nomedia", lambda o: "LVOMEDIA" not in o, "no media")
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_D9_grow_online_and_D10_shrink_refused(vms, cluster, vm_name):
    path = image(cluster, f"{vm_name}.qcow2", size="64M")
    vm, dom, pid = boot(vms, cluster, vm_name, disks=[{"name": "data", "path": str(path), "size": "64Mi"}])
    sectors = lambda: int(guest_run(dom, "cat /sys/block/vda/size"))  # noqa: E731
    assert sectors() * 512 == 64 * MiB
    gen = patch(vms, vm_name, {"disks": [{"name": "data", "path": str(path), "size": "96Mi"}]})
    vm = applied(vms, vm_name, gen)
    assert vm["status"]["disks"][0]["capacityBytes"] == 96 * MiB
    wait_guest(dom, "cat /sys/block/vda/size", lambda o: int(o) * 512 == 96 * MiB, "96Mi in the guest")
    from kubernetes.client.exceptions import ApiException
    with pytest.raises(ApiException) as refused:
        patch(vms, vm_name, {"disks": [{"name": "data", "path": str(path), "size": "32Mi"}]})
    assert refused.value.status == 422 and "cannot shrink" in refused.value.body
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_D10_the_agent_never_shrinks_a_disk_bigger_than_its_spec(vms, cluster, vm_name):
    path = image(cluster, f"{vm_name}.qcow2", size="96M")
    vms.create(manifest(cluster, vm_name, disks=[{"name": "data", "path": str(path), "size": "64Mi"}]))
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("reason") == "ShrinkRefused", "ShrinkRefused", 90)
    assert "never shrunk" in condition(vm, "Failure")["message"]
    assert vms.domain(vm).blockInfo("vda")[0] == 96 * MiB


def test_D1_vcpu_and_emulator_pinning(vms, cluster, vm_name):
    import os
    if os.cpu_count() < 2:
        pytest.skip("pinning needs two host CPUs")
    vm, dom, pid = boot(vms, cluster, vm_name, cpu={"vcpus": 2, "maxVcpus": 2})
    gen = patch(vms, vm_name, {"cpu": {"vcpus": 2, "maxVcpus": 2, "pinning": {
        "vcpus": [{"vcpu": 0, "cpuset": "1"}, {"vcpu": 1, "cpuset": "0"}], "emulator": "1"}}})
    vm = applied(vms, vm_name, gen)
    assert dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[0][:2] == (False, True)
    assert dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[1][:2] == (True, False)
    assert dom.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[:2] == (False, True)
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith("CPU ") and "/" in name:
            status = (task / "status").read_text()
            threads[int(name.split()[1].split("/")[0])] = next(
                line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    assert threads == {0: "1", 1: "0"}
    assert qemu_pid(vm["metadata"]["uid"]) == pid
