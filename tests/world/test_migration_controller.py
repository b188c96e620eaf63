"""The controller's side of VMMigration (#9) against a real kube-apiserver: validation, queueing behind the
parallel limits, the node label that hands a VMMigration to the agent acting on it, and the VM's hand-over
from the source node to the target, also across a controller SIGKILL between Landed and the label flip.

No libvirt: the agents' status writes are simulated with each agent's own field managers
(meta.agent_manager(node) for its reconciler and VMMigration status, meta.agent_migration_manager(node) for
the VM's status.migration), as the agents write them (the whole status as read, merged with their changes,
server-side apply with force). Own control plane and controller process
(the fixtures of test_controller)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from kubernetes import client

from libvirt_operator.api import meta
from libvirt_operator.api.base import utcnow
from libvirt_operator.controller import migration_plan as plan
from libvirt_operator.controller.migrations import Migrations
from libvirt_operator.kube import resources

from .test_controller import GI, OPERATOR_NS, Scene, placed_on, scene, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.world

TIMEOUT = 60.0


def cond(type_: str, ok: bool, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": utcnow()}


def find(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def status_owners(vm: dict) -> set[str]:
    """The managers that own a field of the VM's status."""
    return {e["manager"] for e in vm["metadata"].get("managedFields") or []
            if (e.get("fieldsV1") or {}).get("f:status")}


