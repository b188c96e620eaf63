"""Build the status Report of a pass from what its steps found (the one place status is composed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from libvirt_operator.agent import power, requests, status
from libvirt_operator.agent.devices import device_facts
from libvirt_operator.agent.liveupdate.apply import Outcome
from libvirt_operator.agent.liveupdate.plan import Plan
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor import readxml
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.kube import conditions
from libvirt_operator.kube.conditions import Cond

EXTRA = ("RestartRequired", "Drifted", "HostDeviceUnavailable", "QosApplied")


@dataclass
class Live:
    """What the live-update step saw and did."""

    facts_xml: DomainConfig  # the domain whose devices status reports
    running: bool
    xml: str = ""  # live XML (running only)
    plan: Plan = field(default_factory=Plan)
    result: Outcome | None = None
    matched_generation: int | None = None  # newest generation the running domain matched
    capacities: dict[str, int] = field(default_factory=dict)
    requeue: float | None = None
    qos_condition: Cond | None = None  # QosApplied
    qos_applied: dict | None = None  # status.qosApplied


def for_pass(obj: dict, spec: VirtualMachineSpec, guest: Guest, after: power.Decision, stopping: bool,
             outcomes: dict, live: Live, unavailable: dict[str, str],
             refused: HypervisorError | None) -> status.Report:
    st = obj.get("status") or {}
    gen = obj["metadata"].get("generation", 1)
    p, result = live.plan, live.result or Outcome()
    drift = live.running and live.matched_generation == gen
    restart = p.restart if live.running else []
    if refused is None and stopping and (st.get("shutdown") or {}).get("lastError"):
        reason, _, text = st["shutdown"]["lastError"].partition(": ")
        refused = HypervisorError(reason, text)  # refused when last sent: still true until sent again
    failure = _failure(after, refused, result, p)
    extra = []
    if restart:
        names = ", ".join(restart)
        extra.append(Cond("Drifted", True, "ChangedOutsideOperator",
                          f"the running domain differs from the spec in {names} and cannot be put back live")
                     if drift else
                     Cond("RestartRequired", True, "RestartRequired",
                          f"{names} apply at the next restart (set spec.restart: {{id: <new id>}}); the definition "
                          "already holds them"))
    if unavailable:
        extra.append(Cond("HostDeviceUnavailable", True, "HostDeviceUnavailable",
                          "; ".join(f"{k}: {v}" for k, v in sorted(unavailable.items()))))
    if live.qos_condition is not None:
        extra.append(live.qos_condition)
    reason, message = _not_ready(after, failure, restart, drift, result, p, unavailable, live.running)
    ready = Cond("Ready", reason is None, reason or after.reason, message or ("" if reason is None else after.message))
    halted = gen if st.get("haltedGeneration") == gen or after.halt else None
    converged = not live.running or (p.converged and not result.waiting)
    observed = None if converged else (live.matched_generation or 0)
    return status.Report(
        phase=after.phase, generation=gen, observed_generation=observed, ready=ready,
        domain={"name": guest.name, "uuid": guest.uuid},
        agent_connected=agent_condition(spec, live), failure=failure, extra=extra,
        halted_generation=halted, shutdown=st.get("shutdown") if stopping else None, requests=outcomes,
        devices={**device_facts(live.facts_xml, live.capacities),
                 "qosApplied": live.qos_applied if live.running else st.get("qosApplied")},
        pending_restart=[] if drift else restart,
    )


def _failure(after: power.Decision, refused, result: Outcome, p: Plan) -> Cond | None:
    if after.timed_out:
        return Cond("Failure", True, "ShutdownTimeout", after.message)
    if refused is not None:
        return Cond("Failure", True, refused.reason, f"shutdown request refused: {refused.message}")
    if result.failed:
        return Cond("Failure", True, "LiveUpdateFailed",
                    "; ".join(f"{s.field} ({s.describe()}): {e.reason}: {e.message}" for s, e in result.failed))
    if result.timed_out:
        return Cond("Failure", True, "DetachTimeout",
                    "; ".join(f"{s.field}: the guest has not released {s.alias}" for s in result.timed_out))
    if p.refused:
        return Cond("Failure", True, "ShrinkRefused", "; ".join(f"{f}: {why}" for f, why in p.refused))
    return None


def _not_ready(after, failure, restart, drift, result: Outcome, p: Plan, unavailable, running):
    """(reason, message) why the VM is not Ready, or (None, None)."""
    if not after.converged:
        return after.reason, after.message
    if failure is not None:
        return failure.reason, failure.message
    if restart:
        return ("Drifted" if drift else "RestartRequired"), ", ".join(restart)
    if running and (result.waiting or p.steps):
        what = result.waiting or p.steps
        return ("DetachPending" if result.waiting else "LiveUpdatePending"), ", ".join(s.describe() for s in what)
    if unavailable:
        return "HostDeviceUnavailable", ", ".join(sorted(unavailable))
    return None, None


def agent_condition(spec: VirtualMachineSpec, live: Live) -> Cond | None:
    if not spec.guest_agent:
        return None
    if not live.running:
        return Cond("AgentConnected", False, "DomainNotRunning")
    connected = readxml.agent_channel_state(live.xml) == "connected"
    return Cond("AgentConnected", connected, "Connected" if connected else "NotConnected",
                "" if connected else "qemu-guest-agent has not connected on its channel")


def now(obj: dict, guest: Guest, seen: power.Observed, outcomes: dict) -> status.Report:
    """Mid-pass status (to record a request as InProgress before acting), the rest carried."""
    st = obj.get("status") or {}
    ready = Cond("Ready", seen.state == "running", "Running" if seen.state == "running" else "NotRunning")
    return status.Report(phase=st.get("phase") or "Running", ready=ready,
                         generation=obj["metadata"].get("generation", 1),
                         observed_generation=st.get("observedGeneration") or 0,
                         domain={"name": guest.name, "uuid": guest.uuid},
                         agent_connected=_carried_one(st, "AgentConnected"),
                         failure=_carried_one(st, "Failure"),
                         extra=status.carried_conditions(st, EXTRA),
                         halted_generation=st.get("haltedGeneration"), shutdown=st.get("shutdown"),
                         requests=outcomes, devices=status.carried_devices(st),
                         pending_restart=st.get("pendingRestart") or [])


def busy(obj: dict, guest: Guest | None, held) -> status.Report:
    """A job (snapshot, revert) holds the VM: nothing else is done to it; what is known is kept."""
    st = obj.get("status") or {}
    domain = {"name": guest.name, "uuid": guest.uuid} if guest else st.get("domain")
    return status.Report(phase=st.get("phase") or "Pending", generation=obj["metadata"].get("generation", 1),
                         observed_generation=st.get("observedGeneration") or 0,
                         ready=Cond("Ready", False, held.kind, held.what), domain=domain,
                         agent_connected=_carried_one(st, "AgentConnected"),
                         failure=_carried_one(st, "Failure"), extra=status.carried_conditions(st, EXTRA),
                         halted_generation=st.get("haltedGeneration"), shutdown=st.get("shutdown"),
                         requests=requests.carried(st), devices=status.carried_devices(st),
                         pending_restart=st.get("pendingRestart") or [])


def failure(obj: dict, reason: str, message: str, guest: Guest | None, active: bool | None, cfg) -> status.Report:
    """A pass that could not finish: Ready False with the reason; what is known is kept.
    ``active`` None: libvirt could not be asked (the domain's state is unknown)."""
    st = obj.get("status") or {}
    gen = obj["metadata"].get("generation", 1)
    if reason == "ConnectionLost":
        reason, message = "LibvirtUnavailable", (f"no connection to libvirt on {cfg.node_name} ({cfg.libvirt_uri}): "
                                                 f"{message}; the domain's state is unknown")
    phase = (st.get("phase") or "Failed") if active in (True, None) else "Failed"
    domain = {"name": guest.name, "uuid": guest.uuid} if guest else st.get("domain")
    agent = _carried_one(st, "AgentConnected")
    if active is None and agent is not None:
        agent = Cond("AgentConnected", None, "Unknown", "libvirt is unreachable")
    return status.Report(
        phase=phase, generation=gen, observed_generation=st.get("observedGeneration") or 0,
        ready=Cond("Ready", False, reason, message), domain=domain, agent_connected=agent,
        failure=Cond("Failure", True, reason, message), extra=status.carried_conditions(st, EXTRA),
        halted_generation=st.get("haltedGeneration"), shutdown=st.get("shutdown"),
        requests=requests.carried(st), devices=status.carried_devices(st),
        pending_restart=st.get("pendingRestart") or [])


def previous_reason(st: dict) -> str | None:
    return (conditions.find(st, "Failure") or {}).get("reason")


def _carried_one(st: dict, type_: str) -> Cond | None:
    found = status.carried_conditions(st, (type_,))
    return found[0] if found else None
