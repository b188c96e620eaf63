"""The controller's VMMigration decisions (controller/migration_plan.py), table by table: validation and
target choice, the parallel limits, PreChecking → Running, the VM's hand-over, and the status written."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libvirt_operator.api import meta
from libvirt_operator.controller import migration_plan as plan
from libvirt_operator.controller.config import ControllerConfig
from libvirt_operator.controller.placement import ListView, Node, VMRef

GI = 2**30
T0 = "2026-12-01T10:00:00Z"
T1 = "2026-12-01T10:00:01Z"


def vm(name="web", node="a", phase="Running", memory="1Gi", uid="vm-web", fact=None, managers=(), pinned=None):
    md: dict = {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "7", "creationTimestamp": T0,
                "labels": {meta.NODE_LABEL: node} if node else {},
                "managedFields": [{"manager": m, "operation": "Apply", "subresource": "status",
                                   "fieldsV1": {"f:status": {"f:phase": {}}}} for m in managers]}
    status: dict = {"phase": phase} if phase else {}
    if fact:
        status["migration"] = fact
    spec: dict = {"memory": {"size": memory}}
    if pinned:
        spec["nodeName"] = pinned
    return {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine", "metadata": md, "spec": spec, "status": status}


def mig(name="m1", vm_name="web", type_="Live", to=None, phase=None, created=T1, uid=None, label=None,
        **status):
    spec: dict = {"vmName": vm_name, "type": type_}
    if to:
        spec["targetNode"] = to
    st = {k: v for k, v in {"phase": phase, **status}.items() if v is not None}
    md = {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}", "creationTimestamp": created,
          "generation": 1, "resourceVersion": "3", "labels": {meta.NODE_LABEL: label} if label else {}}
    return {"apiVersion": meta.API_VERSION, "kind": "VMMigration", "metadata": md, "spec": spec, "status": st}


def ref(name="other", phase="Running", source="x", target="y", created=T0, vm_name=None, type_="Live",
        vm_uid=None, namespace="ns"):
    return plan.MigrationRef(uid=f"uid-{name}", namespace=namespace, name=name, vm_name=vm_name or f"vm-{name}",
                             type=type_, phase=phase, created=created, source=source, target=target, vm_uid=vm_uid)


def snap(name, vm_name="web", phase="InProgress"):
    return {"metadata": {"name": name}, "spec": {"vmName": vm_name}, "status": {"phase": phase}}


NODES = [Node("a", 8 * GI), Node("b", 8 * GI), Node("c", 16 * GI)]
ALIVE = {"a", "b", "c"}
DEFAULT_LIMITS = plan.Limits()
HERE = VMRef(uid="vm-web", name="ns/web", memory_bytes=GI, node="a")


def decide(migration, the_vm="default", snapshots=(), migrations=(), nodes=NODES, alive=ALIVE, placed=(HERE,),
           limits=DEFAULT_LIMITS):
    the_vm = vm() if the_vm == "default" else the_vm
    return plan.validate(migration, the_vm, snapshots, migrations, nodes, alive, ListView(placed), limits)


# -- validation: (migration, VM, others) -> reason -----------------------------------------------------------

@pytest.mark.parametrize("case, kwargs, reason, words", [
    ("no VM", dict(the_vm=None), plan.VM_NOT_FOUND, "ns/web does not exist"),
    ("VM not placed", dict(the_vm=vm(node=None)), plan.VM_NOT_PLACED, "not placed"),
    ("VM stopped", dict(the_vm=vm(phase="Stopped")), plan.VM_NOT_RUNNING, "is Stopped"),
    ("VM starting", dict(the_vm=vm(phase="Starting")), plan.VM_NOT_RUNNING, "is Starting"),
    ("VM without a phase", dict(the_vm=vm(phase=None)), plan.VM_NOT_RUNNING, "not running yet"),
    ("another migration of the VM runs", dict(migrations=[ref("m0", "Running", vm_name="web", created=T1)]),
     plan.MIGRATION_IN_PROGRESS, "m0 of the VM is Running"),
    ("an older pending one of the VM", dict(migrations=[ref("m0", None, vm_name="web", created=T0)]),
     plan.MIGRATION_IN_PROGRESS, "m0 of the VM is Pending"),
    ("same second, the name decides", dict(migrations=[ref("m0", "Pending", vm_name="web", created=T1)]),
     plan.MIGRATION_IN_PROGRESS, "m0"),
    ("the VM's status.migration says another landed",
     dict(the_vm=vm(fact={"name": "gone", "uid": "uid-gone", "state": "Landed", "sourceNode": "x",
                          "targetNode": "a"})), plan.MIGRATION_IN_PROGRESS, "gone is Landed"),
    ("a snapshot of the VM runs", dict(snapshots=[snap("s1")]), plan.OPERATION_IN_PROGRESS, "VMSnapshot ns/s1"),
])
def test_refused(case, kwargs, reason, words):
    v = decide(mig(to="b"), **kwargs)
    assert (v.action, v.reason) == ("fail", reason), case
    assert words in v.message, v.message


@pytest.mark.parametrize("case, migration, kwargs, reason, words", [
    ("Live to its own node", mig(to="a"), {}, plan.SAME_NODE, "already runs on node a"),
    ("WholeMachine to its own node", mig(type_="WholeMachine", to="a"), {}, plan.SAME_NODE, "node a"),
    ("no such node", mig(to="zz"), dict(nodes=[]), plan.TARGET_NOT_FOUND, "node zz (spec.targetNode)"),
    ("target without a live agent", mig(to="b"), dict(alive={"a"}), plan.TARGET_UNAVAILABLE, "no live agent"),
    ("target cordoned", mig(to="b"), dict(nodes=[Node("b", 8 * GI, cordoned=True)]), plan.TARGET_UNAVAILABLE,
     "cordoned"),
    ("target without libvirt", mig(to="b"), dict(nodes=[Node("b", 8 * GI, libvirt=False)]),
     plan.TARGET_UNAVAILABLE, meta.LIBVIRT_NODE_LABEL),
    ("target full", mig(to="b"), dict(placed=[HERE, VMRef("hog", "ns/hog", 7 * GI + 1, node="b")]),
     plan.INSUFFICIENT_MEMORY, "needs 1Gi"),
    ("target small", mig(to="b"), dict(the_vm=vm(memory="9Gi")), plan.INSUFFICIENT_MEMORY, "needs 9Gi"),
    ("no other live node", mig(), dict(alive={"a"}), plan.TARGET_UNAVAILABLE, "no other node can take the VM"),
    ("no other node with room", mig(), dict(the_vm=vm(memory="20Gi")), plan.INSUFFICIENT_MEMORY, "needs 20Gi"),
])
def test_target_refused(case, migration, kwargs, reason, words):
    v = decide(migration, **kwargs)
    assert (v.action, v.reason) == ("fail", reason), case
    assert words in v.message, v.message


def test_memory_of_vms_migrating_to_the_target_counts_there():
    b = [Node("a", 8 * GI), Node("b", 2 * GI)]
    inbound = VMRef("vm-in", "ns/in", GI, node="c")  # counts on c until its hand-over, yet lands on b
    placed = [HERE, inbound]
    migrating = ref("in", "Running", source="c", target="b", vm_uid="vm-in")
    assert decide(mig(to="b"), nodes=b, placed=placed).action == "start"  # 2Gi free without it
    v = decide(mig(to="b"), the_vm=vm(memory="1536Mi"), nodes=b, placed=placed, migrations=[migrating])
    assert (v.action, v.reason) == ("fail", plan.INSUFFICIENT_MEMORY), v
    # A Storage migration of another VM on b reserves nothing more there.
    moving_disks = ref("disks", "Running", source="b", target="b", vm_uid="vm-in", type_="Storage")
    assert decide(mig(to="b"), the_vm=vm(memory="1536Mi"), nodes=b, placed=placed,
                  migrations=[moving_disks]).action == "start"


@pytest.mark.parametrize("case, kwargs", [
    ("a finished migration of the VM", dict(migrations=[ref("m0", "Succeeded", vm_name="web", created=T0),
                                                         ref("m00", "Failed", vm_name="web", created=T0)])),
    ("a younger pending one of the VM", dict(migrations=[ref("m2", None, vm_name="web",
                                                              created="2026-12-01T10:00:09Z")])),
    ("a migration of a namesake VM elsewhere", dict(migrations=[ref("m0", "Running", vm_name="web",
                                                                     namespace="other")])),
    ("a snapshot that is Ready", dict(snapshots=[snap("s1", phase="Ready")])),
    ("a snapshot of another VM in progress", dict(snapshots=[snap("s1", vm_name="db")])),
    ("the VM's last migration succeeded", dict(the_vm=vm(fact={"name": "m0", "uid": "u0", "state": "Succeeded",
                                                              "sourceNode": "x", "targetNode": "a"}))),
    ("pinned elsewhere by spec.nodeName: the user asks explicitly", dict(the_vm=vm(pinned="a"))),
])
def test_allowed(case, kwargs):
    v = decide(mig(to="b"), **kwargs)
    assert (v.action, v.phase, v.source, v.target, v.label) == ("start", "PreChecking", "a", "b", "b"), case


def test_target_chosen_by_placement_excluding_the_source():
    # c has the most free memory; the source a (even emptier) is never a candidate
    v = decide(mig(), nodes=[Node("a", 64 * GI), Node("b", 8 * GI), Node("c", 16 * GI)])
    assert (v.action, v.target, v.label, v.phase) == ("start", "c", "c", "PreChecking")
    assert "node c checks" in v.message and "from node a" in v.message
    # a dead or cordoned node is passed over
    v = decide(mig(type_="WholeMachine"), nodes=[Node("a", 8 * GI), Node("b", 8 * GI),
                                                  Node("c", 16 * GI, cordoned=True)])
    assert v.target == "b"


def test_storage_runs_on_the_vm_node_without_target_checks():
    v = decide(mig(type_="Storage"), nodes=[], alive=set())
    assert (v.action, v.phase, v.source, v.target, v.label) == ("start", "Running", "a", "a", "a")


# -- limits ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, migration, active, limits, words", [
    ("source busy", mig(to="b"), [ref("x1", source="a", target="c"), ref("x2", source="c", target="a")],
     plan.Limits(), "node a takes part in 2"),
    ("target busy", mig(to="b"), [ref("x1", source="b", target="c"), ref("x2", "PreChecking", source="c",
                                                                             target="b")],
     plan.Limits(), "node b takes part in 2"),
    ("cluster busy", mig(to="b"), [ref(f"x{i}", source=f"s{i}", target=f"t{i}") for i in range(5)],
     plan.Limits(), "5 migrations are active in the cluster (limit 5"),
    ("own limit", mig(to="b"), [ref("x1", "HandingOver", source="a", target="c")], plan.Limits(per_node=1),
     "LVO_MIGRATIONS_PER_NODE"),
    ("storage on a busy node", mig(type_="Storage"), [ref("x1", source="a", target="c"),
                                                      ref("x2", "Running", source="a", target="a", type_="Storage")],
     plan.Limits(), "node a takes part in 2"),
])
def test_queued_behind_the_limits(case, migration, active, limits, words):
    v = decide(migration, migrations=active, limits=limits)
    assert (v.action, v.reason) == ("queue", plan.QUEUED), case
    assert words in v.message, v.message


def test_only_active_migrations_count_against_the_limits():
    others = [ref("p1", None, source=None, target=None), ref("p2", "Pending", source="a", target="c"),
              ref("d1", "Succeeded", source="a", target="c"), ref("d2", "Failed", source="a", target="b"),
              ref("d3", "Aborted", source="b", target="a"), ref("r1", "Running", source="a", target="c")]
    assert decide(mig(to="b"), migrations=others).action == "start"
    # this migration itself (listed, not active yet) never counts
    me = plan.migration_ref(mig(to="b"))
    assert decide(mig(to="b"), migrations=[*others, me], limits=plan.Limits(per_node=2)).action == "start"


def test_refusals_win_over_queueing():
    busy = [ref(f"x{i}", source=f"s{i}", target=f"t{i}") for i in range(5)]
    assert decide(mig(to="a"), migrations=busy).reason == plan.SAME_NODE
    assert decide(mig(to="b"), the_vm=vm(phase="Stopped"), migrations=busy).reason == plan.VM_NOT_RUNNING


def test_queued_is_read_from_the_ready_condition():
    q = mig(phase="Pending", conditions=[{"type": "Ready", "status": "False", "reason": "Queued"}])
    assert plan.queued(q)
    assert not plan.queued(mig(phase="Pending"))
    assert not plan.queued(mig(phase="Running", conditions=[{"type": "Ready", "status": "False",
                                                             "reason": "Queued"}]))


# -- PreChecking → Running --------------------------------------------------------------------------------

PASSED = [{"type": "PreChecked", "status": "True", "reason": "Passed"}]
REFUSED = [{"type": "PreChecked", "status": "False", "reason": "StorageRootMismatch"}]
TARGET = {"node": "b", "migrationUri": "qemu+tcp://127.0.0.1:1/system"}
ST = dict(sourceNode="a", targetNode="b")


@pytest.mark.parametrize("case, migration, step", [
    ("pre-check pending, label on the target", mig(phase="PreChecking", label="b", **ST), None),
    ("pre-checking without its label (killed between status and label)", mig(phase="PreChecking", **ST),
     plan.Step(label="b")),
    ("passed: label back to the source, then Running",
     mig(phase="PreChecking", label="b", conditions=PASSED, **{**ST, "target": TARGET}),
     plan.Step(label="a", phase="Running")),
    ("passed, label already moved (killed between label and status)",
     mig(phase="PreChecking", label="a", conditions=PASSED, **{**ST, "target": TARGET}), plan.Step(phase="Running")),
    ("PreChecked=True but no status.target yet", mig(phase="PreChecking", label="b", conditions=PASSED, **ST), None),
    ("refused: the target agent writes Failed", mig(phase="PreChecking", label="b", conditions=REFUSED,
                                                     **{**ST, "target": TARGET}), None),
    ("running on the source", mig(phase="Running", label="a", **ST), None),
    ("running, label still on the target", mig(phase="Running", label="b", **ST), plan.Step(label="a")),
    ("storage running without its label", mig(type_="Storage", phase="Running", sourceNode="a", targetNode="a"),
     plan.Step(label="a")),
    ("handing over", mig(phase="HandingOver", label="a", **ST), None),
    ("succeeded", mig(phase="Succeeded", label="a", **ST), None),
    ("pending", mig(phase="Pending"), None),
])
def test_advance(case, migration, step):
    assert plan.advance(migration) == step, case


@pytest.mark.parametrize("case, migration, awaits, step", [
    ("waiting for the target's answer", mig(phase="PreChecking", label="b", **ST), True,
     plan.Step(phase="Failed", reason=plan.TARGET_UNAVAILABLE)),
    ("answered: passed", mig(phase="PreChecking", label="b", conditions=PASSED, **{**ST, "target": TARGET}), False,
     plan.Step(label="a", phase="Running")),
    ("not labelled for the target yet", mig(phase="PreChecking", **ST), False, plan.Step(label="b")),
    ("running: the target is not asked", mig(phase="Running", label="a", **ST), False, None),
])
def test_a_target_agent_gone_before_its_answer_fails_the_pre_check(case, migration, awaits, step):
    assert plan.awaits_target(migration) == awaits, case
    got = plan.advance(migration, target_alive=False)
    assert (got and (got.label, got.phase, got.reason)) == (step and (step.label, step.phase, step.reason)), case
    if got and got.phase == "Failed":
        assert "node b" in got.message and "stays on node a" in got.message
    assert plan.advance(migration, target_alive=True) == (None if awaits else step), case


def test_advance_leaves_a_deleted_migration_to_the_agents():
    m = mig(phase="PreChecking", **ST)
    m["metadata"]["deletionTimestamp"] = T1
    assert plan.advance(m) is None


# -- the hand-over ---------------------------------------------------------------------------------------

SRC = meta.agent_manager("a"), meta.agent_jobs_manager("a")
DONE = mig(phase="HandingOver", step="HandOver")  # the source agent's last write


def fact(state, source="a", target="b", uid="uid-m1", name="m1", type_="Live"):
    return {"name": name, "uid": uid, "type": type_, "state": state, "sourceNode": source, "targetNode": target,
            "time": T1}


@pytest.mark.parametrize("case, the_vm, migration, step", [
    ("no migration", vm(), mig(phase="Running"), plan.HandOver()),
    ("migrating", vm(fact=fact("Migrating")), mig(phase="Running"), plan.HandOver()),
    ("failed: stays", vm(fact=fact("Failed"), managers=SRC), mig(phase="Failed"), plan.HandOver()),
    ("landed: flip", vm(fact=fact("Landed"), managers=SRC), mig(phase="Running"), plan.HandOver(flip_to="b")),
    ("landed, VMMigration gone: flip all the same", vm(fact=fact("Landed")), None, plan.HandOver(flip_to="b")),
    ("landed, VMMigration says Aborted: the VM's fact wins", vm(fact=fact("Landed")), mig(phase="Aborted"),
     plan.HandOver(flip_to="b")),
    ("flipped: retire the source, keep status.migration", vm(node="b", fact=fact("Landed"), managers=SRC),
     mig(phase="Running"), plan.HandOver(retire="a", keep_as="b")),
    ("flipped, only the jobs manager left", vm(node="b", fact=fact("Landed"), managers=SRC[1:]), None,
     plan.HandOver(retire="a", keep_as="b")),
    ("adopted, the source still writes: the retire meanwhile", vm(node="b", fact=fact("Succeeded"), managers=SRC),
     mig(phase="Running"), plan.HandOver(retire="a", keep_as="b")),
    ("adopted, the source done: Succeeded before the retire", vm(node="b", fact=fact("Succeeded"), managers=SRC),
     DONE, plan.HandOver(phase="Succeeded")),
    ("Succeeded: then the retire", vm(node="b", fact=fact("Succeeded"), managers=SRC), mig(phase="Succeeded"),
     plan.HandOver(retire="a", keep_as="b")),
    ("retired: HandingOver", vm(node="b", fact=fact("Landed"), managers=(meta.agent_manager("b"),)),
     mig(phase="Running"), plan.HandOver(phase="HandingOver")),
    ("handing over: wait for the target", vm(node="b", fact=fact("Landed")), mig(phase="HandingOver"),
     plan.HandOver()),
    ("adopted, the source's last write done: Succeeded", vm(node="b", fact=fact("Succeeded")), DONE,
     plan.HandOver(phase="Succeeded")),
    ("adopted, the source still writes (its Cleanup)", vm(node="b", fact=fact("Succeeded")),
     mig(phase="HandingOver", step="Cleanup"), plan.HandOver()),
    ("adopted, the source never wrote HandingOver yet", vm(node="b", fact=fact("Succeeded")), mig(phase="Running"),
     plan.HandOver()),
    ("already Succeeded", vm(node="b", fact=fact("Succeeded")), mig(phase="Succeeded"), plan.HandOver()),
    ("another VMMigration of that name", vm(node="b", fact=fact("Succeeded")), mig(phase="Running", uid="new"),
     plan.HandOver()),
    ("VMMigration gone after the retire", vm(node="b", fact=fact("Landed")), None, plan.HandOver()),
    ("the VM moved on since (a later placement)", vm(node="c", fact=fact("Landed"), managers=SRC),
     mig(phase="Running"), plan.HandOver()),
    ("storage: no flip, no retire; the VM says Succeeded",
     vm(fact=fact("Succeeded", target="a", type_="Storage"), managers=SRC), mig(type_="Storage", phase="Running"),
     plan.HandOver(phase="Succeeded")),
    ("storage still moving", vm(fact=fact("Migrating", target="a", type_="Storage")),
     mig(type_="Storage", phase="Running"), plan.HandOver()),
])
def test_handover(case, the_vm, migration, step):
    assert plan.handover(the_vm, migration) == step, case
    # the watch's cheap check (it knows the phase, not the step) never misses a step
    phase = None if migration is None or migration["metadata"]["uid"] != "uid-m1" else migration["status"]["phase"]
    if step:
        assert plan.vm_needs_handover(the_vm, phase), case


@pytest.mark.parametrize("case, migration, alive, step", [
    ("source alive, not done: wait", mig(phase="HandingOver", step="Cleanup"), True, plan.HandOver()),
    ("source gone for good: Succeeded without it", mig(phase="HandingOver", step="Cleanup"), False,
     plan.HandOver(phase="Succeeded")),
    ("source gone before HandingOver", mig(phase="Running", step="Migrating"), False,
     plan.HandOver(phase="Succeeded")),
    ("source done: no need to ask", DONE, True, plan.HandOver(phase="Succeeded")),
])
def test_succeeded_waits_for_the_source_agent_while_it_lives(case, migration, alive, step):
    adopted = vm(node="b", fact=fact("Succeeded"))
    assert plan.waits_for_source(adopted, migration) == (migration is not DONE), case
    assert plan.handover(adopted, migration, source_alive=alive) == step, case


def test_storage_never_waits_for_a_source():
    the_vm = vm(fact=fact("Succeeded", target="a", type_="Storage"))
    assert not plan.waits_for_source(the_vm, mig(type_="Storage", phase="Running"))


def test_the_cheap_check_is_quiet_once_done():
    done = vm(node="b", fact=fact("Succeeded"), managers=(meta.agent_manager("b"),))
    assert not plan.vm_needs_handover(done, "Succeeded")
    assert not plan.vm_needs_handover(done, None)
    assert not plan.vm_needs_handover(vm(node="b", fact=fact("Landed")), "HandingOver")


def test_the_cheap_check_without_the_migration_known():
    assert plan.vm_needs_handover(vm(fact=fact("Landed")), None)  # the flip needs no VMMigration
    assert not plan.vm_needs_handover(vm(node="b", fact=fact("Succeeded")), None)


def test_kept_fields_are_the_phase_and_a_fact_a_retired_manager_holds():
    the_vm = vm(node="b", fact=fact("Landed"), managers=SRC)  # both own f:phase here
    assert plan.kept_fields(the_vm, "a", "b") == [("phase", "Running", meta.agent_manager("b"))]
    the_vm["metadata"]["managedFields"].append({"manager": SRC[1], "fieldsV1": {"f:status": {"f:migration": {}}}})
    assert plan.kept_fields(the_vm, "a", "b")[1] == ("migration", fact("Landed"), meta.agent_migration_manager("b"))
    # the agents' own migration manager holds it: it is not retired, nothing to keep
    held = vm(node="b", fact=fact("Landed"), managers=(meta.agent_migration_manager("a"),))
    assert plan.kept_fields(held, "a", "b") == []


def test_owns_status_needs_a_status_field():
    empty = vm(node="b")
    empty["metadata"]["managedFields"] = [{"manager": SRC[0], "fieldsV1": {"f:metadata": {}}},
                                          {"manager": SRC[1], "fieldsV1": {"f:status": {}}}]
    assert not plan.owns_status(empty, SRC)
    assert plan.owns_status(vm(managers=SRC[:1]), SRC)
    assert not plan.owns_status(vm(managers=(meta.agent_manager("b"),)), SRC)


# -- status ----------------------------------------------------------------------------------------------

def test_failed_status_keeps_the_rest_of_the_status():
    old = {"type": "PreChecked", "status": "True", "reason": "Passed", "lastTransitionTime": T0}
    m = mig(phase="Pending", conditions=[old], progress={"percent": 3})
    st = plan.failed_status(m, plan.SAME_NODE, "no")
    assert st["phase"] == "Failed" and st["progress"] == {"percent": 3} and st["observedGeneration"] == 1
    by_type = {c["type"]: c for c in st["conditions"]}
    assert by_type["PreChecked"] == old
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"], by_type["Ready"]["message"]) == (
        "False", "SameNode", "no")


def test_a_condition_keeps_its_transition_time_while_its_status_stays():
    ready = {"type": "Ready", "status": "False", "reason": "Queued", "message": "old", "lastTransitionTime": T0}
    st = plan.queued_status(mig(phase="Pending", conditions=[ready]), "new")
    [c] = st["conditions"]
    assert (c["message"], c["lastTransitionTime"]) == ("new", T0)
    st = plan.started_status(mig(phase="Pending", conditions=[ready]),
                             plan.Verdict("start", "PreChecking", "checks", "PreChecking", "a", "b", "b"), "vm-1", T1)
    [c] = st["conditions"]
    assert (c["reason"], c["lastTransitionTime"]) == ("PreChecking", T0)  # still False
    assert (st["phase"], st["sourceNode"], st["targetNode"], st["vmUid"], st["startTime"]) == (
        "PreChecking", "a", "b", "vm-1", T1)


def test_succeeded_status_counts_the_duration_from_the_start():
    m = mig(phase="HandingOver", startTime="2026-12-01T10:00:00.250Z", **ST)
    st = plan.succeeded_status(m, datetime(2026, 12, 1, 10, 0, 2, 750000, tzinfo=UTC))
    assert (st["phase"], st["completionTime"], st["durationMilliseconds"]) == (
        "Succeeded", "2026-12-01T10:00:02.750Z", 2500)
    [c] = st["conditions"]
    assert (c["status"], c["reason"]) == ("True", "Succeeded")
    assert c["message"] == "Live migration from node a to node b in 2.5 s"
    assert plan.succeeded_status(mig(phase="Running"), plan.now_utc())["phase"] == "Succeeded"  # no start: no duration
    # written again (an agent's stale write took the phase back): the times recorded first stay
    again = plan.succeeded_status(mig(**{**st, "phase": "HandingOver"}), datetime(2026, 12, 1, 11, tzinfo=UTC))
    assert (again["completionTime"], again["durationMilliseconds"]) == ("2026-12-01T10:00:02.750Z", 2500)


def test_running_and_handing_over_status():
    m = mig(phase="PreChecking", conditions=PASSED, **{**ST, "target": TARGET})
    st = plan.running_status(m)
    assert st["phase"] == "Running" and st["target"] == TARGET
    assert {c["type"] for c in st["conditions"]} == {"Ready", "PreChecked"}
    assert plan.handing_over_status(m)["phase"] == "HandingOver"


# -- configuration ---------------------------------------------------------------------------------------

def test_limits_from_the_environment():
    cfg = ControllerConfig.from_env({})
    assert (cfg.migrations_per_node, cfg.migrations_per_cluster) == (2, 5)
    cfg = ControllerConfig.from_env({"LVO_MIGRATIONS_PER_NODE": "1", "LVO_MIGRATIONS_PER_CLUSTER": "9"})
    assert (cfg.migrations_per_node, cfg.migrations_per_cluster) == (1, 9)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit, match="LVO_MIGRATIONS_PER_NODE"):
            ControllerConfig.from_env({"LVO_MIGRATIONS_PER_NODE": bad})


def test_older_undecided_migrations_of_the_vm_are_decided_first():
    me = mig(name="m5", created=T1)
    others = [ref("m0", None, vm_name="web", created=T0), ref("m1", None, vm_name="web", created=T1),
              ref("m9", None, vm_name="web", created=T1),  # younger (same second, later name)
              ref("m2", "Failed", vm_name="web", created=T0), ref("m3", "PreChecking", vm_name="web", created=T0),
              ref("m4", None, vm_name="db", created=T0), plan.migration_ref(me)]
    assert [m.name for m in plan.undecided_elders(me, others)] == ["m0", "m1"]


def test_migrations_by_phase_are_exported_with_zeros():
    from prometheus_client import REGISTRY

    from libvirt_operator.metrics import controller as metrics

    metrics.track_migrations(lambda: {"Running": 2, "Pending": 1})
    try:
        assert REGISTRY.get_sample_value("libvirt_operator_migrations", {"phase": "Running"}) == 2
        assert REGISTRY.get_sample_value("libvirt_operator_migrations", {"phase": "HandingOver"}) == 0
        before = REGISTRY.get_sample_value("libvirt_operator_migrations_finished_total",
                                           {"type": "Live", "result": "Succeeded"}) or 0
        metrics.migration_finished("Live", "Succeeded", 1.5)
        assert REGISTRY.get_sample_value("libvirt_operator_migrations_finished_total",
                                         {"type": "Live", "result": "Succeeded"}) == before + 1
    finally:
        metrics.track_migrations(dict)
