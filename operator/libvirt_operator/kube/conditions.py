"""Kubernetes-style conditions: keep lastTransitionTime unless the status flips."""

from __future__ import annotations

from dataclasses import dataclass

from libvirt_operator.api.base import utcnow


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None = Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


def render(conds: list[Cond], existing: list[dict] | None, generation: int | None) -> list[dict]:
    """Wire form of `conds`, reusing each unchanged condition's lastTransitionTime."""
    previous = {c.get("type"): c for c in existing or []}
    now = utcnow()
    out = []
    for c in conds:
        old = previous.get(c.type)
        changed = old is None or old.get("status") != c.status_text
        entry = {
            "type": c.type,
            "status": c.status_text,
            "reason": c.reason,
            "message": c.message[:32000],
            "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    return out


def find(status: dict | None, type_: str) -> dict | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None
