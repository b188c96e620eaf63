"""Prometheus metrics of the real controller and agents (each on its own LVO_METRICS_PORT), scraped
before and after VMs run through the real API server, libvirtd and QEMU."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
    """Sum of the samples of `name` whose labels include `labels`; a missing series fails the test."""
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert found, f"no series {name}{labels or ''} in the scrape"
    return sum(found)


def value_or_zero(samples: Samples, name: str, **labels: str) -> float:
    """As `value`, for a labelled series that exists only once it has counted something
    (a Prometheus counter with labels has no sample before its first increment)."""
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(found)


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
            assert {lab["scope"] for n, lab, _ in samples if n == "libvirt_operator_vm_watch_events_total"} == {
                "own", "other"}
            assert not has(samples, "libvirt_operator_placement_decisions_total")
        else:
            assert has(samples, "libvirt_operator_cluster_vms")
            assert {lab["scope"] for n, lab, _ in samples if n == "libvirt_operator_vm_watch_events_total"} == {
                "cluster"}
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
                > value_or_zero(was, "libvirt_operator_reconcile_total", component="agent", result="success"))
        assert (value(samples, "libvirt_operator_reconcile_duration_seconds_count", component="agent")
                > value_or_zero(was, "libvirt_operator_reconcile_duration_seconds_count", component="agent"))
        assert value(samples, "libvirt_operator_reconcile_duration_seconds_sum", component="agent") > 0
        # libvirt latencies by operation: this VM's domain was defined and started here.
        for op in ("define", "start", "lookup", "state"):
            assert (value(samples, "libvirt_operator_libvirt_operation_duration_seconds_count", operation=op)
                    > value_or_zero(was, "libvirt_operator_libvirt_operation_duration_seconds_count", operation=op)), op
        assert value(samples, "libvirt_operator_libvirt_operation_duration_seconds_sum", operation="start") > 0

        controller = eventually(
            cluster, "controller",
            lambda s: value(s, "libvirt_operator_cluster_vms", phase="Running")
            >= value(controller_before, "libvirt_operator_cluster_vms", phase="Running") + 1,
            "one more Running VM cluster-wide")
        assert (value(controller, "libvirt_operator_placement_decisions_total", result="Scheduled")
                >= value_or_zero(controller_before, "libvirt_operator_placement_decisions_total",
                                 result="Scheduled") + 1)
        assert (value(controller, "libvirt_operator_reconcile_total", component="controller", result="success")
                > value_or_zero(controller_before, "libvirt_operator_reconcile_total", component="controller",
                        result="success"))

        def all_vms_counted(s: Samples) -> bool:
            counted = sum(v for n, _, v in s if n == "libvirt_operator_cluster_vms")
            live = vms.api.list_cluster_custom_object("virt.libvirt-operator.io", "v1alpha1", "virtualmachines")
            return counted == len(live["items"])

        eventually(cluster, "controller", all_vms_counted, "every VM of the cluster counted once")

        # Watch traffic: this VM's events reached its own node's agent, and no agent ever received
        # an event of a VM that is not on its node (the server-side label selector).
        events = "libvirt_operator_vm_watch_events_total"
        assert value(samples, events, scope="own") > value(was, events, scope="own")
        for proc in agents(cluster).values():
            assert value(scrape(cluster, proc), events, scope="other") == 0, proc
    finally:
        vms.delete(vm_name)
        vms.wait_gone(vm_name, 90)

    eventually(cluster, agent,
               lambda s: value(s, "libvirt_operator_libvirt_operation_duration_seconds_count", operation="undefine")
               > value_or_zero(was, "libvirt_operator_libvirt_operation_duration_seconds_count",
                               operation="undefine"),
               "the domain's undefine")


class Sampler:
    """Scrapes one process's endpoint in a loop and keeps the highest value of one gauge seen."""

    def __init__(self, cluster, process: str, name: str):
        self.cluster, self.process, self.name = cluster, process, name
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, value(scrape(self.cluster, self.process), self.name))
            self.samples += 1


def test_workqueue_depth_rises_in_a_burst_and_drains(cluster, vms):
    """More VMs at once than the agent has workers: some wait in its queue, and the queue empties."""
    node = cluster.nodes[0].name
    agent = agents(cluster)[node]
    depth = "libvirt_operator_workqueue_depth"
    assert value(scrape(cluster, agent), depth) == 0  # the series exists (and the world is quiet)
    names = [f"depth-{i}" for i in range(40)]  # the agent runs 16 workers
    # Stopped VMs: the agent defines each domain and reports it, and no guest has to boot.
    bodies = [manifest(cluster, n, nodeName=node, powerState="Stopped") for n in names]
    try:
        with Sampler(cluster, agent, depth) as sampler:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(vms.create, bodies))
            # The burst itself, or else the periodic resync (every VM of the node at once).
            deadline = time.monotonic() + 100
            while sampler.peak == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert sampler.peak > 0, f"the queue never held a VM in {sampler.samples} scrapes"
        for name in names:
            vms.wait_phase(name, "Stopped", 120)
        eventually(cluster, agent, lambda s: value(s, depth) == 0, "an empty work queue", timeout=60)
    finally:
        for name in names:
            vms.delete(name)
        for name in names:
            vms.wait_gone(name, 120)


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
        before = value_or_zero(scrape(cluster, agent), "libvirt_operator_libvirt_operation_errors_total", **labels)
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
