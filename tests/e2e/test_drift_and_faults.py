"""Changes made behind the operator's back, and the faults of issue 7: each reaches status."""

from __future__ import annotations

import os
import signal

import libvirt
import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.test_live_devices import applied, boot, image, iso, patch
from tests.e2e.vmtools import condition, guest_run, manifest, qemu_pid, wait_guest

MiB = 1 << 20


def test_hand_setmem_is_put_back(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name, memory={"size": "192Mi"})
    dom.setMemoryFlags(128 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    vms.wait(vm_name, lambda v: any(e.reason == "DriftCorrected" for e in vms.events(vm_name)), "DriftCorrected")
    # the balloon deflates back to full size (the guest reports its actual size, a little under)
    vms.wait(vm_name, lambda _v: dom.info()[2] >= (192 - 8) * 1024, "the balloon back at 192Mi")
    vm = vms.wait(vm_name, lambda v: condition(v, "Ready").get("status") == "True", "Ready")
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_hand_detach_and_change_media_are_put_back(vms, cluster, vm_name):
    path = image(cluster, f"{vm_name}.qcow2")
    a, b = iso(cluster, f"{vm_name}-a.iso", "LVODRIFTA"), iso(cluster, f"{vm_name}-b.iso", "LVODRIFTB")
    vm, dom, pid = boot(vms, cluster, vm_name, disks=[{"name": "data", "path": str(path)},
                                                       {"name": "cd", "device": "cdrom", "path": str(a)}])
    dom.detachDeviceAlias("ua-disk-data", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    wait_guest(dom, "ls /sys/block", lambda o: "vda" in o.split(), "vda back in the guest", 60)
    dom.updateDeviceFlags(f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{b}'/>"
                          "<target dev='sda' bus='sata'/><readonly/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    label = "dd if=/dev/sr0 bs=1 skip=32808 count=32 2>/dev/null"
    wait_guest(dom, label, lambda o: "LVODRIFTA" in o, "the spec's media back", 60)
    vm = vms.wait(vm_name, lambda v: condition(v, "Ready").get("status") == "True", "Ready")
    assert next(d for d in vm["status"]["disks"] if d["name"] == "cd")["path"] == str(a)
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_hand_vcpu_change_that_cannot_be_undone_live_is_reported_drifted(vms, cluster, vm_name):
    _vm, dom, _pid = boot(vms, cluster, vm_name, cpu={"vcpus": 1, "maxVcpus": 2})
    dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    vm = vms.wait(vm_name, lambda v: condition(v, "Drifted").get("status") == "True", "Drifted", 60)
    assert "cpu.vcpus" in condition(vm, "Drifted")["message"]
    assert condition(vm, "RestartRequired") == {} and condition(vm, "Ready")["reason"] == "Drifted"


def test_admission_refuses_a_target_that_does_not_fit_its_bus_and_duplicate_macs(vms, cluster, vm_name):
    with pytest.raises(ApiException) as bad:
        vms.create(manifest(cluster, vm_name, disks=[{"name": "d", "path": "/x.qcow2", "target": "vda",
                                                      "bus": "sata"}]))
    assert bad.value.status == 422 and "does not fit the bus" in bad.value.body
    nics = [{"name": n, "type": "user", "mac": "52:54:00:00:00:09"} for n in ("a", "b")]
    with pytest.raises(ApiException) as dup:
        vms.create(manifest(cluster, vm_name, interfaces=nics))
    assert dup.value.status == 422 and "same MAC" in dup.value.body


def test_a_domain_that_libvirt_cannot_start_gets_a_condition(vms, cluster, vm_name):
    vms.create(manifest(cluster, vm_name, interfaces=[{"name": "n", "type": "bridge", "source": "lvo-no-such-br"}]))
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("status") == "True", "a Failure condition", 60)
    failure = condition(vm, "Failure")
    assert failure["reason"] == "StartFailed" and "lvo-no-such-br" in failure["message"]
    assert condition(vm, "Ready")["status"] == "False"


def test_delete_with_a_dead_guest_agent_forces_after_the_timeout(vms, cluster, vm_name):
    img = cluster.image
    boot_spec = {"kernel": {"kernel": str(img.kernel), "initrd": str(img.initrd),
                            "cmdline": f"{img.cmdline} lvo.agent=off"}}
    vms.create(manifest(cluster, vm_name, boot=boot_spec, shutdown={"mode": "agent", "timeoutSeconds": 5}))
    vm = vms.wait_phase(vm_name, "Running", 90)
    vms.wait(vm_name, lambda v: vms.boots(v) >= 1, "boot", 60)
    dom = vms.domain(vm)
    vms.delete(vm_name)
    vms.wait(vm_name, lambda v: v["status"].get("phase") == "Terminating", "Terminating", 30)
    vms.wait_gone(vm_name, 60)
    with pytest.raises(libvirt.libvirtError):
        dom.state()


def test_acpi_request_lost_while_booting_is_sent_again(vms, cluster, vm_name):
    img = cluster.image
    # The guest's power button listener starts 8 s after boot: the first requests are lost.
    boot_spec = {"kernel": {"kernel": str(img.kernel), "initrd": str(img.initrd),
                            "cmdline": f"{img.cmdline} lvo.acpi_delay=8"}}
    vms.create(manifest(cluster, vm_name, boot=boot_spec, shutdown={"mode": "acpi", "timeoutSeconds": 60}))
    vm = vms.wait_phase(vm_name, "Running", 90)
    vms.wait(vm_name, lambda v: vms.boots(v) >= 1, "boot", 60)
    patch(vms, vm_name, {"powerState": "Stopped"})
    vm = vms.wait_phase(vm_name, "Stopped", 90)
    assert vms.domain(vm).state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]


def test_libvirtd_down_is_reported_on_every_vm_and_recovered(vms, cluster, vm_name):
    node = cluster.nodes[0]
    names = [f"{vm_name}-{i}" for i in range(2)]
    for name in names:
        boot(vms, cluster, name, nodeName=node.name)
    os.kill(node._daemon_pid("libvirtd"), signal.SIGKILL)
    try:
        for name in names:
            vm = vms.wait(name, lambda v: condition(v, "Ready").get("reason") == "LibvirtUnavailable",
                          "LibvirtUnavailable", 60)
            assert condition(vm, "Ready")["status"] == "False"
            assert condition(vm, "AgentConnected")["status"] == "Unknown"
    finally:
        node.revive()
    for name in names:
        vms.wait(name, lambda v: condition(v, "Ready").get("status") == "True", "Ready again", 60)
    events = cluster.kubectl("get", "events", "-n", "default", "--field-selector",
                             f"involvedObject.kind=Node,involvedObject.name={node.name}").stdout
    assert "LibvirtUnavailable" in events and "LibvirtRestored" in events


def test_agent_killed_between_attach_and_confirmation_converges(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name)
    node = vm["status"]["nodeName"]
    path = image(cluster, f"{vm_name}.qcow2", pattern=b"LVO-KILL")
    gen = patch(vms, vm_name, {"disks": [{"name": "data", "path": str(path)}],
                               "interfaces": [{"name": "nic0", "type": "user"}]})
    vms.wait(vm_name, lambda v: "ua-disk-data" in dom.XMLDesc(0), "the attach", 60)
    cluster.operator.kill(f"agent-{node}")
    cluster.operator.restart(f"agent-{node}")
    vm = applied(vms, vm_name, gen)
    live = dom.XMLDesc(0)
    assert live.count("ua-disk-data") == 1 and live.count("ua-nic-nic0") == 1
    assert "LVO-KILL" in guest_run(dom, "dd if=/dev/vda bs=8 count=1 2>/dev/null")
    gen = patch(vms, vm_name, {"disks": [], "interfaces": []})
    cluster.operator.kill(f"agent-{node}")  # before or after the detach was asked: either way it converges
    cluster.operator.restart(f"agent-{node}")
    applied(vms, vm_name, gen)
    live = dom.XMLDesc(0)
    assert "ua-disk-data" not in live and "ua-nic-nic0" not in live
    assert qemu_pid(vm["metadata"]["uid"]) == pid
