"""One-shot requests (reboot, reset): each new id runs at most once, its outcome kept in status."""

from __future__ import annotations

from dataclasses import dataclass

from libvirt_operator.api.base import utcnow

# spec field -> status field
REQUESTS = {"reboot": "lastReboot", "reset": "lastReset"}


@dataclass(frozen=True)
class Pending:
    kind: str  # reboot | reset
    id: str
    mode: str | None


def pending(spec: dict, status: dict) -> tuple[list[Pending], dict[str, dict]]:
    """Requests to run now, and outcomes to record for requests interrupted by an agent restart."""
    todo, interrupted = [], {}
    for kind, field in REQUESTS.items():
        req, last = spec.get(kind), status.get(field)
        if not req:
            continue
        if last and last.get("id") == req["id"]:
            if last.get("result") == "InProgress":
                interrupted[field] = outcome(req["id"], "Failed",
                                             "interrupted: the agent restarted before recording the outcome; "
                                             "the request may have run")
            continue
        todo.append(Pending(kind, req["id"], req.get("mode")))
    return todo, interrupted


def outcome(id_: str, result: str, message: str = "") -> dict:
    return {"id": id_, "result": result, "message": message, "time": utcnow()}


def carried(status: dict) -> dict[str, dict]:
    """Outcomes already recorded, to keep under server-side apply."""
    return {f: status[f] for f in REQUESTS.values() if status.get(f)}
