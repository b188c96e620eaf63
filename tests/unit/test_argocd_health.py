"""The Argo CD health checks under a real Lua 5.1 interpreter (Argo CD runs gopher-lua, a Lua 5.1),
against status objects as the operator writes them.

The scripts run are the ones argocd/argocd-cm-patch.yaml carries, as Argo CD reads them: each key is
the shared prelude argocd/health/_common.lua followed by argocd/health/<Kind>.lua, assembled by
argocd/build_cm_patch.py; the patch tests fail while the file is stale.

VirtualMachine statuses are rendered by the real code: the controller's schedule_status, the
agent's power.decide and status.render. The other kinds have no writer yet: their statuses are
validated against the API's pydantic status models.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from pathlib import Path

import lupa.lua51 as lua51
import pytest
import yaml

from libvirt_operator.agent import power
from libvirt_operator.agent import status as agent_status
from libvirt_operator.api.virtualmachine import VirtualMachineStatus
from libvirt_operator.api.vmmigration import VMMigrationStatus
from libvirt_operator.api.vmqospolicy import VMQosPolicyStatus
from libvirt_operator.api.vmsnapshot import VMSnapshotStatus
from libvirt_operator.controller import placement, schedule_status
from libvirt_operator.kube.conditions import Cond

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "argocd" / "argocd-cm-patch.yaml"
KINDS = ("VirtualMachine", "VMSnapshot", "VMMigration", "VMQosPolicy")
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def cm_key(kind: str) -> str:
    return f"resource.customizations.health.virt.libvirt-operator.io_{kind}"


@functools.cache
def cm_patch() -> dict:
    return yaml.safe_load(PATCH.read_text())


@functools.cache
def generator():
    spec = importlib.util.spec_from_file_location("build_cm_patch", REPO / "argocd" / "build_cm_patch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def health(kind: str, obj: dict) -> tuple[str, str]:
    """Run the kind's script from the ConfigMap as Argo CD does: the resource in the global `obj`,
    `hs` returned."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    hs = lua.execute(cm_patch()["data"][cm_key(kind)])
    assert hs is not None, "the script must return hs"
    st, message = hs["status"], hs["message"]
    assert st in STATUSES and isinstance(message, str) and message
    return st, message


# -- the ConfigMap patch ------------------------------------------------------------------------

