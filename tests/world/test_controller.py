"""The controller process places VirtualMachines on nodes, against a real kube-apiserver.

The module runs its own control plane (same implementation as the `control_plane` fixture):
the session's control plane may host the e2e operator, whose cluster-wide controller would
place this module's VMs too. One controller process serves the whole module; each test gets
its own VM namespace and its own Nodes (deleted afterwards, with their agent leases).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.controller import schedule_status, vm_scheduling
from libvirt_operator.kube import client as kube_client
from libvirt_operator.kube import leases, resources
from localenv.cluster import wait_established
from localenv.controlplane import ControlPlane, expected_bin_dir, require_binaries
from localenv.kubenodes import register_node

pytestmark = pytest.mark.world

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NS = "lvo-controller-test"
GI = 2**30
RETRY_SECONDS = "0.5"


class Controller:
    """`python -m libvirt_operator.controller` as a child process."""

    def __init__(self, kubeconfig: Path, log: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LVO_NAMESPACE": OPERATOR_NS,
                    "LVO_PLACEMENT_RETRY_SECONDS": RETRY_SECONDS, "PYTHONUNBUFFERED": "1",
                    "LVO_METRICS_PORT": "0"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "libvirt_operator.controller"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class LeaseRenewer:
    """Renews agent leases for the nodes in `live`, as each node's agent would."""

    def __init__(self):
        self.live: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def add(self, node: str) -> None:
        leases.renew(OPERATOR_NS, node)
        self.live.add(node)

    def remove(self, node: str) -> None:
        self.live.discard(node)
        try:
            kube_client.coordination().delete_namespaced_lease(leases.lease_name(node), OPERATOR_NS)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _loop(self) -> None:
        while not self._stop.wait(5):
            for node in list(self.live):
                leases.renew(OPERATOR_NS, node)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class World:
    cp: ControlPlane
    api: client.ApiClient
    controller: Controller
    renewer: LeaseRenewer

    def kubectl(self, *args: str) -> str:
        done = subprocess.run([str(self.cp.bin_dir / "kubectl"), "--kubeconfig", str(self.cp.kubeconfig), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_binaries(expected_bin_dir())
    tmp = tmp_path_factory.mktemp("controller-world")
    cp = ControlPlane(tmp).start()
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)  # kube.client (leases, resources) in this process
    kube_client.api_client.cache_clear()
    api = cp.api_client()
    renewer = controller = None
    try:
        w = World(cp, api, Controller(cp.kubeconfig, tmp / "controller.log"), LeaseRenewer())
        renewer, controller = w.renewer, w.controller
        w.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        wait_established([str(w.cp.bin_dir / "kubectl"), "--kubeconfig", str(w.cp.kubeconfig)], REPO / "crds")
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NS)))
        controller.start()
        yield w
    finally:
        if controller:
            controller.stop()
        if renewer:
            renewer.close()
        api.close()
        cp.stop()
        kube_client.api_client.cache_clear()
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved


@dataclass
class Scene:
    """One test's namespace and Nodes; everything is removed afterwards."""

    world: World
    namespace: str
    prefix: str
    nodes: list[str] = field(default_factory=list)

    @property
    def vms(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.world.api)

    def node(self, short: str, memory: int, agent: bool = True) -> str:
        name = f"{self.prefix}-{short}"
        register_node(self.world.api, name, memory_bytes=memory, cpus=4)
        self.nodes.append(name)
        if agent:
            self.world.renewer.add(name)
        return name

    def manifest(self, name: str, memory: str = "1Gi", node_name: str | None = None,
                 labels: dict | None = None, max_memory: str | None = None, macs: tuple[str, ...] = ()) -> dict:
        spec: dict = {"memory": {"size": memory}, "boot": {"kernel": {"kernel": "/images/vmlinuz"}}}
        if max_memory:
            spec["memory"]["maxSize"] = max_memory
        if macs:
            spec["interfaces"] = [{"name": f"nic{i}", "type": "user", "mac": m} for i, m in enumerate(macs)]
        if node_name:
            spec["nodeName"] = node_name
        return {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels or {}}, "spec": spec}

    def create(self, name: str, **kwargs) -> dict:
        return self.vms.create_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, resources.VMS,
                                                        self.manifest(name, **kwargs))

    def get(self, name: str) -> dict:
        return self.vms.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, resources.VMS, name)

    def wait(self, name: str, check: Callable[[dict], bool], what: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            vm = self.get(name)
            if check(vm):
                return vm
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: timed out waiting for {what}; status: {vm.get('status')}\n"
                                     f"controller log:\n{self.world.controller.tail()}")
            time.sleep(0.1)

    def wait_scheduled(self, name: str, timeout: float = 60) -> dict:
        return self.wait(name, lambda vm: not schedule_status.needs_work(vm), "placement", timeout)

    def wait_reason(self, name: str, reason: str, timeout: float = 60) -> dict:
        return self.wait(name, lambda vm: (scheduled(vm) or {}).get("reason") == reason, f"reason {reason}", timeout)

    def event_reasons(self, name: str) -> list[str]:
        evs = client.CoreV1Api(self.world.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}").items
        return [e.reason for e in evs]

    def wait_event(self, name: str, reason: str, timeout: float = 20) -> list[str]:
        """The VM's Event reasons once `reason` is among them (Events are posted after status)."""
        deadline = time.monotonic() + timeout
        while True:
            reasons = self.event_reasons(name)
            if reason in reasons:
                return reasons
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {reason} Event within {timeout}s (seen: {reasons})")
            time.sleep(0.1)


