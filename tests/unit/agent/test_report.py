"""Status composition: Ready and observedGeneration mean the running domain matches the spec."""

from __future__ import annotations

from types import SimpleNamespace

from libvirt_operator.agent import power, report, status
from libvirt_operator.agent.liveupdate.apply import Outcome
from libvirt_operator.agent.liveupdate.plan import Op, Plan, Step
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain
from libvirt_operator.hypervisor.errors import HypervisorError

GUEST = SimpleNamespace(name="default_vm", uuid="u1")
SPEC = VirtualMachineSpec.model_validate({"memory": {"size": "192Mi"}, "guestAgent": False,
                                          "disks": [{"name": "root", "path": "/img/root.qcow2"}]})
RUNNING = power.Decision(power.Action.NONE, "Running", True, "Running")


def obj(gen=3, **status_) -> dict:
    return {"metadata": {"generation": gen, "namespace": "default", "name": "vm"}, "status": status_}


def live(plan=None, result=None, matched=2) -> report.Live:
    dom = render_domain(SPEC, name="default_vm", uuid="u1", namespace="default", vm_name="vm", generation=1,
                        domain_type="qemu", console_log=None)
    return report.Live(facts_xml=dom, running=True, plan=plan or Plan(), result=result, matched_generation=matched)


def rendered(**kw) -> dict:
    rep = report.for_pass(obj(), SPEC, GUEST, RUNNING, False, {}, kw.pop("live", live()), kw.pop("unavailable", {}),
                          kw.pop("refused", None))
    return status.render(rep, None)


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st["conditions"] if c["type"] == type_), {})


def test_converged_running_domain_is_ready_for_this_generation():
    st = rendered()
    assert st["observedGeneration"] == 3 and cond(st, "Ready")["status"] == "True"
    assert st["disks"][0]["name"] == "root" and st["memory"] == "192Mi" and st["vcpus"] == 1


def test_restart_required_keeps_the_generation_the_domain_matches():
    st = rendered(live=live(Plan(restart=["boot", "cpu.maxVcpus"])))
    assert st["observedGeneration"] == 2
    assert cond(st, "Ready")["status"] == "False" and cond(st, "Ready")["reason"] == "RestartRequired"
    assert cond(st, "RestartRequired")["status"] == "True" and "boot, cpu.maxVcpus" in cond(st, "RestartRequired")[
        "message"]
    assert st["pendingRestart"] == ["boot", "cpu.maxVcpus"]


def test_a_difference_at_the_generation_already_matched_is_drift():
    st = rendered(live=live(Plan(restart=["cpu.vcpus"]), matched=3))
    assert cond(st, "Drifted")["status"] == "True" and cond(st, "RestartRequired") == {}
    assert cond(st, "Ready")["reason"] == "Drifted" and "pendingRestart" not in st


def test_failed_and_pending_steps_and_unavailable_devices():
    step = Step(Op.ATTACH, "disks[d]", alias="ua-disk-d")
    failed = rendered(live=live(Plan(steps=[step]), Outcome(failed=[(step, HypervisorError("AttachFailed", "x"))])))
    assert cond(failed, "Failure")["reason"] == "LiveUpdateFailed" and failed["observedGeneration"] == 2
    detach = Step(Op.DETACH, "disks[d]", alias="ua-disk-d")
    waiting = rendered(live=live(Plan(steps=[detach]), Outcome(waiting=[detach])))
    assert cond(waiting, "Ready")["reason"] == "DetachPending"
    gone = rendered(unavailable={"hostDevices[k]": "no USB device"})
    assert cond(gone, "HostDeviceUnavailable")["status"] == "True" and cond(gone, "Ready")["status"] == "False"


def test_a_refused_shutdown_is_a_failure_but_the_pass_goes_on():
    st = rendered(refused=HypervisorError("GuestAgentUnavailable", "agent not connected"))
    assert cond(st, "Failure")["reason"] == "GuestAgentUnavailable"


def test_lost_libvirt_keeps_what_is_known_and_says_so():
    cfg = SimpleNamespace(node_name="node-a", libvirt_uri="qemu+tcp://127.0.0.1:1/system")
    before = obj(observedGeneration=2, disks=[{"name": "root"}], conditions=[
        {"type": "RestartRequired", "status": "True", "reason": "RestartRequired", "message": "boot"},
        {"type": "AgentConnected", "status": "True", "reason": "Connected", "message": ""}])
    st = status.render(report.failure(before, "ConnectionLost", "eof", None, None, cfg), before["status"])
    assert cond(st, "Ready")["reason"] == "LibvirtUnavailable" and "node-a" in cond(st, "Ready")["message"]
    assert cond(st, "AgentConnected")["status"] == "Unknown" and cond(st, "RestartRequired")["status"] == "True"
    assert st["observedGeneration"] == 2 and st["disks"] == [{"name": "root"}]
