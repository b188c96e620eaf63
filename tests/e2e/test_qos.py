"""FEATURES Q1-Q12 through the operator: VMQosPolicies and spec.qos resolved by the controller,
applied live by the agent (same QEMU), measured on real TCG guests."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import libvirt
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from tests.e2e.test_live_devices import boot, patch
from tests.e2e.vmtools import NS, condition, guest_run, qemu_pid

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE


@pytest.fixture
def policies(cluster):
    api = client.CustomObjectsApi(cluster.control_plane.api_client())
    made = []

    def apply(name: str, spec: dict) -> dict:
        body = {"apiVersion": meta.API_VERSION, "kind": "VMQosPolicy", "metadata": {"name": name, "namespace": NS},
                "spec": spec}
        if name in made:
            current = api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmqospolicies", name)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return api.replace_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmqospolicies", name, body)
        created = api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmqospolicies", body)
        made.append(name)
        return created

    def delete(name: str) -> None:
        api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmqospolicies", name)
        made.remove(name)

    def get(name: str) -> dict:
        return api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmqospolicies", name)

    apply.delete, apply.get = delete, get
    yield apply
    for name in list(made):
        delete(name)


def quota(dom) -> int:
    q = dom.schedulerParametersFlags(LIVE).get("global_quota", -1)
    return q if 0 < q < 1 << 40 else -1


def wait_quota(vms, name, dom, want: int) -> dict:
    return vms.wait(name, lambda v: quota(dom) == want and condition(v, "QosApplied").get("status") == "True",
                    f"global_quota {want}", 60)


def test_policies_added_edited_outranked_overridden_and_deleted_change_the_running_vm(vms, cluster, vm_name,
                                                                                        policies):
    vm, dom, pid = boot(vms, cluster, vm_name)
    vms.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", vm_name,
                                           {"metadata": {"labels": {"tier": f"gold-{vm_name}"}}})
    selector = {"matchLabels": {"tier": f"gold-{vm_name}"}}
    policies(f"{vm_name}-a", {"selector": selector, "priority": 10, "cpu": {"limitPercent": 50},
                              "memory": {"softLimit": "150Mi"}})
    vm = wait_quota(vms, vm_name, dom, 50_000)
    assert vm["status"]["qos"]["cpu"]["limitPercent"] == {"value": 50, "source": f"policy/{vm_name}-a"}
    assert vm["status"]["qosApplied"]["cpu"]["quotaMicroseconds"] == 50_000
    assert dom.memoryParameters(LIVE)["soft_limit"] == 150 * 1024
    policies(f"{vm_name}-a", {"selector": selector, "priority": 10, "cpu": {"limitPercent": 30}})
    wait_quota(vms, vm_name, dom, 30_000)
    policies(f"{vm_name}-b", {"selector": selector, "priority": 20, "cpu": {"limitPercent": 20}})
    vm = wait_quota(vms, vm_name, dom, 20_000)
    assert vm["status"]["qos"]["policies"][0] == f"{vm_name}-b"
    patch(vms, vm_name, {"qos": {"cpu": {"limitPercent": 40}}})
    vm = wait_quota(vms, vm_name, dom, 40_000)
    assert vm["status"]["qos"]["cpu"]["limitPercent"]["source"] == "spec"
    patch(vms, vm_name, {"qos": None})
    wait_quota(vms, vm_name, dom, 20_000)
    policies.delete(f"{vm_name}-b")
    wait_quota(vms, vm_name, dom, 30_000)
    policies.delete(f"{vm_name}-a")
    wait_quota(vms, vm_name, dom, -1)
    assert qemu_pid(vm["metadata"]["uid"]) == pid and dom.isActive()


def cpu_share(dom, seconds: float = 10.0) -> float:
    """Part of one host CPU the domain used over `seconds` (libvirt's cumulative CPU time)."""
    t0, c0 = time.monotonic(), dom.getCPUStats(True)[0]["cpu_time"]
    time.sleep(seconds)
    t1, c1 = time.monotonic(), dom.getCPUStats(True)[0]["cpu_time"]
    return (c1 - c0) / 1e9 / (t1 - t0)


@contextlib.contextmanager
def node_first(node):
    """The node's cgroup gets the host's highest cpu.shares meanwhile: other work on this 2-CPU machine
    cannot starve the guest below its quota (a quota is a ceiling, not a guarantee)."""
    dirs = [Path(d) for d in node.cgroup_dirs if (Path(d) / "cpu.shares").exists()]
    before = [(d / "cpu.shares").read_text().strip() for d in dirs]
    for d in dirs:
        (d / "cpu.shares").write_text("262144")
    try:
        yield
    finally:
        for d, value in zip(dirs, before, strict=True):
            (d / "cpu.shares").write_text(value)


def test_q10_a_burning_guest_is_held_to_its_limit_and_released_live(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name, qos={"cpu": {"limitPercent": 25}})
    wait_quota(vms, vm_name, dom, 25_000)
    guest_run(dom, "(while :; do :; done) >/dev/null 2>&1 &")
    with node_first(cluster.node(vm["status"]["nodeName"])):
        limited = cpu_share(dom)
        assert abs(limited - 0.25) <= 0.15 * 0.25, f"{limited:.1%} of a host CPU under a 25 % limit"
        patch(vms, vm_name, {"qos": {"cpu": {"limitPercent": 100}}})
        wait_quota(vms, vm_name, dom, 100_000)
        lifted = cpu_share(dom, 5.0)
    assert lifted > 1.6 * limited, f"lifting the limit: {limited:.1%} -> {lifted:.1%}"
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_values_the_node_cannot_honour_are_reported_and_nothing_is_half_applied(vms, cluster, vm_name):
    vm, dom, pid = boot(vms, cluster, vm_name, interfaces=[{"name": "nic0", "type": "user"}],
                        qos={"cpu": {"limitPercent": 40}, "network": [{"name": "nic0", "vlan": 42}]})
    vm = vms.wait(vm_name, lambda v: condition(v, "QosApplied").get("reason") == "HostUnsupported",
                  "QosApplied HostUnsupported", 60)
    assert "vlan" in condition(vm, "QosApplied")["message"].lower()
    assert vm["status"]["qos"]["network"][0]["vlan"]["value"] == 42  # kept, never dropped
    assert quota(dom) == -1  # the CPU limit of the same VM was not applied either
    assert qemu_pid(vm["metadata"]["uid"]) == pid


def test_bad_policies_get_specific_reasons(vms, cluster, vm_name, policies):
    with pytest.raises(ApiException) as bad:
        policies(f"{vm_name}-x", {"selector": {"matchLabels": {"a": "b"}},
                                  "cpu": {"limitPercent": 10, "reservationPercent": 20}})
    assert bad.value.status == 422 and "reservationPercent cannot exceed" in bad.value.body
    policies(f"{vm_name}-idle", {"selector": {"matchLabels": {"nothing": vm_name}}, "cpu": {"shares": 100}})
    deadline = time.monotonic() + 30
    while (policies.get(f"{vm_name}-idle").get("status") or {}).get("phase") != "Idle":
        assert time.monotonic() < deadline, policies.get(f"{vm_name}-idle")
        time.sleep(0.3)
    boot(vms, cluster, vm_name)
    vms.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", vm_name,
                                           {"metadata": {"labels": {"pair": vm_name}}})
    for suffix, shares in (("p", 300), ("q", 500)):
        policies(f"{vm_name}-{suffix}", {"selector": {"matchLabels": {"pair": vm_name}}, "priority": 5,
                                         "cpu": {"shares": shares}})
    vm = vms.wait(vm_name, lambda v: ((v["status"].get("qos") or {}).get("conflicts") or []) != [],
                  "a conflict in status.qos", 30)
    winner = vm["status"]["qos"]["cpu"]["shares"]
    assert winner == {"value": 300, "source": f"policy/{vm_name}-p"}  # equal priority: the name sorting first
    loser = policies.get(f"{vm_name}-q")
    assert loser["status"]["phase"] == "Degraded"