def scheduled(vm: dict) -> dict | None:
    return schedule_status.find_condition(vm)


def placed_on(vm: dict) -> str | None:
    return vm["metadata"].get("labels", {}).get(meta.NODE_LABEL)


@pytest.fixture
def scene(world: World) -> Iterator[Scene]:
    ns = f"ctl-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(world.api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    s = Scene(world, ns, ns)
    yield s
    # VMs first and for good: a VM left unplaced would otherwise land on the next test's nodes.
    s.vms.delete_collection_namespaced_custom_object(meta.GROUP, meta.VERSION, ns, resources.VMS)
    deadline = time.monotonic() + 20
    while s.vms.list_namespaced_custom_object(meta.GROUP, meta.VERSION, ns, resources.VMS)["items"]:
        assert time.monotonic() < deadline, "VMs of the test are not going away"
        time.sleep(0.1)
    core = client.CoreV1Api(world.api)
    for node in s.nodes:
        world.renewer.remove(node)
        core.delete_node(node)
    core.delete_namespace(ns)


def assert_placed(s: Scene, vm: dict, node: str) -> None:
    assert placed_on(vm) == node
    assert vm["status"]["nodeName"] == node
    cond = scheduled(vm)
    assert (cond["status"], cond["reason"]) == ("True", "Scheduled")
    assert node in cond["message"]
    assert cond["observedGeneration"] == vm["metadata"]["generation"]


def test_placed_on_the_live_node_with_most_free_memory(scene: Scene):
    small, big = scene.node("small", 4 * GI), scene.node("big", 8 * GI)
    scene.node("dead", 64 * GI, agent=False)  # most memory, but no live agent
    scene.create("hog", memory="6Gi")
    vm = scene.wait_scheduled("hog")
    assert_placed(scene, vm, big)
    assert vm["status"]["phase"] == "Scheduled"
    # big now has 2Gi free, small 4Gi: the next VM goes to small.
    scene.create("next", memory="1Gi")
    assert_placed(scene, scene.wait_scheduled("next"), small)
    assert "FailedScheduling" not in scene.wait_event("next", "Scheduled")
    # No kopf state, annotation or finalizer is written onto the VM.
    md = scene.get("next")["metadata"]
    assert not md.get("finalizers")
    assert not [a for a in md.get("annotations") or {} if "kopf" in a or a.startswith(meta.CONTROLLER_PREFIX)]


def test_pinned_to_a_missing_node_waits_for_it(scene: Scene):
    late = f"{scene.prefix}-late"
    scene.create("pinned", node_name=late)
    vm = scene.wait_reason("pinned", "NodeNotFound")
    assert scheduled(vm)["status"] == "False" and late in scheduled(vm)["message"]
    assert vm["status"]["phase"] == "Pending" and "nodeName" not in vm["status"] and placed_on(vm) is None
    scene.wait_event("pinned", "FailedScheduling")
    scene.node("late", 8 * GI)
    assert_placed(scene, scene.wait_scheduled("pinned"), late)


def test_memory_above_every_node_is_insufficient(scene: Scene):
    scene.node("a", 2 * GI)
    b = scene.node("b", 4 * GI)
    scene.create("huge", memory="8Gi")
    cond = scheduled(scene.wait_reason("huge", "InsufficientMemory"))
    assert cond["status"] == "False"
    assert "needs 8Gi" in cond["message"] and "4Gi free of 4Gi" in cond["message"]
    scene.create("huge-pinned", memory="8Gi", node_name=b)
    cond = scheduled(scene.wait_reason("huge-pinned", "InsufficientMemory"))
    assert cond["message"] == f"node {b} has 4Gi allocatable memory, the VM needs 8Gi"
    time.sleep(1.5)  # retried meanwhile, still not placed
    assert placed_on(scene.get("huge")) is None and placed_on(scene.get("huge-pinned")) is None


def test_no_live_agent_then_an_agent_appears(scene: Scene):
    node = scene.node("quiet", 8 * GI, agent=False)
    scene.create("waiting")
    cond = scheduled(scene.wait_reason("waiting", "NoNodeAvailable"))
    assert node in cond["message"] and "without a live agent" in cond["message"]
    scene.world.renewer.add(node)
    assert_placed(scene, scene.wait_scheduled("waiting"), node)