def test_cm_patch_carries_each_assembled_script_under_argo_cd_key():
    doc = cm_patch()
    assert (doc["kind"], doc["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    health_dir = REPO / "argocd" / "health"
    prelude = (health_dir / "_common.lua").read_text()
    expected = {cm_key(k): prelude + "\n" + (health_dir / f"{k}.lua").read_text() for k in KINDS}
    assert doc["data"] == expected, "argocd-cm-patch.yaml is stale: run python argocd/build_cm_patch.py"
    assert {cm_key(k): generator().script(k) for k in KINDS} == expected


def test_cm_patch_generator_reproduces_the_file():
    assert generator().render() == PATCH.read_text()
    assert generator().main(["--check"]) == 0


def test_cm_patch_check_mode_fails_when_stale(tmp_path, monkeypatch):
    stale = tmp_path / "argocd-cm-patch.yaml"
    stale.write_text(PATCH.read_text().replace("Being deleted", "Being removed"))
    monkeypatch.setattr(generator(), "PATCH", stale)
    assert generator().main(["--check"]) == 1


def test_each_script_is_standalone():
    # Argo CD has no require: the prelude must be inlined, and the kind rules must not load modules.
    for kind in KINDS:
        script = cm_patch()["data"][cm_key(kind)]
        assert not re.search(r"\brequire\s*[(\"']", script) and "local function find_condition" in script


# -- VirtualMachine -----------------------------------------------------------------------------

NODE = "node-a"


def vm(generation: int = 1, power_state: str = "Running", restart_policy: str = "OnFailure") -> dict:
    return {
        "apiVersion": "virt.libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "default", "uid": "u-1", "generation": generation,
                     "labels": {}},
        "spec": {"powerState": power_state, "restartPolicy": restart_policy, "memory": {"size": "1Gi"}},
    }


def placed(obj: dict) -> dict:
    """The controller's status after placing the VM on NODE."""
    obj["metadata"]["labels"]["virt.libvirt-operator.io/node"] = NODE
    obj["status"] = schedule_status.scheduled(obj, NODE, f"placed on node {NODE}", with_phase=True)
    return obj


def unplaced(obj: dict, reason: str, message: str) -> dict:
    obj["status"] = schedule_status.unscheduled(obj, placement.Decision(None, reason, message), with_phase=True)
    return obj


def desired(obj: dict) -> power.Desired:
    spec = obj["spec"]
    return power.Desired(spec["powerState"], spec["restartPolicy"], "acpi", 60.0, False,
                         obj["metadata"]["generation"])


def agent_reports(obj: dict, report: agent_status.Report) -> dict:
    """Merge the agent's rendered status into the object, as server-side apply does."""
    mine = agent_status.render(report, obj.get("status"))
    theirs = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Scheduled"]
    obj["status"] = {**(obj.get("status") or {}), **mine, "conditions": theirs + mine["conditions"]}
    VirtualMachineStatus.model_validate(obj["status"])
    return obj


def after_pass(obj: dict, seen: power.Observed, past: power.History | None = None,
               observed_generation: int | None = None) -> dict:
    """The status one agent pass writes for what it sees (as Reconciler._report builds it)."""
    d = power.decide(desired(obj), seen, past or power.History())
    gen = observed_generation or obj["metadata"]["generation"]
    failure = Cond("Failure", True, "ShutdownTimeout", d.message) if d.timed_out else None
    return agent_reports(obj, agent_status.Report(
        phase=d.phase, generation=gen, ready=Cond("Ready", d.converged and failure is None, d.reason, d.message),
        domain={"name": "default_web", "uuid": "u-1"}, failure=failure,
        halted_generation=gen if d.halt else None))


def failed(obj: dict, reason: str, message: str) -> dict:
    """The status of Reconciler._report_failure for a VM whose domain is not running."""
    return agent_reports(obj, agent_status.Report(
        phase="Failed", generation=obj["metadata"]["generation"], ready=Cond("Ready", False, reason, message),
        failure=Cond("Failure", True, reason, message)))


RUNNING = power.Observed("running", "booted")


def test_vm_without_status_is_progressing():
    assert health("VirtualMachine", vm())[0] == "Progressing"


def test_vm_that_cannot_be_placed_is_degraded_with_the_reason():
    obj = unplaced(vm(), placement.INSUFFICIENT_MEMORY, "no node has 1Gi free")
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and "InsufficientMemory" in message and "1Gi" in message


def test_vm_whose_new_spec_the_controller_has_not_judged_is_progressing():
    obj = unplaced(vm(generation=1), placement.NO_NODE_AVAILABLE, "no agent is alive")
    obj["metadata"]["generation"] = 2
    assert health("VirtualMachine", obj)[0] == "Progressing"


def test_vm_placed_but_not_yet_seen_by_the_agent_is_progressing():
    st, message = health("VirtualMachine", placed(vm()))
    assert st == "Progressing" and NODE in message


def test_running_vm_is_healthy():
    obj = after_pass(placed(vm()), RUNNING)
    assert obj["status"]["phase"] == "Running"
    assert health("VirtualMachine", obj) == ("Healthy", f"Running on {NODE}")


def test_vm_whose_spec_changed_since_the_agent_looked_is_progressing():
    obj = after_pass(placed(vm()), RUNNING)
    obj["metadata"]["generation"] = 2
    st, message = health("VirtualMachine", obj)
    assert st == "Progressing" and "generation 2" in message


def test_starting_vm_is_progressing():
    # Reconciler._report after a start whose domain is not active yet: phase Starting, while
    # Ready comes from deciding again on what it sees (and may say True).
    obj = placed(vm())
    shutoff = power.Observed("shutoff", "unknown")
    d = power.decide(desired(obj), shutoff, power.History())
    assert d.action is power.Action.START
    after = power.decide(desired(obj), shutoff, power.History(phase=d.phase))
    obj = agent_reports(obj, agent_status.Report(
        phase="Starting", generation=1, ready=Cond("Ready", after.converged, after.reason, after.message)))
    assert health("VirtualMachine", obj) == ("Progressing", "Starting")


def test_vm_shutting_down_is_progressing():
    obj = after_pass(placed(vm(power_state="Stopped")), RUNNING)
    assert obj["status"]["phase"] == "Stopping"
    st, message = health("VirtualMachine", obj)
    assert st == "Progressing" and "ShuttingDown" in message


def test_vm_stopped_as_asked_is_healthy():
    obj = after_pass(placed(vm(power_state="Stopped")), power.Observed("shutoff", "shutdown"))
    assert health("VirtualMachine", obj) == ("Healthy", "Stopped as the spec asks")


def test_vm_paused_as_asked_is_healthy_not_suspended():
    obj = after_pass(placed(vm(power_state="Paused")), power.Observed("paused", "user"))
    assert obj["status"]["phase"] == "Paused"
    assert health("VirtualMachine", obj) == ("Healthy", "Paused as the spec asks")


def test_vm_paused_by_the_hypervisor_is_degraded():
    obj = after_pass(placed(vm()), power.Observed("paused", "ioerror"))
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and "PausedByHypervisor" in message and "ioerror" in message


def test_shutdown_timeout_is_degraded():
    obj = placed(vm(power_state="Stopped"))
    obj = after_pass(obj, RUNNING, power.History(phase="Stopping", shutdown_elapsed=120.0))
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and message.startswith("ShutdownTimeout: the guest did not power off")


def test_vm_that_stopped_on_its_own_is_degraded():
    obj = placed(vm(restart_policy="Never"))
    obj = after_pass(obj, power.Observed("shutoff", "shutdown"), power.History(phase="Running"))
    assert obj["status"]["haltedGeneration"] == 1
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and "GuestShutdown" in message


def test_vm_the_agent_cannot_run_is_degraded():
    obj = failed(placed(vm()), "PathNotAllowed", "disk root: /etc/passwd is outside the storage roots")
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and message.startswith("PathNotAllowed: disk root")


def live_change(obj: dict, reason: str, message: str) -> dict:
    """The agent judged generation 2, but the running domain still matches generation 1."""
    obj = after_pass(placed(vm()), RUNNING)
    obj["metadata"]["generation"] = 2
    return agent_reports(obj, agent_status.Report(
        phase="Running", generation=2, observed_generation=1, ready=Cond("Ready", False, reason, message),
        domain={"name": "default_web", "uuid": "u-1"}))


@pytest.mark.parametrize("reason", ["RestartRequired", "Drifted", "HostDeviceUnavailable"])
def test_vm_waiting_for_a_restart_or_the_host_is_degraded(reason):
    st, message = health("VirtualMachine", live_change(vm(), reason, "boot"))
    assert st == "Degraded" and reason in message and "boot" in message


def test_vm_applying_a_live_change_is_progressing():
    st, message = health("VirtualMachine", live_change(vm(), "LiveUpdatePending", "attach ua-disk-d"))
    assert st == "Progressing" and "LiveUpdatePending" in message


def test_failure_judged_for_this_generation_is_degraded_though_the_domain_lags():
    obj = after_pass(placed(vm()), RUNNING)
    obj["metadata"]["generation"] = 2
    obj = agent_reports(obj, agent_status.Report(
        phase="Running", generation=2, observed_generation=1, ready=Cond("Ready", False, "LiveUpdateFailed", "x"),
        failure=Cond("Failure", True, "LiveUpdateFailed", "attach failed")))
    st, message = health("VirtualMachine", obj)
    assert st == "Degraded" and "attach failed" in message


def test_vm_being_deleted_is_progressing():
    obj = after_pass(placed(vm()), RUNNING)
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert health("VirtualMachine", obj)[0] == "Progressing"


# -- VMSnapshot, VMMigration, VMQosPolicy -------------------------------------------------------

def cond(type_: str, status: bool, reason: str, message: str = "", generation: int = 1) -> dict:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": generation}


def obj_with(kind: str, status: dict | None, model, generation: int = 1) -> dict:
    if status is not None:
        model.model_validate(status)
    out = {"apiVersion": "virt.libvirt-operator.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x", "namespace": "default", "generation": generation}, "spec": {}}
    if status is not None:
        out["status"] = status
    return out


