"""The agent notices what happens to a domain outside the operator, and survives its own crash."""

import contextlib
import time

import libvirt
import libvirt_qemu
import pytest

from libvirt_operator.api import meta
from tests.e2e.vmtools import condition, manifest


def _boot(vms, cluster, name, **spec):
    vms.create(manifest(cluster, name, **spec))
    vm = vms.wait_phase(name, "Running")
    vms.wait(name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 60)
    # The console log lags the guest a little: see the marker before anything kills QEMU.
    vms.wait(name, lambda v: vms.boots(v) >= 1, "the ready marker in the console log", 30)
    return vm


def test_guest_that_powers_itself_off_is_reported_stopped_within_2s(vms, cluster, vm_name):
    vm = _boot(vms, cluster, vm_name)
    dom = vms.domain(vm)
    with contextlib.suppress(libvirt.libvirtError):  # qemu-ga powers off without answering
        libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}', 10, 0)
    deadline = time.monotonic() + 30
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dom.isActive()
    stopped_at = time.monotonic()
    vm = vms.wait(vm_name, lambda v: v["status"].get("phase") == "Stopped", "phase Stopped", 10)
    assert time.monotonic() - stopped_at < 2.0
    ready = condition(vm, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "GuestShutdown")
    # restartPolicy OnFailure: a guest shutdown is respected, not undone.
    time.sleep(2)
    assert not dom.isActive()
    # A new spec generation starts it again.
    vms.patch_spec(vm_name, {"powerState": "Running", "shutdown": {"timeoutSeconds": 30}})
    vms.wait_phase(vm_name, "Running", 30)


@pytest.mark.parametrize(("policy", "restarted"), [("OnFailure", True), ("Never", False)])
def test_domain_destroyed_by_hand_is_restarted_or_reported(vms, cluster, vm_name, policy, restarted):
    vm = _boot(vms, cluster, vm_name, restartPolicy=policy)
    dom = vms.domain(vm)
    dom.destroy()
    if restarted:
        vms.wait(vm_name, lambda v: vms.boots(v) >= 2, "a second boot", 60)
        vm = vms.wait_phase(vm_name, "Running", 30)
        assert any(e.reason == "Started" and "stopped on its own" in e.message for e in vms.events(vm_name))
    else:
        vm = vms.wait(vm_name, lambda v: condition(v, "Ready").get("reason") == "DestroyedOutsideOperator",
                      "the destroy reported", 30)
        assert vm["status"]["phase"] == "Stopped"
        time.sleep(2)
        assert not dom.isActive()


def test_agent_killed_while_starting_converges_without_duplicates(vms, cluster, vm_name):
    node = cluster.nodes[0].name
    ops = cluster.operator
    vms.create(manifest(cluster, vm_name, nodeName=node))
    # Kill the agent as soon as it has defined the domain (the VM is being started).
    conn = libvirt.open(cluster.node(node).uri)
    try:
        vm = vms.wait(vm_name, lambda v: meta.NODE_LABEL in (v["metadata"].get("labels") or {}), "placement", 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn.lookupByUUIDString(vm["metadata"]["uid"])
                break
            except libvirt.libvirtError:
                time.sleep(0.02)
        ops.kill(f"agent-{node}")
        ops.restart(f"agent-{node}")
        vm = vms.wait_phase(vm_name, "Running", 60)
        vms.wait(vm_name, lambda v: vms.boots(v) >= 1, "boot", 60)
        ours = [d for d in conn.listAllDomains() if d.name() == f"default_{vm_name}"]
        assert len(ours) == 1 and ours[0].UUIDString() == vm["metadata"]["uid"]
        assert vms.boots(vm) == 1
    finally:
        conn.close()


def test_vms_run_on_both_nodes(vms, cluster, vm_name):
    names = {f"{vm_name}-{node.name}": node.name for node in cluster.nodes}
    for name, node in names.items():
        vms.create(manifest(cluster, name, nodeName=node, memory={"size": "128Mi"}))
    for name, node in names.items():
        vm = vms.wait_phase(name, "Running", 90)
        assert vm["status"]["nodeName"] == node
        assert vms.domain(vm).isActive()
        vms.wait(name, lambda v: vms.boots(v) >= 1, "boot", 60)  # a booting kernel ignores ACPI
    for name in names:
        vms.delete(name)
    for name in names:
        vms.wait_gone(name)