def test_q6_a_guest_beyond_its_hard_limit_is_reported_not_restarted(vms, cluster, vm_name):
    vm, dom, _pid = boot(vms, cluster, vm_name, memory={"size": "512Mi"}, restartPolicy="OnFailure")
    rss_kib = dom.memoryStats()["rss"]
    limit = f"{rss_kib // 1024 + 30}Mi"
    patch(vms, vm_name, {"qos": {"memory": {"hardLimit": limit}}})
    vms.wait(vm_name, lambda v: condition(v, "QosApplied").get("status") == "True"
             and (v["status"].get("qosApplied") or {}).get("memory", {}).get("hardLimitKib"), "the limit applied")
    assert dom.memoryParameters(LIVE)["hard_limit"] == (rss_kib // 1024 + 30) * 1024
    with contextlib.suppress(Exception):  # the guest may die before it answers
        guest_run(dom, "dd if=/dev/zero of=/tmp/fill bs=1M count=220 2>/dev/null; echo done", timeout=5)
    vm = vms.wait(vm_name, lambda v: condition(v, "Ready").get("reason") == "MemoryLimitExceeded",
                  "MemoryLimitExceeded", 120)
    assert vm["status"]["phase"] == "Stopped" and "hard limit" in condition(vm, "Ready")["message"]
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
    assert qemu_pid(vm["metadata"]["uid"]) is None  # not restarted: it would be killed again
    assert any(e.reason == "MemoryLimitExceeded" for e in vms.events(vm_name))
