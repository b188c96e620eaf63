"""FEATURES L1-L7 through the real API server, controller, agents, libvirtd and QEMU."""

import libvirt
import pytest

from libvirt_operator.api import meta
from tests.e2e.vmtools import condition, manifest


def running_vm(vms, cluster, name, **spec):
    vms.create(manifest(cluster, name, **spec))
    vm = vms.wait_phase(name, "Running")
    vms.wait(name, lambda v: vms.boots(v) >= 1, "the guest's ready marker", 60)
    return vm


def test_L1_create_runs_a_domain_on_the_chosen_node(vms, cluster, vm_name):
    vm = running_vm(vms, cluster, vm_name)
    node = vm["status"]["nodeName"]
    assert vm["metadata"]["labels"][meta.NODE_LABEL] == node
    assert condition(vm, "Ready")["status"] == "True"
    assert condition(vm, "Scheduled")["status"] == "True"
    dom = vms.domain(vm)
    assert dom is not None and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert dom.name() == f"default_{vm_name}"
    # The agent's channel connects once qemu-ga runs in the guest.
    vms.wait(vm_name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 60)
    printed = cluster.kubectl("get", "virtualmachine", vm_name, "-n", "default").stdout
    assert "Running" in printed and node in printed


@pytest.mark.parametrize("mode", ["acpi", "agent"])
def test_L2_graceful_shutdown(vms, cluster, vm_name, mode):
    running_vm(vms, cluster, vm_name)
    if mode == "agent":
        vms.wait(vm_name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 60)
    vms.patch_spec(vm_name, {"powerState": "Stopped", "shutdown": {"mode": mode}})
    vm = vms.wait_phase(vm_name, "Stopped", 60)
    assert condition(vm, "Ready")["status"] == "True"
    state, reason = vms.domain(vm).state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    assert any(e.reason == "ShuttingDown" and mode in e.message for e in vms.events(vm_name))


def _uncooperative(cluster, flag):
    return {"boot": {"kernel": {"kernel": str(cluster.image.kernel), "initrd": str(cluster.image.initrd),
                                "cmdline": f"{cluster.image.cmdline} {flag}"}}}


def test_L2_shutdown_timeout_is_reported_then_forced(vms, cluster, vm_name):
    running_vm(vms, cluster, vm_name, **_uncooperative(cluster, "lvo.acpi=off"))
    vms.patch_spec(vm_name, {"powerState": "Stopped", "shutdown": {"mode": "acpi", "timeoutSeconds": 3}})
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("reason") == "ShutdownTimeout",
                  "ShutdownTimeout", 60)
    assert condition(vm, "Ready")["status"] == "False"
    assert "did not power off within 3s" in condition(vm, "Failure")["message"]
    assert vms.domain(vm).isActive()
    vms.patch_spec(vm_name, {"shutdown": {"forceAfterTimeout": True}})
    vm = vms.wait_phase(vm_name, "Stopped", 30)
    assert vms.domain(vm).state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED
    assert condition(vm, "Failure") == {}


def test_L2_agent_shutdown_without_a_guest_agent_is_reported(vms, cluster, vm_name):
    running_vm(vms, cluster, vm_name, **_uncooperative(cluster, "lvo.agent=off"))
    vms.patch_spec(vm_name, {"powerState": "Stopped", "shutdown": {"mode": "agent"}})
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("reason") == "GuestAgentUnavailable",
                  "GuestAgentUnavailable", 60)
    assert condition(vm, "AgentConnected")["status"] == "False"
    assert vms.domain(vm).isActive()
    vms.patch_spec(vm_name, {"shutdown": {"mode": "acpi"}})
    vms.wait_phase(vm_name, "Stopped", 60)


def test_L3_force_power_off(vms, cluster, vm_name):
    running_vm(vms, cluster, vm_name)
    vms.patch_spec(vm_name, {"powerState": "Stopped", "shutdown": {"mode": "force"}})
    vm = vms.wait_phase(vm_name, "Stopped", 30)
    assert vms.domain(vm).state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED


@pytest.mark.parametrize("mode", ["acpi", "agent"])
def test_L4_reboot_runs_once_per_request_id(vms, cluster, vm_name, mode):
    vm = running_vm(vms, cluster, vm_name)
    vms.wait(vm_name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 60)
    vms.patch_spec(vm_name, {"reboot": {"id": "r1", "mode": mode}})
    vm = vms.wait(vm_name, lambda v: (v["status"].get("lastReboot") or {}).get("result") == "Succeeded",
                  "reboot r1 recorded", 60)
    assert vm["status"]["lastReboot"]["id"] == "r1"
    vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", 60)
    # The same id again (e.g. an unrelated spec edit) does not reboot again.
    vms.patch_spec(vm_name, {"shutdown": {"timeoutSeconds": 61}})
    vms.wait(vm_name, lambda v: v["status"].get("observedGeneration") == v["metadata"]["generation"],
             "the edit observed", 30)
    vms.patch_spec(vm_name, {"reboot": {"id": "r2", "mode": mode}})
    vms.wait(vm_name, lambda v: (v["status"].get("lastReboot") or {}).get("id") == "r2", "reboot r2", 60)
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 3, "a third boot", 60)
    assert vms.boots(vm) == 3


def test_L5_reset(vms, cluster, vm_name):
    running_vm(vms, cluster, vm_name)
    vms.patch_spec(vm_name, {"reset": {"id": "x1"}})
    vm = vms.wait(vm_name, lambda v: (v["status"].get("lastReset") or {}).get("result") == "Succeeded",
                  "reset recorded", 60)
    vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a boot after the reset", 60)
    assert vm["status"]["lastReset"]["id"] == "x1"


def test_L6_pause_and_resume(vms, cluster, vm_name):
    running_vm(vms, cluster, vm_name)
    vms.patch_spec(vm_name, {"powerState": "Paused"})
    vm = vms.wait_phase(vm_name, "Paused", 30)
    assert vms.domain(vm).state()[0] == libvirt.VIR_DOMAIN_PAUSED
    vms.patch_spec(vm_name, {"powerState": "Running"})
    vm = vms.wait_phase(vm_name, "Running", 30)
    assert vms.domain(vm).state()[0] == libvirt.VIR_DOMAIN_RUNNING


def _disk(cluster, name):
    import subprocess

    path = cluster.storage_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_L7_delete_honours_disk_deletion_policy(vms, cluster, vm_name, policy):
    disk = _disk(cluster, vm_name)
    vm = running_vm(vms, cluster, vm_name, diskDeletionPolicy=policy,
                    disks=[{"name": "data", "path": str(disk)}])
    node = cluster.node(vm["status"]["nodeName"])
    vms.delete(vm_name)
    vms.wait_gone(vm_name, 90)
    conn = libvirt.open(node.uri)
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByUUIDString(vm["metadata"]["uid"])
    finally:
        conn.close()
    assert disk.exists() is (policy == "Retain")