def test_concurrent_vms_never_overcommit_a_node(scene: Scene):
    nodes = [scene.node("x", 2 * GI), scene.node("y", 2 * GI)]
    names = [f"burst-{i}" for i in range(5)]
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: scene.create(n, memory="1Gi"), names))
    for name in names:
        scene.wait(name, lambda vm: scheduled(vm) is not None, "a Scheduled condition")
    time.sleep(1.5)  # let any (wrong) second placement happen
    vms = [scene.get(n) for n in names]
    placed = [vm for vm in vms if placed_on(vm)]
    assert len(placed) == 4
    for node in nodes:
        assert sum(1 for vm in placed if placed_on(vm) == node) == 2
    [left] = [vm for vm in vms if not placed_on(vm)]
    assert scheduled(left)["reason"] == "InsufficientMemory"


def test_killed_controller_converges_after_restart(scene: Scene):
    nodes = [scene.node("p", 3 * GI), scene.node("q", 3 * GI)]
    ctl = scene.world.controller
    names = [f"crash-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: scene.create(n, memory="1Gi"), names))
    time.sleep(0.15)
    ctl.kill()  # most likely in the middle of placing them
    # While it is down: a VM labelled but without status (as if killed right after labelling),
    # whose agent already owns the phase.
    scene.create("labelled", labels={meta.NODE_LABEL: nodes[0]})
    resources.apply_status(resources.VMS, scene.namespace, "labelled", {"phase": "Running"},
                           meta.agent_manager(nodes[0]))
    ctl.start()
    for name in [*names, "labelled"]:
        vm = scene.wait_scheduled(name)
        assert_placed(scene, vm, placed_on(vm))
    assert scene.get("labelled")["status"]["phase"] == "Running"  # the agent's phase was left alone
    used = {n: 0 for n in nodes}
    for name in [*names, "labelled"]:
        used[placed_on(scene.get(name))] += 1
    assert max(used.values()) <= 3, used


def test_status_apply_leaves_a_phase_the_agent_just_took(scene: Scene):
    node = scene.node("r", 4 * GI)
    scene.create("raced", labels={meta.NODE_LABEL: node})
    vm = scene.wait_scheduled("raced")
    assert vm["status"]["phase"] == "Scheduled"
    stale = scene.get("raced")
    # The agent starts the domain and sets phase between the controller's read and its apply.
    resources.apply_status(resources.VMS, scene.namespace, "raced", {"phase": "Starting"}, meta.agent_manager(node))
    asyncio.run(vm_scheduling.apply_status(
        stale, lambda with_phase: schedule_status.scheduled(stale, node, "placed again", with_phase)))
    vm = scene.get("raced")
    assert vm["status"]["phase"] == "Starting"
    assert scheduled(vm)["message"] == "placed again"


def test_a_vm_that_may_grow_reserves_its_ceiling(scene: Scene):
    node = scene.node("g", 4 * GI)
    scene.create("grower", memory="1Gi", max_memory="3Gi")
    assert_placed(scene, scene.wait_scheduled("grower"), node)
    # 3Gi of 4Gi held by the ceiling: a 2Gi VM does not fit, though the grower's size is 1Gi.
    scene.create("second", memory="2Gi")
    cond = scheduled(scene.wait_reason("second", "InsufficientMemory"))
    assert "needs 2Gi" in cond["message"] and "1Gi free of 4Gi" in cond["message"]
    scene.create("small", memory="1Gi")
    assert_placed(scene, scene.wait_scheduled("small"), node)


def test_a_mac_used_by_another_vm_keeps_the_later_vm_unplaced(scene: Scene):
    node = scene.node("m", 8 * GI)
    mac = "52:54:00:12:34:56"
    scene.create("first", macs=(mac,))
    first = scene.wait_scheduled("first")
    assert_placed(scene, first, node)
    scene.create("later", macs=("52:54:00:00:00:77", mac))
    vm = scene.wait_reason("later", "MacAddressInUse")
    cond = scheduled(vm)
    assert cond["status"] == "False"
    assert cond["message"] == f"MAC {mac} is already used by VM {scene.namespace}/first (placed on node {node})"
    assert placed_on(vm) is None and vm["status"]["phase"] == "Pending"
    scene.wait_event("later", "FailedScheduling")
    # The earlier VM is untouched: same placement, same status.
    now = scene.get("first")
    assert placed_on(now) == node and now["status"] == first["status"]
    # Once the earlier VM is gone, the retry places the later one.
    scene.vms.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, scene.namespace, resources.VMS, "first")
    assert_placed(scene, scene.wait_scheduled("later"), node)


def test_two_unplaced_vms_with_one_mac_the_earlier_is_placed(scene: Scene):
    mac = "52:54:00:65:43:21"
    scene.create("older", macs=(mac,))
    scene.wait_reason("older", "NoNodeAvailable")  # no node yet: both wait, the older one first
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    scene.create("younger", macs=(mac,))
    scene.wait_reason("younger", "MacAddressInUse")
    node = scene.node("late", 8 * GI)
    assert_placed(scene, scene.wait_scheduled("older"), node)
    time.sleep(1.5)  # retries of the younger meanwhile
    vm = scene.get("younger")
    assert placed_on(vm) is None and scheduled(vm)["reason"] == "MacAddressInUse"
