"""Carry out the power decision of a pass (agent/power.py decides; this acts)."""

from __future__ import annotations

import logging

from libvirt_operator.agent import power
from libvirt_operator.api.base import utcnow
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest

log = logging.getLogger(__name__)
A = power.Action


async def act(obj: dict, spec: VirtualMachineSpec, guest: Guest, d: power.Decision, event) -> HypervisorError | None:
    """Takes the decided action. A graceful shutdown that libvirt refuses (no guest agent yet,
    say) is still recorded as sent, so that its timeout runs and a delete ends in a power-off;
    its error is returned for the Failure condition. Other errors raise."""
    if d.action is A.NONE:
        return None
    log.info("%s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], d.action.value)
    if d.action in (A.START, A.START_PAUSED):
        await guest.start(paused=d.action is A.START_PAUSED)
        await event("Started", d.message or "started")
    elif d.action is A.RESUME:
        await guest.resume()
        await event("Resumed", "vCPUs resumed")
    elif d.action is A.SUSPEND:
        await guest.suspend()
        await event("Paused", "vCPUs paused")
    elif d.action is A.SHUTDOWN:
        return await _shutdown(obj, spec, guest, event)
    elif d.action is A.DESTROY:
        await guest.destroy()
        await event("PoweredOff", d.message or "powered off", warning=bool(d.message))
    return None


async def _shutdown(obj: dict, spec: VirtualMachineSpec, guest: Guest, event) -> HypervisorError | None:
    st = obj.setdefault("status", {})
    previous = st.get("shutdown") or {}
    first = not previous.get("requestedAt")
    now = utcnow()
    record = {"mode": spec.shutdown.mode, "requestedAt": previous.get("requestedAt") or now, "lastSentAt": now,
              "attempts": int(previous.get("attempts") or 0) + 1}
    st["shutdown"] = record
    try:
        if (await guest.state()).state == "paused":
            await guest.resume()
        await guest.shutdown(spec.shutdown.mode)
    except HypervisorError as exc:
        if exc.reason == "ConnectionLost":
            raise
        record["lastError"] = f"{exc.reason}: {exc.message}"
        log.warning("%s/%s: %s shutdown failed: %s", obj["metadata"]["namespace"], obj["metadata"]["name"],
                    spec.shutdown.mode, exc.message)
        return exc
    if first:
        await event("ShuttingDown", f"{spec.shutdown.mode} shutdown requested")
    return None
