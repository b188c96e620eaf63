"""Carry out a live-update plan, step by step, through named Guest methods (LIVE only: the
persistent definition was rewritten before). A detach is asynchronous: it is asked once, then
confirmed by the device leaving the live XML (libvirt's DEVICE_REMOVED wakes the next pass),
and reported when that takes longer than DETACH_TIMEOUT."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from libvirt_operator.agent.liveupdate.plan import Op, Step
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest

log = logging.getLogger(__name__)
DETACH_TIMEOUT = 30.0


@dataclass
class Outcome:
    done: list[Step] = field(default_factory=list)
    failed: list[tuple[Step, HypervisorError]] = field(default_factory=list)
    waiting: list[Step] = field(default_factory=list)  # detaches asked for, not confirmed yet
    timed_out: list[Step] = field(default_factory=list)  # detaches unconfirmed after DETACH_TIMEOUT


class LiveUpdater:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._detaching: dict[tuple[str, str], tuple[float, float]] = {}  # (uuid, alias) -> first, last ask

    async def apply(self, guest: Guest, steps: list[Step]) -> Outcome:
        out = Outcome()
        asked = {a for (u, a) in self._detaching if u == guest.uuid}
        wanted = {s.alias for s in steps if s.op is Op.DETACH}
        for alias in asked - wanted:  # confirmed (gone from the live XML) or no longer wanted
            self._detaching.pop((guest.uuid, alias), None)
        for step in steps:
            try:
                if step.op is Op.DETACH:
                    await self._detach(guest, step, out)
                    continue
                await _run(guest, step)
                out.done.append(step)
            except HypervisorError as exc:
                if exc.reason == "ConnectionLost":
                    raise
                log.warning("%s: %s failed: %s", guest.name, step.describe(), exc.message)
                out.failed.append((step, exc))
        return out

    async def _detach(self, guest: Guest, step: Step, out: Outcome) -> None:
        key = (guest.uuid, step.alias)
        now = self._clock()
        first, last = self._detaching.get(key, (None, None))
        if first is not None and now - first >= DETACH_TIMEOUT:
            out.timed_out.append(step)
        else:
            out.waiting.append(step)
        if last is None or now - last >= DETACH_TIMEOUT:  # ask (again)
            await guest.detach_device_alias(step.alias, live=True)
            self._detaching[key] = (first if first is not None else now, now)


async def _run(guest: Guest, step: Step) -> None:
    if step.op is Op.ATTACH:
        await guest.attach_device(step.xml, live=True)
    elif step.op is Op.UPDATE:
        await guest.update_device(step.xml, live=True, force=True)
    elif step.op is Op.SET_VCPUS:
        await guest.set_vcpus(int(step.value), live=True)
    elif step.op is Op.SET_MEMORY:
        await guest.set_memory(int(step.value), live=True)
    elif step.op is Op.PIN_VCPU:
        await guest.pin_vcpu(step.vcpu, str(step.value), live=True)
    elif step.op is Op.PIN_EMULATOR:
        await guest.pin_emulator(str(step.value), live=True)
    elif step.op is Op.RESIZE:
        await guest.block_resize(step.target, int(step.value))
    else:
        raise ValueError(f"unknown step {step}")
