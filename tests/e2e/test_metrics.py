"""Prometheus metrics of the real controller and agents (each on its own LVO_METRICS_PORT), scraped
before and after VMs run through the real API server, libvirtd and QEMU."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.vmtools import manifest

Samples = list[tuple[str, dict[str, str], float]]


def port_of(cluster, process: str) -> int:
    return int(cluster.operator.envs[process]["LVO_METRICS_PORT"])


def scrape(cluster, process: str, timeout: float = 30) -> Samples:
    """The process's samples; a process that has just started gets `timeout` to open its endpoint."""
    url = f"http://127.0.0.1:{port_of(cluster, process)}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            break
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def has(samples: Samples, name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def eventually(cluster, process: str, check: Callable[[Samples], bool], what: str, timeout: float = 20) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(cluster, process)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{process}: {what} not seen in its metrics within {timeout}s")
        time.sleep(0.5)


def agents(cluster) -> dict[str, str]:
    """node name -> agent process name"""
    return {n.name: f"agent-{n.name}" for n in cluster.nodes}


def test_every_process_serves_its_own_metrics(cluster):
    processes = ["controller", *agents(cluster).values()]
    ports = [port_of(cluster, p) for p in processes]
    assert len(set(ports)) == len(ports), f"ports shared: {ports}"
    for process in processes:
        samples = scrape(cluster, process)
        component = "controller" if process == "controller" else "agent"
        assert value(samples, "libvirt_operator_build_info", component=component) == 1
        assert has(samples, "process_cpu_seconds_total")
        if component == "agent":
            node = process.removeprefix("agent-")
            # This node's VMs by phase: every phase exported, for this node only.
            assert {lab["node"] for n, lab, _ in samples if n == "libvirt_operator_node_vms"} == {node}
            assert {lab["phase"] for n, lab, _ in samples if n == "libvirt_operator_node_vms"} >= {
                "Running", "Stopped", "Paused", "Failed"}
            assert has(samples, "libvirt_operator_workqueue_depth")
            assert not has(samples, "libvirt_operator_placement_decisions_total")
        else:
            assert has(samples, "libvirt_operator_cluster_vms")
            assert not has(samples, "libvirt_operator_libvirt_operation_duration_seconds_count")


def test_metrics_after_a_vm_runs(cluster, vms, vm_name):
    before = {node: scrape(cluster, proc) for node, proc in agents(cluster).items()}
    controller_before = scrape(cluster, "controller")
    vms.create(manifest(cluster, vm_name))
    try:
        vm = vms.wait_phase(vm_name, "Running", 60)
        node = vm["status"]["nodeName"]
        agent = agents(cluster)[node]
        was = before[node]

        samples = eventually(
            cluster, agent,
            lambda s: value(s, "libvirt_operator_node_vms", node=node, phase="Running")
            >= value(was, "libvirt_operator_node_vms", node=node, phase="Running") + 1,
            "one more Running VM on the node")
        # Reconcile passes: counted and timed.
        assert (value(samples, "libvirt_operator_reconcile_total", component="agent", result="success")
                > value(was, "libvirt_operator_reconcile_total", component="agent", result="success"))
        assert (value(samples, "libvirt_operator_reconcile_duration_seconds_count", component="agent")
                > value(was, "libvirt_operator_reconcile_duration_seconds_count", component="agent"))
        assert value(samples, "libvirt_operator_reconcile_duration_seconds_sum", component="agent") > 0
        # libvirt latencies by operation: this VM's domain was defined and started here.
        for op in ("define", "start", "lookup", "state"):
            assert (value(samples, "libvirt_operator_libvirt_operation_duration_seconds_count", operation=op)
                    > value(was, "libvirt_operator_libvirt_operation_duration_seconds_count", operation=op)), op
        assert value(samples, "libvirt_operator_libvirt_operation_duration_seconds_sum", operation="start") > 0
        # Nothing waits in the queue once the VM has converged; the gauge is live, not a constant.
        assert value(samples, "libvirt_operator_workqueue_depth") >= 0

        controller = eventually(
            cluster, "controller",
            lambda s: value(s, "libvirt_operator_cluster_vms", phase="Running")
            >= value(controller_before, "libvirt_operator_cluster_vms", phase="Running") + 1,
            "one more Running VM cluster-wide")
        assert (value(controller, "libvirt_operator_placement_decisions_total", result="Scheduled")
                >= value(controller_before, "libvirt_operator_placement_decisions_total", result="Scheduled") + 1)
        assert (value(controller, "libvirt_operator_reconcile_total", component="controller", result="success")
                > value(controller_before, "libvirt_operator_reconcile_total", component="controller",
                        result="success"))

        def all_vms_counted(s: Samples) -> bool:
            counted = sum(v for n, _, v in s if n == "libvirt_operator_cluster_vms")
            live = vms.api.list_cluster_custom_object("virt.libvirt-operator.io", "v1alpha1", "virtualmachines")
            return counted == len(live["items"])

        eventually(cluster, "controller", all_vms_counted, "every VM of the cluster counted once")
    finally:
        vms.delete(vm_name)
        vms.wait_gone(vm_name, 90)

    eventually(cluster, agent,
               lambda s: value(s, "libvirt_operator_libvirt_operation_duration_seconds_count", operation="undefine")
               > value(was, "libvirt_operator_libvirt_operation_duration_seconds_count", operation="undefine"),
               "the domain's undefine")


def test_failed_libvirt_operation_is_counted_by_reason(cluster, vms, vm_name):
    img = cluster.image
    no_agent = {"boot": {"kernel": {"kernel": str(img.kernel), "initrd": str(img.initrd),
                                    "cmdline": f"{img.cmdline} lvo.agent=off"}}}
    vms.create(manifest(cluster, vm_name, **no_agent))
    try:
        vm = vms.wait_phase(vm_name, "Running", 60)
        vms.wait(vm_name, lambda v: vms.boots(v) >= 1, "the guest's ready marker", 60)
        agent = agents(cluster)[vm["status"]["nodeName"]]
        labels = {"operation": "reboot", "reason": "GuestAgentUnavailable"}
        before = value(scrape(cluster, agent), "libvirt_operator_libvirt_operation_errors_total", **labels)
        vms.patch_spec(vm_name, {"reboot": {"id": "m1", "mode": "agent"}})
        vm = vms.wait(vm_name, lambda v: (v["status"].get("lastReboot") or {}).get("result") == "Failed",
                      "the reboot to fail", 60)
        assert "GuestAgentUnavailable" in vm["status"]["lastReboot"]["message"]
        eventually(cluster, agent,
                   lambda s: value(s, "libvirt_operator_libvirt_operation_errors_total", **labels) == before + 1,
                   "one GuestAgentUnavailable error of reboot")
    finally:
        vms.delete(vm_name)
        vms.wait_gone(vm_name, 90)


def test_metrics_endpoint_settings():
    from libvirt_operator.metrics.common import EndpointConfig, serve

    assert serve("agent", {"LVO_METRICS_PORT": "0"}) is None  # 0 disables it
    assert EndpointConfig.from_env({}) == EndpointConfig(8080, "0.0.0.0")
    assert EndpointConfig.from_env({"LVO_METRICS_PORT": "9100", "LVO_METRICS_ADDRESS": "127.0.0.1"}) == \
        EndpointConfig(9100, "127.0.0.1")
    for bad in ("http", "70000", "-1"):
        with pytest.raises(SystemExit, match="LVO_METRICS_PORT"):
            EndpointConfig.from_env({"LVO_METRICS_PORT": bad})


def test_metrics_port_in_use_is_a_clear_startup_error():
    from libvirt_operator.metrics.common import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve metrics on 127.0.0.1:{port}.*LVO_METRICS_PORT"):
            serve("agent", {"LVO_METRICS_PORT": str(port), "LVO_METRICS_ADDRESS": "127.0.0.1"})
