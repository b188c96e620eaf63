"""The outcomes `--wait` follows: each is `for_update(updated) -> check`, where `updated` is the
object the verb's last action returned and `check(now)` decides (a Result) or not yet (None)."""

from __future__ import annotations

from collections.abc import Callable

from libvirt_operator.cli.plan import Check, Result, generation
from libvirt_operator.cli.vmread import condition, node_of, state_reason

# Conditions that end a wait for a spec change at once: the change was not (or cannot be) applied.
BLOCKING = ("Failure", "RestartRequired", "HostDeviceUnavailable", "Drifted")

Outcome = Callable[[dict], Check]


def _current(vm: dict, cond: dict, gen: int) -> bool:
    """The condition was written for generation `gen` or later."""
    seen = cond.get("observedGeneration")
    if seen is None:
        seen = (vm.get("status") or {}).get("observedGeneration") or 0
    return int(seen) >= gen


def power_reached(phase: str) -> Outcome:
    """The agent has acted on the new generation and reports `phase` with Ready True."""

    def for_update(updated: dict) -> Check:
        gen = generation(updated)

        def check(vm: dict) -> Result | None:
            st = vm.get("status") or {}
            if (st.get("observedGeneration") or 0) < gen:
                return None
            failure = condition(vm, "Failure")
            if failure.get("status") == "True":
                return Result(False, f"{failure.get('reason')}: {failure.get('message', '')}")
            if phase != "Stopped" and st.get("haltedGeneration") == gen:
                reason, message = state_reason(vm)
                return Result(False, f"{reason}: {message}")
            if st.get("phase") == phase and condition(vm, "Ready").get("status") == "True":
                return Result(True, f"{phase} on {node_of(vm) or '?'}")
            return None

        return check

    return for_update


def request_done(status_field: str, request_id: str) -> Outcome:
    """The one-shot request's outcome in status.lastReboot / lastReset / lastRestart."""

    def for_update(_updated: dict) -> Check:
        def check(vm: dict) -> Result | None:
            last = (vm.get("status") or {}).get(status_field) or {}
            if last.get("id") != request_id or last.get("result") == "InProgress":
                return None
            ok = last.get("result") == "Succeeded"
            return Result(ok, f"{last.get('result')}" + (f": {last['message']}" if last.get("message") else ""))

        return check

    return for_update


def spec_applied(what: str) -> Outcome:
    """The node agent reports the new generation applied to the running domain (observedGeneration
    and Ready True), or one of the BLOCKING conditions for it (fails at once, with its reason)."""

    def for_update(updated: dict) -> Check:
        gen = generation(updated)

        def check(vm: dict) -> Result | None:
            for type_ in BLOCKING:
                c = condition(vm, type_)
                if c.get("status") == "True" and _current(vm, c, gen):
                    return Result(False, f"{type_}: {c.get('reason', '')}: {c.get('message', '')}".rstrip(": "))
            st = vm.get("status") or {}
            if (st.get("observedGeneration") or 0) >= gen and condition(vm, "Ready").get("status") == "True":
                return Result(True, f"{what} applied (generation {gen}, {st.get('phase') or '?'} on "
                                    f"{node_of(vm) or '?'})")
            return None

        return check

    return for_update