def snapshot(status: dict | None, generation: int = 1) -> dict:
    return obj_with("VMSnapshot", status, VMSnapshotStatus, generation)


@pytest.mark.parametrize(("status", "expected"), [
    (None, "Progressing"),
    ({"phase": "Pending", "observedGeneration": 1}, "Progressing"),
    ({"phase": "InProgress", "observedGeneration": 1, "nodeName": NODE,
      "conditions": [cond("Ready", False, "SavingMemory", "saving guest memory")]}, "Progressing"),
    ({"phase": "Ready", "observedGeneration": 1, "creationTime": "2026-01-01T00:00:00Z",
      "conditions": [cond("Ready", True, "SnapshotReady")]}, "Healthy"),
])
def test_snapshot_phases(status, expected):
    assert health("VMSnapshot", snapshot(status))[0] == expected


def test_failed_snapshot_is_degraded_with_the_reason():
    st, message = health("VMSnapshot", snapshot({
        "phase": "Failed", "observedGeneration": 1,
        "conditions": [cond("Ready", False, "SystemDiskRefused", "a disk-only snapshot cannot include the "
                            "system disk"), cond("Failure", True, "SystemDiskRefused", "refused: disk root")]}))
    assert st == "Degraded" and message == "SystemDiskRefused: refused: disk root"


