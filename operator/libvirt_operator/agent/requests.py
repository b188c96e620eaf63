"""One-shot requests (reboot, reset, restart): each new id runs at most once, its outcome kept in status.

Reboot and reset act within one pass. A restart spans passes (a cold stop, then a start): its
InProgress outcome is what carries it on, also across an agent restart."""

from __future__ import annotations

from dataclasses import dataclass

from libvirt_operator.api.base import utcnow

# spec field -> status field
REQUESTS = {"reboot": "lastReboot", "reset": "lastReset", "restart": "lastRestart"}
IMMEDIATE = ("reboot", "reset")


@dataclass(frozen=True)
class Pending:
    kind: str  # reboot | reset | restart
    id: str
    mode: str | None


def pending(spec: dict, status: dict) -> tuple[list[Pending], dict[str, dict]]:
    """Requests to start now, and outcomes to record for immediate requests interrupted by an agent restart."""
    todo, interrupted = [], {}
    for kind, field in REQUESTS.items():
        req, last = spec.get(kind), status.get(field)
        if not req:
            continue
        if last and last.get("id") == req["id"]:
            if last.get("result") == "InProgress" and kind in IMMEDIATE:
                interrupted[field] = outcome(req["id"], "Failed",
                                             "interrupted: the agent restarted before recording the outcome; "
                                             "the request may have run")
            continue
        todo.append(Pending(kind, req["id"], req.get("mode")))
    return todo, interrupted


def restart_in_progress(spec: dict, status: dict) -> str | None:
    """The id of the restart under way (its outcome InProgress), if any."""
    req, last = spec.get("restart"), status.get("lastRestart")
    if req and last and last.get("id") == req["id"] and last.get("result") == "InProgress":
        return req["id"]
    return None


def outcome(id_: str, result: str, message: str = "") -> dict:
    return {"id": id_, "result": result, "message": message, "time": utcnow()}


def carried(status: dict) -> dict[str, dict]:
    """Outcomes already recorded, to keep under server-side apply."""
    return {f: status[f] for f in REQUESTS.values() if status.get(f)}
