"""Power verbs of kubectl-virsh: the patches they make and the outcomes they wait for."""

from __future__ import annotations

import jsonpatch
import pytest
from virsh_cases import applied_status, apply, make_vm, plan

from libvirt_operator.cli.plan import Refused


def halted_vm(**spec) -> dict:
    vm = make_vm(**spec)
    vm["status"] = {"phase": "Stopped", "haltedGeneration": 3, "observedGeneration": 3, "conditions": [
        {"type": "Ready", "status": "False", "reason": "GuestShutdown", "message": "the guest shut itself down"}]}
    return vm


def test_start_a_stopped_vm_sets_running_and_waits_for_running_ready():
    vm = make_vm(powerState="Stopped")
    p = plan("start web", vm)
    after = apply(vm, p)
    assert after["spec"]["powerState"] == "Running" and after["metadata"]["generation"] == 4
    check = p.check(after)
    assert check(applied_status(after, generation=3)) is None  # the old generation says nothing
    assert check(applied_status(after, phase="Starting", ready=False)) is None
    assert check(applied_status(after)).ok


def test_start_after_a_halt_patches_twice_each_guarded():
    vm = halted_vm()
    p = plan("start web", vm)
    assert "stopped on its own" in p.summary and "GuestShutdown" in p.summary and p.note
    assert len(p.patches) == 2
    after = apply(vm, p)
    assert after["spec"]["powerState"] == "Running" and after["metadata"]["generation"] == 5
    stale = make_vm(generation=4, status=vm["status"])  # someone changed it meanwhile
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(stale, p)


def test_start_refuses_a_paused_vm_and_is_a_noop_when_running():
    with pytest.raises(Refused, match="resume web"):
        plan("start web", make_vm(powerState="Paused"))
    p = plan("start web", make_vm())
    assert p.actions == [] and "already Running" in p.summary and p.check is not None


@pytest.mark.parametrize(("argv", "mode", "what"), [
    ("shutdown web", "acpi", "acpi shutdown"),
    ("shutdown web --mode agent", "agent", "agent shutdown"),
    ("destroy web", "force", "forced power-off"),
])
def test_shutdown_and_destroy_set_stopped_with_the_mode(argv, mode, what):
    vm = make_vm()
    p = plan(argv, vm)
    after = apply(vm, p)
    assert after["spec"]["powerState"] == "Stopped" and after["spec"]["shutdown"]["mode"] == mode
    assert after["spec"]["shutdown"]["timeoutSeconds"] == 120  # the rest of shutdown is kept
    assert what in p.summary
    assert p.check(after)(applied_status(after, phase="Stopped")).ok


def test_shutdown_keeps_the_specs_graceful_mode_and_noop_when_already_stopped():
    vm = make_vm(shutdown={"mode": "agent", "timeoutSeconds": 60, "forceAfterTimeout": False})
    assert apply(vm, plan("shutdown web", vm))["spec"]["shutdown"]["mode"] == "agent"
    stopped = make_vm(powerState="Stopped", shutdown={"mode": "force"})
    assert plan("destroy web", stopped).actions == []
    assert plan("shutdown web", stopped).actions  # a graceful mode differs from force: patched


def test_a_failure_ends_the_wait_for_stopped():
    vm = make_vm()
    p = plan("shutdown web --mode agent", vm)
    after = apply(vm, p)
    now = applied_status(after, ready=False, Failure=("GuestAgentUnavailable", "no agent"))
    outcome = p.check(after)(now)
    assert not outcome.ok and outcome.message.startswith("GuestAgentUnavailable")


def test_suspend_and_resume():
    vm = make_vm()
    after = apply(vm, plan("suspend web", vm))
    assert after["spec"]["powerState"] == "Paused"
    assert apply(after, plan("resume web", after))["spec"]["powerState"] == "Running"
    with pytest.raises(Refused, match="is not paused"):
        plan("resume web", vm)
    with pytest.raises(Refused, match="nothing to suspend"):
        plan("suspend web", make_vm(powerState="Stopped"))


@pytest.mark.parametrize(("argv", "field", "status_field", "body"), [
    ("reboot web --mode agent --id r1", "reboot", "lastReboot", {"id": "r1", "mode": "agent"}),
    ("reboot web --id r1", "reboot", "lastReboot", {"id": "r1", "mode": "acpi"}),
    ("reset web --id r1", "reset", "lastReset", {"id": "r1"}),
    ("restart web --id r1", "restart", "lastRestart", {"id": "r1"}),
])
def test_one_shot_requests_wait_for_their_outcome(argv, field, status_field, body):
    vm = make_vm()
    p = plan(argv, vm)
    after = apply(vm, p)
    assert after["spec"][field] == body and "(id r1)" in p.summary
    check = p.check(after)
    outcome = {"id": "r1", "result": "InProgress", "time": "t"}
    assert check({**after, "status": {status_field: {**outcome, "id": "r0", "result": "Succeeded"}}}) is None
    assert check({**after, "status": {status_field: outcome}}) is None
    assert check({**after, "status": {status_field: {**outcome, "result": "Succeeded"}}}).ok
    failed = check({**after, "status": {status_field: {**outcome, "result": "Failed", "message": "boom"}}})
    assert not failed.ok and failed.message == "Failed: boom"


def test_a_new_request_id_each_time():
    vm = make_vm()
    first, second = (apply(vm, plan("restart web", vm))["spec"]["restart"]["id"] for _ in range(2))
    assert first != second and first.startswith("kv-")


def test_restart_refuses_a_vm_that_does_not_run_and_names_what_it_applies():
    with pytest.raises(Refused, match="apply when it starts"):
        plan("restart web", make_vm(powerState="Stopped"))
    with pytest.raises(Refused, match="resume it first"):
        plan("restart web", make_vm(powerState="Paused"))
    vm = make_vm(status={"pendingRestart": ["cpu.maxVcpus"]})
    assert "cpu.maxVcpus" in plan("restart web", vm).note