class Migrating:
    """A Scene with VMMigrations, and the agents' status writes."""

    def __init__(self, s: Scene):
        self.s = s
        self.ns = s.namespace
        self.api = s.vms

    # -- objects

    def running_vm(self, name: str, node: str, memory: str = "1Gi") -> dict:
        """A VM placed on `node` (pinned there), reported Running by that node's agent."""
        self.s.create(name, memory=memory, node_name=node)
        vm = self.s.wait_scheduled(name)
        assert placed_on(vm) == node
        self.agent_vm(name, node, {"phase": "Running", "vcpus": 1, "memory": memory,
                                   "conditions": [cond("Ready", True, "Running", f"runs on {node}")]})
        return self.s.get(name)

    def migrate(self, name: str, vm: str, type_: str = "Live", target: str | None = None) -> dict:
        spec: dict = {"vmName": vm, "type": type_}
        if target:
            spec["targetNode"] = target
        if type_ == "Storage":
            spec["disks"] = [{"name": "vda", "destinationPath": "/images/moved.qcow2"}]
        return self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, self.ns, resources.MIGRATIONS, {
            "apiVersion": meta.API_VERSION, "kind": "VMMigration", "metadata": {"name": name}, "spec": spec})

    def get(self, name: str) -> dict:
        return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.ns, resources.MIGRATIONS, name)

    def wait(self, name: str, check: Callable[[dict], bool], what: str, plural: str = resources.MIGRATIONS) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            obj = self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.ns, plural, name)
            if check(obj):
                return obj
            if time.monotonic() > deadline:
                labels = obj.get("metadata", {}).get("labels")
                raise AssertionError(f"{plural}/{name}: not {what} within {TIMEOUT} s: {labels} {obj.get('status')}"
                                     f"\ncontroller log:\n{self.s.world.controller.tail()}")
            time.sleep(0.1)

    def wait_phase(self, name: str, phase: str, label: str | None = None) -> dict:
        """In `phase`; with `label`: also handed to that node's agent (the controller labels after the status)."""
        return self.wait(name, lambda m: (m.get("status") or {}).get("phase") == phase
                         and (label is None or placed_on(m) == label), f"in phase {phase} (label {label})")

    def wait_event(self, name: str, reason: str) -> list[client.CoreV1Event]:
        deadline = time.monotonic() + TIMEOUT
        core = client.CoreV1Api(self.s.world.api)
        while True:
            evs = core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
            if any(e.reason == reason for e in evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {reason} Event (seen: {[e.reason for e in evs]})")
            time.sleep(0.1)

    # -- what the agents write

    def agent_vm(self, vm: str, node: str, changes: dict) -> dict:
        """The node's agent reconciler: its status fields, under agent_manager(node)."""
        return resources.apply_status(resources.VMS, self.ns, vm, changes, meta.agent_manager(node))

    def agent_fact(self, vm: str, node: str, migration: dict, state: str) -> dict:
        """The agent owning the VM: status.migration under agent_migration_manager(node)."""
        st = migration["status"]
        fact = {"name": migration["metadata"]["name"], "uid": migration["metadata"]["uid"],
                "type": migration["spec"]["type"], "state": state, "sourceNode": st["sourceNode"],
                "targetNode": st["targetNode"], "message": "", "time": utcnow()}
        return resources.apply_status(resources.VMS, self.ns, vm, {"migration": fact},
                                      meta.agent_migration_manager(node))

    def agent_migration(self, name: str, node: str, changes: dict, condition: dict | None = None) -> dict:
        """An agent's VMMigration status write: the whole status as read, merged, under its own manager."""
        obj = self.get(name)
        status = {**(obj.get("status") or {}), **changes}
        if condition:
            status["conditions"] = [c for c in status.get("conditions") or [] if c["type"] != condition["type"]]
            status["conditions"].append(condition)
        return resources.apply_status(resources.MIGRATIONS, self.ns, name, status, meta.agent_manager(node))

    def source_done(self, name: str, source: str) -> dict:
        """The source agent's last write after Landed (agent/migrations/live.py hand_over)."""
        return self.agent_migration(name, source, {"step": "HandOver", "phase": "HandingOver"})

    def pre_check_passes(self, name: str, target: str) -> dict:
        return self.agent_migration(name, target, {"target": {"node": target,
                                                              "migrationUri": f"qemu+tcp://127.0.0.1/{target}",
                                                              "address": "127.0.0.1"}},
                                    cond("PreChecked", True, "Passed", "roots, networks, memory and CPU fit"))

    def running(self, name: str, vm: str, source: str, target: str) -> dict:
        """Created, pre-checked on the target, Running on the source."""
        self.migrate(name, vm, target=target)
        self.wait_phase(name, "PreChecking", target)
        self.pre_check_passes(name, target)
        return self.wait_phase(name, "Running", source)


@pytest.fixture
def mig(scene: Scene) -> Migrating:  # noqa: F811
    return Migrating(scene)


def test_live_migration_hand_over(mig: Migrating):
    a, b = mig.s.node("a", 16 * GI), mig.s.node("b", 8 * GI)
    mig.s.node("c", 4 * GI, agent=False)  # no live agent: never the target
    vm = mig.running_vm("web", a)

    mig.migrate("m1", "web")  # target chosen: b (the only other live node)
    m = mig.wait_phase("m1", "PreChecking", b)  # the target agent checks first
    st = m["status"]
    assert (st["sourceNode"], st["targetNode"], st["vmUid"]) == (a, b, vm["metadata"]["uid"])
    assert st["startTime"] and find(m, "Ready")["reason"] == "PreChecking"

    mig.pre_check_passes("m1", b)
    m = mig.wait_phase("m1", "Running", a)  # the source agent's job may start
    assert m["status"]["target"]["node"] == b and find(m, "PreChecked")["status"] == "True"
    mig.wait_event("m1", "MigrationStarted")
    mig.wait_event("web", "MigrationStarted")

    # The source agent's job: progress on the VMMigration, Migrating on the VM, then Landed.
    mig.agent_migration("m1", a, {"step": "Migrate", "progress": {"percent": 40, "iteration": 2}})
    mig.agent_fact("web", a, m, "Migrating")
    assert placed_on(mig.s.get("web")) == a
    mig.agent_fact("web", a, m, "Landed")

    vm = mig.s.wait("web", lambda v: placed_on(v) == b, "labelled with the target node")
    m = mig.wait_phase("m1", "HandingOver")
    assert placed_on(m) == a and m["status"]["progress"]["percent"] == 40  # the agent's fields stay
    vm = mig.s.wait("web", lambda v: (v.get("status") or {}).get("nodeName") == b
                    and not status_owners(v) & set(plan.retired_managers(a)), "on node b, source retired")
    # What only the source agent had said is gone; the fact of the hand-over and the phase stay.
    assert "vcpus" not in vm["status"] and vm["status"]["phase"] == "Running"
    assert vm["status"]["migration"]["state"] == "Landed"
    scheduled = find(vm, "Scheduled")
    assert scheduled["status"] == "True" and b in scheduled["message"] and a not in scheduled["message"]

    # The target agent adopts the domain: its own status, then Succeeded; the controller ends the VMMigration
    # once the source agent made its last write (it applies its whole status by force).
    mig.agent_vm("web", b, {"phase": "Running", "vcpus": 1, "conditions": [cond("Ready", True, "Running")]})
    mig.agent_fact("web", b, m, "Succeeded")
    time.sleep(1.5)  # the controller looks meanwhile (VM event, timer): the source agent still writes
    assert mig.get("m1")["status"]["phase"] == "HandingOver"
    mig.source_done("m1", a)
    m = mig.wait_phase("m1", "Succeeded")
    st = m["status"]
    assert st["completionTime"] >= st["startTime"] and isinstance(st["durationMilliseconds"], int)
    ready = find(m, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Succeeded") and f"{a} to node {b}" in ready["message"]
    mig.wait_event("m1", "Migrated")
    mig.wait_event("web", "Migrated")
    vm = mig.s.get("web")
    assert placed_on(vm) == b and vm["status"]["nodeName"] == b and vm["spec"]["nodeName"] == a  # pin unchanged
    assert vm["status"]["migration"]["state"] == "Succeeded" and vm["status"]["vcpus"] == 1

    # The VM can go back: a second migration of it is allowed now.
    mig.migrate("back", "web", target=a)
    mig.wait_phase("back", "PreChecking", a)


def test_bad_input_is_refused_with_a_reason(mig: Migrating):
    a, b = mig.s.node("a", 8 * GI), mig.s.node("b", 8 * GI)
    dead = mig.s.node("dead", 8 * GI, agent=False)
    small = mig.s.node("small", GI // 2)
    mig.running_vm("web", a)
    mig.running_vm("twice", a)
    mig.running_vm("busy", a)
    mig.s.create("stopped", node_name=a)
    mig.s.wait_scheduled("stopped")
    mig.agent_vm("stopped", a, {"phase": "Stopped"})
    mig.s.create("nowhere", node_name=f"{mig.s.prefix}-missing")  # never placed
    mig.s.wait_reason("nowhere", "NodeNotFound")
    mig.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, mig.ns, resources.SNAPSHOTS, {
        "apiVersion": meta.API_VERSION, "kind": "VMSnapshot", "metadata": {"name": "snap"},
        "spec": {"vmName": "busy"}})
    resources.apply_status(resources.SNAPSHOTS, mig.ns, "snap", {"phase": "InProgress"}, meta.agent_manager(a))
    mig.migrate("first", "twice", target=b)
    mig.wait_phase("first", "PreChecking")

    cases = [  # (migration, vm, type, target, reason, words in the message)
        ("ghost", "nope", "Live", b, "VMNotFound", "does not exist"),
        ("unplaced", "nowhere", "Live", b, "VMNotPlaced", "not placed"),
        ("not-running", "stopped", "Live", b, "VMNotRunning", "is Stopped"),
        ("same", "web", "Live", a, "SameNode", f"already runs on node {a}"),
        ("same-whole", "web", "WholeMachine", a, "SameNode", a),
        ("no-target", "web", "Live", "zz", "TargetNotFound", "node zz"),
        ("dead-target", "web", "Live", dead, "TargetUnavailable", "no live agent"),
        ("small-target", "web", "Live", small, "InsufficientMemory", "needs 1Gi"),
        ("second", "twice", "Live", b, "MigrationInProgress", "first of the VM is PreChecking"),
        ("during-snapshot", "busy", "Live", b, "OperationInProgress", "VMSnapshot"),
    ]
    for name, vm, type_, target, _, _ in cases:
        mig.migrate(name, vm, type_, target)
    for name, _, _, _, reason, words in cases:
        m = mig.wait_phase(name, "Failed")
        ready = find(m, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", reason), name
        assert words in ready["message"], (name, ready["message"])
        assert placed_on(m) is None, name  # never handed to an agent
        evs = mig.wait_event(name, "MigrationFailed")
        assert any(e.type == "Warning" and reason in e.message for e in evs), name
    assert (mig.get("first")["status"]["phase"]) == "PreChecking"  # the older one is untouched


def test_limits_queue_and_release(mig: Migrating):
    a, b = mig.s.node("a", 32 * GI), mig.s.node("b", 32 * GI)
    for i in range(3):
        mig.running_vm(f"v{i}", a)
    mig.migrate("q0", "v0", target=b)
    mig.wait_phase("q0", "PreChecking")
    mig.migrate("q1", "v1", target=b)
    mig.wait_phase("q1", "PreChecking")
    q = "q2"
    mig.migrate(q, "v2", target=b)
    m = mig.wait(q, lambda o: (find(o, "Ready") or {}).get("reason") == "Queued", "queued")
    assert m["status"]["phase"] == "Pending" and placed_on(m) is None
    assert "limit 2" in find(m, "Ready")["message"]
    mig.wait_event(q, "MigrationQueued")
    time.sleep(1.5)  # timer retries (0.5 s) meanwhile: still queued
    assert mig.get(q)["status"]["phase"] == "Pending"
    # The target refuses q0: a slot frees, the queued one starts.
    mig.agent_migration("q0", b, {"phase": "Failed"}, cond("PreChecked", False, "StorageRootMismatch", "no root"))
    m = mig.wait_phase(q, "PreChecking", b)
    assert (m["status"]["sourceNode"], m["status"]["targetNode"]) == (a, b)
    # Queued again; the slots free while the controller is down: after its restart the timer moves the queue on.
    mig.migrate("q3", "v0", target=b)
    mig.wait("q3", lambda o: (find(o, "Ready") or {}).get("reason") == "Queued", "queued")
    ctl = mig.s.world.controller
    ctl.kill()
    try:
        for name in ("q0", "q1", "q2"):  # none left to wake the controller but its timer
            mig.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, mig.ns, resources.MIGRATIONS, name)
    finally:
        ctl.start()
    mig.wait_phase("q3", "PreChecking", b)


def test_a_target_agent_gone_during_the_pre_check_fails_it(mig: Migrating):
    a, b = mig.s.node("a", 16 * GI), mig.s.node("b", 8 * GI)
    mig.running_vm("web", a)
    mig.migrate("m1", "web", target=b)
    mig.wait_phase("m1", "PreChecking", b)
    mig.s.world.renewer.remove(b)  # the target's node goes away before its agent answered
    m = mig.wait_phase("m1", "Failed")
    ready = find(m, "Ready")
    assert (ready["reason"], placed_on(m)) == ("TargetUnavailable", b) and "Lease" in ready["message"]
    mig.wait_event("web", "MigrationFailed")
    assert placed_on(mig.s.get("web")) == a


def test_storage_migration_stays_on_its_node(mig: Migrating):
    a = mig.s.node("a", 8 * GI)
    mig.running_vm("web", a)
    mig.migrate("disks", "web", "Storage")
    m = mig.wait_phase("disks", "Running", a)
    assert (m["status"]["sourceNode"], m["status"]["targetNode"]) == (a, a)
    mig.wait_event("disks", "MigrationStarted")
    mig.agent_fact("web", a, m, "Migrating")
    mig.agent_fact("web", a, m, "Succeeded")
    m = mig.wait_phase("disks", "Succeeded")
    assert find(m, "Ready")["status"] == "True"
    vm = mig.s.get("web")
    assert placed_on(vm) == a and {meta.agent_manager(a), meta.agent_migration_manager(a)} <= status_owners(vm)


class StopAfterFlip(Migrations):
    """The controller's hand-over, dying right after the label flip (before the retire)."""

    class Killed(Exception):
        pass

    async def _hand_over_step(self, vm, fact, migration, step):
        done = await super()._hand_over_step(vm, fact, migration, step)
        if step.flip_to:
            raise self.Killed
        return done


def test_controller_killed_between_landed_and_the_flip_converges(mig: Migrating):
    a, b = mig.s.node("a", 16 * GI), mig.s.node("b", 8 * GI)
    mig.running_vm("web", a)
    m = mig.running("m1", "web", a, b)
    ctl = mig.s.world.controller
    ctl.kill()
    try:
        mig.agent_fact("web", a, m, "Migrating")
        mig.agent_fact("web", a, m, "Landed")
        mig.source_done("m1", a)
        time.sleep(0.5)
        vm = mig.s.get("web")
        assert placed_on(vm) == a  # nobody flipped it
        # The handler, run on the recorded state, dies right after the flip.
        with pytest.raises(StopAfterFlip.Killed):
            asyncio.run(StopAfterFlip(OPERATOR_NS, plan.Limits()).hand_over(mig.ns, "web"))
        vm = mig.s.get("web")
        assert placed_on(vm) == b and meta.agent_manager(a) in status_owners(vm)  # not retired yet
    finally:
        ctl.start()
    # Restarted: the initial listing brings the VM and the VMMigration again; the hand-over goes on.
    vm = mig.s.wait("web", lambda v: not status_owners(v) & set(plan.retired_managers(a)), "source retired")
    assert vm["status"]["migration"]["state"] == "Landed" and vm["status"]["phase"] == "Running"
    mig.agent_fact("web", b, m, "Succeeded")
    mig.wait_phase("m1", "Succeeded")
    vm = mig.s.wait("web", lambda v: (v.get("status") or {}).get("nodeName") == b, "status.nodeName b")
    assert placed_on(vm) == b


def test_controller_killed_after_landed_restarts_and_flips_without_the_source(mig: Migrating):
    """The source agent's node goes away for good right after Landed: its last write never comes, and the
    VMMigration still ends Succeeded once the target adopted the VM."""
    a, b = mig.s.node("a", 16 * GI), mig.s.node("b", 8 * GI)
    mig.running_vm("web", a)
    m = mig.running("m1", "web", a, b)
    ctl = mig.s.world.controller
    ctl.kill()
    try:
        mig.agent_fact("web", a, m, "Landed")
        mig.s.world.renewer.remove(a)  # its Lease is gone
    finally:
        ctl.start()
    mig.s.wait("web", lambda v: placed_on(v) == b and (v.get("status") or {}).get("nodeName") == b,
               "flipped after the restart")
    mig.wait_phase("m1", "HandingOver")
    mig.agent_fact("web", b, m, "Succeeded")
    m = mig.wait_phase("m1", "Succeeded")
    assert m["status"].get("step") is None  # the source never wrote its last step
    assert mig.s.get("web")["status"]["migration"]["state"] == "Succeeded"
