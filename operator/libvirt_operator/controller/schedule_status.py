"""The controller's part of a VirtualMachine's status, and whether a VM still needs placement work.

Field ownership (server-side apply, manager meta.CONTROLLER_MANAGER):
- always `status.conditions[type=Scheduled]`, and `status.nodeName` once placed;
- `status.phase` (Pending / Scheduled) only while no other manager (the agent) has set it:
  the agent takes `phase` over with a forced apply, after which the controller leaves it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from libvirt_operator.api import meta
from libvirt_operator.controller.placement import SCHEDULED, Decision
from libvirt_operator.kube import conditions
from libvirt_operator.kube.conditions import Cond

CONDITION = "Scheduled"


def needs_work(vm: Mapping) -> bool:
    """True while a VM is unplaced, or placed but its status does not say so yet."""
    md = vm.get("metadata") or {}
    if md.get("deletionTimestamp"):
        return False
    node = (md.get("labels") or {}).get(meta.NODE_LABEL)
    if not node:
        return True
    status = vm.get("status") or {}
    cond = conditions.find(status, CONDITION)
    return status.get("nodeName") != node or cond is None or cond.get("status") != "True"


def phase_owned_by_others(vm: Mapping) -> bool:
    """Whether a manager other than the controller owns status.phase (per metadata.managedFields)."""
    for entry in (vm.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == meta.CONTROLLER_MANAGER:
            continue
        status_fields = (entry.get("fieldsV1") or {}).get("f:status") or {}
        if "f:phase" in status_fields:
            return True
    return False


def scheduled(vm: Mapping, node: str, message: str, with_phase: bool) -> dict[str, Any]:
    status: dict[str, Any] = {
        "nodeName": node,
        "conditions": _conditions(vm, Cond(CONDITION, True, SCHEDULED, message)),
    }
    if with_phase:
        status["phase"] = "Scheduled"
    return status


def unscheduled(vm: Mapping, decision: Decision, with_phase: bool) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": _conditions(vm, Cond(CONDITION, False, decision.reason, decision.message)),
    }
    if with_phase:
        status["phase"] = "Pending"
    return status


def find_condition(vm: Mapping) -> dict | None:
    return conditions.find(vm.get("status"), CONDITION)


def condition_changed(vm: Mapping, decision: Decision) -> bool:
    """Whether the Scheduled condition would say something new (used to avoid repeating Events)."""
    cond = find_condition(vm)
    ok = decision.node is not None
    return (cond is None or cond.get("status") != ("True" if ok else "False")
            or cond.get("reason") != decision.reason or cond.get("message") != decision.message)


def _conditions(vm: Mapping, cond: Cond) -> list[dict]:
    existing = (vm.get("status") or {}).get("conditions")
    return conditions.render([cond], existing, (vm.get("metadata") or {}).get("generation"))
