"""The controller's status fields: when work is needed, phase ownership, condition rendering."""

from libvirt_operator.api import meta
from libvirt_operator.controller import schedule_status as s
from libvirt_operator.controller.placement import Decision


def vm(labels=None, status=None, managed=None, deleting=False):
    md = {"name": "v", "namespace": "ns", "generation": 3, "labels": labels or {}, "managedFields": managed or []}
    if deleting:
        md["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": md, "status": status or {}}


def scheduled_cond(status="True"):
    return {"type": "Scheduled", "status": status, "reason": "Scheduled", "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


PLACED = {meta.NODE_LABEL: "n1"}


def test_needs_work():
    assert s.needs_work(vm())
    assert not s.needs_work(vm(deleting=True))
    assert s.needs_work(vm(PLACED))  # label but no status yet (controller died in between)
    assert s.needs_work(vm(PLACED, {"nodeName": "n1", "conditions": [scheduled_cond("False")]}))
    assert s.needs_work(vm(PLACED, {"nodeName": "n0", "conditions": [scheduled_cond()]}))
    assert not s.needs_work(vm(PLACED, {"nodeName": "n1", "conditions": [scheduled_cond()]}))


def managed(manager, status_fields):
    return {"manager": manager, "operation": "Apply", "subresource": "status",
            "fieldsV1": {"f:status": {k: {} for k in status_fields}}}


def test_phase_ownership_from_managed_fields():
    assert not s.phase_owned_by_others(vm())
    assert not s.phase_owned_by_others(vm(managed=[managed(meta.CONTROLLER_MANAGER, ["f:phase"])]))
    assert not s.phase_owned_by_others(vm(managed=[managed(meta.agent_manager("n1"), ["f:conditions"])]))
    for agent in (meta.agent_manager("n1"), meta.agent_jobs_manager("n1")):  # each agent has its own manager
        assert s.phase_owned_by_others(vm(managed=[managed(meta.CONTROLLER_MANAGER, ["f:phase"]),
                                                   managed(agent, ["f:phase"])]))


def test_scheduled_status():
    out = s.scheduled(vm(PLACED), "n1", "placed on node n1", with_phase=True)
    assert out["nodeName"] == "n1" and out["phase"] == "Scheduled"
    [cond] = out["conditions"]
    assert (cond["type"], cond["status"], cond["reason"], cond["observedGeneration"]) == (
        "Scheduled", "True", "Scheduled", 3)
    assert "phase" not in s.scheduled(vm(PLACED), "n1", "x", with_phase=False)


def test_unscheduled_status_has_no_node_and_keeps_transition_time():
    old = vm(status={"conditions": [{**scheduled_cond("False"), "reason": "NoNodeAvailable"}]})
    out = s.unscheduled(old, Decision(None, "InsufficientMemory", "needs 3Gi"), with_phase=True)
    assert "nodeName" not in out and out["phase"] == "Pending"
    [cond] = out["conditions"]
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "InsufficientMemory", "needs 3Gi")
    assert cond["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_condition_changed():
    d = Decision(None, "NoNodeAvailable", "m")
    assert s.condition_changed(vm(), d)
    assert not s.condition_changed(vm(status={"conditions": [{**scheduled_cond("False"), "reason": d.reason}]}), d)
    assert s.condition_changed(vm(status={"conditions": [scheduled_cond("False")]}), d)


def test_a_slim_vm_decides_and_reports_as_the_full_one():
    from libvirt_operator.controller import placement
    from libvirt_operator.controller.vm_scheduling import slim

    full = vm(status={"conditions": [scheduled_cond("False")], "phase": "Pending", "qos": {"x": 1}},
              managed=[managed(meta.CONTROLLER_MANAGER, ["f:conditions"]),
                       managed(meta.agent_manager("n1"), ["f:phase"])])
    full["metadata"].update(uid="u1", resourceVersion="7", creationTimestamp="2026-01-01T00:00:00Z")
    full["spec"] = {"memory": {"size": "1Gi", "maxSize": "2Gi"}, "nodeName": "n1", "boot": {"kernel": {}},
                    "disks": [{"name": "d", "path": "/i/d.qcow2"}],
                    "interfaces": [{"name": "a", "type": "user", "mac": "52:54:00:00:00:01"}]}
    small = slim(full)
    assert placement.vm_ref(small) == placement.vm_ref(full)
    assert s.needs_work(small) == s.needs_work(full)
    assert s.phase_owned_by_others(small) and s.phase_owned_by_others(full)
    assert s.find_condition(small) == s.find_condition(full)
    assert small["metadata"]["resourceVersion"] == "7" and "qos" not in small["status"]
    assert s.scheduled(small, "n1", "m", False) == s.scheduled(full, "n1", "m", False)
