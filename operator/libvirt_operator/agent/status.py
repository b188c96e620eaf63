"""Build and apply the agent's part of a VirtualMachine's status."""

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
AGENT_FIELDS = ("phase", "observedGeneration", "domain", "haltedGeneration", "shutdown", "lastReboot", "lastReset")
AGENT_CONDITIONS = ("Ready", "AgentConnected", "Failure")


@dataclass
class Report:
    """What one reconcile pass learned; rendered into status."""

    phase: str
    ready: Cond
    generation: int
    domain: dict | None = None
    agent_connected: Cond | None = None
    failure: Cond | None = None
    halted_generation: int | None = None
    shutdown: dict | None = None
    requests: dict[str, dict] = field(default_factory=dict)  # lastReboot / lastReset


def render(report: Report, current: dict | None) -> dict[str, Any]:
    current = current or {}
    conds = [report.ready] + [c for c in (report.agent_connected, report.failure) if c]
    status: dict[str, Any] = {
        "phase": report.phase,
        "observedGeneration": report.generation,
        "conditions": conditions.render(conds, current.get("conditions"), report.generation),
    }
    optional = {"domain": report.domain, "haltedGeneration": report.halted_generation,
                "shutdown": report.shutdown, **report.requests}
    status.update({k: v for k, v in optional.items() if v is not None})
    return status


def owned_view(status: dict | None) -> dict[str, Any]:
    """The agent-owned part of an existing status, for change detection."""
    status = status or {}
    view = {k: status[k] for k in AGENT_FIELDS if k in status}
    view["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") in AGENT_CONDITIONS]
    return view


async def apply(obj: dict, report: Report) -> dict | None:
    """Apply the status when it differs from what the object shows; returns the updated object."""
    new = render(report, obj.get("status"))
    if new == owned_view(obj.get("status")):
        return None
    md = obj["metadata"]
    return await asyncio.to_thread(
        resources.apply_status, resources.VMS, md["namespace"], md["name"], new, meta.AGENT_MANAGER
    )