def test_snapshot_with_a_newer_spec_is_progressing():
    st = {"phase": "Ready", "observedGeneration": 1, "conditions": [cond("Ready", True, "SnapshotReady")]}
    assert health("VMSnapshot", snapshot(st, generation=2))[0] == "Progressing"


def migration(status: dict | None) -> dict:
    return obj_with("VMMigration", status, VMMigrationStatus)


def test_running_migration_is_progressing_with_its_percentage():
    st, message = health("VMMigration", migration({
        "phase": "Running", "observedGeneration": 1, "sourceNode": "node-a", "targetNode": "node-b",
        "progress": {"dataTotalBytes": 200, "dataProcessedBytes": 84, "percent": 42}}))
    assert st == "Progressing" and message == "Running (node-a -> node-b): 42%"


@pytest.mark.parametrize(("status", "expected"), [
    (None, "Progressing"),
    ({"phase": "Pending", "observedGeneration": 1}, "Progressing"),
    ({"phase": "Succeeded", "observedGeneration": 1, "sourceNode": "node-a", "targetNode": "node-b",
      "completionTime": "2026-01-01T00:01:00Z", "conditions": [cond("Ready", True, "Migrated")]}, "Healthy"),
])
def test_migration_phases(status, expected):
    assert health("VMMigration", migration(status))[0] == expected


@pytest.mark.parametrize("phase", ["Failed", "Aborted"])
def test_failed_or_aborted_migration_is_degraded(phase):
    st, message = health("VMMigration", migration({
        "phase": phase, "observedGeneration": 1,
        "conditions": [cond("Ready", False, "MigrationTimeout", "did not converge within 600s")]}))
    assert st == "Degraded" and message == f"{phase}: MigrationTimeout: did not converge within 600s"


def qos(status: dict | None, generation: int = 1) -> dict:
    return obj_with("VMQosPolicy", status, VMQosPolicyStatus, generation)


def test_active_qos_policy_is_healthy():
    st, message = health("VMQosPolicy", qos({"phase": "Active", "observedGeneration": 1, "matchedVms": 3,
                                            "conditions": [cond("Ready", True, "Applied")]}))
    assert (st, message) == ("Healthy", "Applied to 3 VM(s)")


def test_degraded_qos_policy_is_degraded_with_the_reason():
    st, message = health("VMQosPolicy", qos({
        "phase": "Degraded", "observedGeneration": 2, "matchedVms": 2,
        "conditions": [cond("Ready", False, "HostCannotHonour", "node-b has no cpu.max", generation=2)]},
        generation=2))
    assert st == "Degraded" and message == "HostCannotHonour: node-b has no cpu.max"


@pytest.mark.parametrize("obj", [qos(None), qos({"phase": "Active", "observedGeneration": 1}, generation=2)])
def test_qos_policy_not_applied_yet_is_progressing(obj):
    assert health("VMQosPolicy", obj)[0] == "Progressing"
