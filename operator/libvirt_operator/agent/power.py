"""Decide, from desired and observed state, the one power action to take now (pure logic)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

UP_PHASES = {"Running", "Paused", "Starting"}
# A graceful shutdown request is sent again this often until its timeout (a guest still
# booting ignores the ACPI button; a guest agent may not be up yet).
RESEND_SECONDS = 5.0
ACTIVE_STATES = {"running", "paused", "blocked", "pmsuspended", "shutdown"}


class Action(enum.Enum):
    NONE = "none"
    START = "start"
    START_PAUSED = "start-paused"
    RESUME = "resume"
    SUSPEND = "suspend"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"


@dataclass(frozen=True)
class Observed:
    state: str  # running, paused, shutoff, shutdown, crashed, ...
    reason: str  # libvirt's state reason, e.g. shutdown, destroyed, user


@dataclass(frozen=True)
class Desired:
    power_state: str  # Running, Stopped, Paused
    restart_policy: str  # Always, OnFailure, Never
    shutdown_mode: str  # acpi, agent, force
    shutdown_timeout: float
    force_after_timeout: bool
    generation: int
    deleting: bool = False


@dataclass(frozen=True)
class History:
    """What the agent reported last time (from status): survives agent restarts."""

    phase: str | None = None
    halted_generation: int | None = None
    shutdown_elapsed: float | None = None  # seconds since a graceful shutdown was requested
    shutdown_sent_elapsed: float | None = None  # seconds since the request was last sent


@dataclass(frozen=True)
class Decision:
    action: Action
    phase: str
    converged: bool
    reason: str  # CamelCase, for the Ready condition
    message: str = ""
    halt: bool = False  # record haltedGeneration = generation
    timed_out: bool = False  # a graceful shutdown exceeded its timeout
    requeue: float | None = None


def decide(want: Desired, seen: Observed, past: History) -> Decision:
    power = "Stopped" if want.deleting else want.power_state
    if power == "Stopped":
        return _stop(want, seen, past)
    if seen.state in ("shutoff", "crashed", "nostate"):
        return _start(want, seen, past, paused=power == "Paused")
    if seen.state == "shutdown":
        return Decision(Action.NONE, "Stopping", False, "GuestShuttingDown", "the guest is shutting down", requeue=2)
    if power == "Paused":
        if seen.state == "paused":
            return Decision(Action.NONE, "Paused", True, "Paused")
        return Decision(Action.SUSPEND, "Paused", True, "Paused")
    if seen.state == "paused":
        if seen.reason in ("user", "unknown"):
            return Decision(Action.RESUME, "Running", True, "Running")
        return Decision(Action.NONE, "Paused", False, "PausedByHypervisor",
                        f"libvirt paused the domain (reason: {seen.reason})", requeue=5)
    return Decision(Action.NONE, "Running", True, "Running")


def reassess(want: Desired, seen: Observed, done: Decision, past: History) -> Decision:
    """Phase and readiness once `done` was carried out and the domain observed again.

    `halt` is set when the VM halted: by `done`, or during the pass (the domain stopped
    after the first observation), so that the halt is recorded either way."""
    sent = done.action is Action.SHUTDOWN
    hist = History(phase=done.phase if done.action is not Action.NONE else past.phase,
                   halted_generation=want.generation if done.halt else past.halted_generation,
                   shutdown_elapsed=past.shutdown_elapsed if past.shutdown_elapsed is not None or not sent else 0.0,
                   shutdown_sent_elapsed=0.0 if sent else past.shutdown_sent_elapsed)
    after = decide(want, seen, hist)
    if done.halt:
        after = replace(after, halt=True)
    if done.action in (Action.START, Action.START_PAUSED) and seen.state not in ACTIVE_STATES:
        after = replace(after, phase="Starting", converged=False, reason="Starting")
    return after


def _start(want: Desired, seen: Observed, past: History, paused: bool) -> Decision:
    start = Action.START_PAUSED if paused else Action.START
    target = "Paused" if paused else "Running"
    if past.halted_generation == want.generation:
        return Decision(Action.NONE, "Stopped", False, _halt_reason(seen),
                        f"the VM stopped on its own ({seen.state}/{seen.reason}); restartPolicy "
                        f"{want.restart_policy} keeps it stopped until the spec changes")
    # A guest shutting down on its own shows as Stopping with no shutdown of ours on record.
    was_up = past.phase in UP_PHASES or (past.phase == "Stopping" and past.shutdown_elapsed is None)
    if not was_up:
        return Decision(start, target, True, target)
    if seen.reason == "saved":  # a snapshot (Copy, stopAfter) saved its memory: a cold boot would lose it
        return Decision(Action.NONE, "Stopped", False, "SavedBySnapshot",
                        "the VM's memory was saved by a snapshot (stopAfter); a revert to that snapshot resumes it, "
                        "a spec change boots it afresh", halt=True)
    guest_shutdown = seen.reason == "shutdown" and seen.state != "crashed"
    restart = want.restart_policy == "Always" or (want.restart_policy == "OnFailure" and not guest_shutdown)
    if restart:
        return Decision(start, target, True, target,
                        f"restarted after it stopped on its own ({seen.state}/{seen.reason})")
    return Decision(Action.NONE, "Stopped", False, _halt_reason(seen),
                    f"the VM stopped on its own ({seen.state}/{seen.reason}); restartPolicy "
                    f"{want.restart_policy} keeps it stopped until the spec changes", halt=True)


def _halt_reason(seen: Observed) -> str:
    if seen.state == "crashed" or seen.reason == "crashed":
        return "GuestCrashed"
    reasons = {"shutdown": "GuestShutdown", "destroyed": "DestroyedOutsideOperator", "saved": "SavedBySnapshot"}
    return reasons.get(seen.reason, "DomainStopped")


def _stop(want: Desired, seen: Observed, past: History) -> Decision:
    if seen.state not in ACTIVE_STATES:
        return Decision(Action.NONE, "Terminating" if want.deleting else "Stopped", True, "Stopped")
    phase = "Terminating" if want.deleting else "Stopping"
    if want.shutdown_mode == "force":
        return Decision(Action.DESTROY, phase, False, "PoweringOff")
    if past.shutdown_elapsed is None:
        if seen.state == "shutdown":
            return Decision(Action.NONE, phase, False, "GuestShuttingDown", requeue=2)
        return Decision(Action.SHUTDOWN, phase, False, "ShuttingDown",
                        f"{want.shutdown_mode} shutdown requested", requeue=min(want.shutdown_timeout, 5))
    remaining = want.shutdown_timeout - past.shutdown_elapsed
    if remaining > 0:
        since_sent = past.shutdown_sent_elapsed if past.shutdown_sent_elapsed is not None else past.shutdown_elapsed
        if since_sent >= RESEND_SECONDS and seen.state != "shutdown":
            return Decision(Action.SHUTDOWN, phase, False, "ShuttingDown",
                            f"{want.shutdown_mode} shutdown sent again ({int(remaining)}s left)",
                            requeue=min(remaining, RESEND_SECONDS))
        wait = min(remaining, RESEND_SECONDS - since_sent) if seen.state != "shutdown" else min(remaining, 2)
        return Decision(Action.NONE, phase, False, "ShuttingDown",
                        f"waiting for the guest to power off ({int(remaining)}s left)", requeue=max(wait, 0.2))
    if want.force_after_timeout or want.deleting:
        return Decision(Action.DESTROY, phase, False, "PoweringOff",
                        f"the guest did not power off within {int(want.shutdown_timeout)}s; forcing power-off")
    return Decision(Action.NONE, phase, False, "ShutdownTimeout",
                    f"the guest did not power off within {int(want.shutdown_timeout)}s of the "
                    f"{want.shutdown_mode} request; set powerState again with mode force, or "
                    "shutdown.forceAfterTimeout", timed_out=True)
