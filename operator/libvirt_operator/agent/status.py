"""The agent's part of a VirtualMachine's status, built in one place and applied by server-side apply."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from libvirt_operator.api import meta
from libvirt_operator.kube import conditions, resources
from libvirt_operator.kube.conditions import Cond

log = logging.getLogger(__name__)

# Status fields the agent owns (server-side apply removes what an apply omits).
AGENT_FIELDS = ("phase", "observedGeneration", "domain", "haltedGeneration", "shutdown", "lastReboot", "lastReset",
                "lastRestart", "vcpus", "memory", "disks", "interfaces", "pendingRestart", "qosApplied")
AGENT_CONDITIONS = ("Ready", "AgentConnected", "Failure", "RestartRequired", "Drifted", "HostDeviceUnavailable",
                    "QosApplied")


@dataclass
class Report:
    """What one reconcile pass learned; rendered into status."""

    phase: str
    ready: Cond
    generation: int  # metadata.generation this report judges (conditions' observedGeneration)
    observed_generation: int | None = None  # newest generation the domain matches; None: generation; 0: omit
    domain: dict | None = None
    agent_connected: Cond | None = None
    failure: Cond | None = None
    extra: list[Cond] = field(default_factory=list)  # RestartRequired, Drifted, HostDeviceUnavailable
    halted_generation: int | None = None
    shutdown: dict | None = None
    requests: dict[str, dict] = field(default_factory=dict)  # lastReboot / lastReset / lastRestart
    devices: dict[str, Any] = field(default_factory=dict)  # vcpus, memory, disks, interfaces
    pending_restart: list[str] = field(default_factory=list)


def render(report: Report, current: dict | None) -> dict[str, Any]:
    current = current or {}
    conds = [report.ready] + [c for c in (report.agent_connected, report.failure, *report.extra) if c]
    observed = report.generation if report.observed_generation is None else report.observed_generation
    status: dict[str, Any] = {"phase": report.phase}
    if observed:
        status["observedGeneration"] = observed
    status["conditions"] = conditions.render(conds, current.get("conditions"), report.generation)
    optional = {"domain": report.domain, "haltedGeneration": report.halted_generation,
                "shutdown": report.shutdown, **report.requests, **report.devices,
                "pendingRestart": report.pending_restart or None}
    status.update({k: v for k, v in optional.items() if v is not None})
    return status


def owned_view(status: dict | None) -> dict[str, Any]:
    """The agent-owned part of an existing status, for change detection."""
    status = status or {}
    view = {k: status[k] for k in AGENT_FIELDS if k in status}
    view["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") in AGENT_CONDITIONS]
    return view


def carried_conditions(status: dict | None, types: tuple[str, ...]) -> list[Cond]:
    """Conditions already in status, kept by a report that does not judge them."""
    out = []
    for c in (status or {}).get("conditions") or []:
        if c.get("type") in types:
            value = {"True": True, "False": False}.get(c.get("status"))
            out.append(Cond(c["type"], value, c.get("reason", ""), c.get("message", "")))
    return out


def carried_devices(status: dict | None) -> dict[str, Any]:
    """Device facts already in status, kept when a pass cannot read the domain."""
    status = status or {}
    return {k: status[k] for k in ("vcpus", "memory", "disks", "interfaces", "qosApplied") if k in status}


async def apply(obj: dict, report: Report, node: str) -> dict | None:
    """Apply the status (as this node's agent, meta.agent_manager) when it differs from what the object
    shows; returns the updated object."""
    new = render(report, obj.get("status"))
    if new == owned_view(obj.get("status")):
        return None
    md = obj["metadata"]
    return await asyncio.to_thread(
        resources.apply_status, resources.VMS, md["namespace"], md["name"], new, meta.agent_manager(node)
    )
