"""Readable names for libvirt's domain states and their reasons."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt as lv


@dataclass(frozen=True)
class PowerState:
    state: str  # running, paused, shutoff, shutdown, crashed, pmsuspended, blocked, nostate
    reason: str  # e.g. shutoff: destroyed; paused: user; 'unknown' when libvirt gives none


STATES = {
    lv.VIR_DOMAIN_NOSTATE: "nostate",
    lv.VIR_DOMAIN_RUNNING: "running",
    lv.VIR_DOMAIN_BLOCKED: "blocked",
    lv.VIR_DOMAIN_PAUSED: "paused",
    lv.VIR_DOMAIN_SHUTDOWN: "shutdown",
    lv.VIR_DOMAIN_SHUTOFF: "shutoff",
    lv.VIR_DOMAIN_CRASHED: "crashed",
    lv.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

REASONS = {
    lv.VIR_DOMAIN_RUNNING: {
        lv.VIR_DOMAIN_RUNNING_UNKNOWN: "unknown",
        lv.VIR_DOMAIN_RUNNING_BOOTED: "booted",
        lv.VIR_DOMAIN_RUNNING_MIGRATED: "migrated",
        lv.VIR_DOMAIN_RUNNING_RESTORED: "restored",
        lv.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT: "from-snapshot",
        lv.VIR_DOMAIN_RUNNING_UNPAUSED: "unpaused",
        lv.VIR_DOMAIN_RUNNING_MIGRATION_CANCELED: "migration-canceled",
        lv.VIR_DOMAIN_RUNNING_SAVE_CANCELED: "save-canceled",
        lv.VIR_DOMAIN_RUNNING_WAKEUP: "wakeup",
        lv.VIR_DOMAIN_RUNNING_CRASHED: "crashed",
        lv.VIR_DOMAIN_RUNNING_POSTCOPY: "postcopy",
        lv.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED: "postcopy-failed",
    },
    lv.VIR_DOMAIN_PAUSED: {
        lv.VIR_DOMAIN_PAUSED_UNKNOWN: "unknown",
        lv.VIR_DOMAIN_PAUSED_USER: "user",
        lv.VIR_DOMAIN_PAUSED_MIGRATION: "migration",
        lv.VIR_DOMAIN_PAUSED_SAVE: "save",
        lv.VIR_DOMAIN_PAUSED_DUMP: "dump",
        lv.VIR_DOMAIN_PAUSED_IOERROR: "ioerror",
        lv.VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog",
        lv.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: "from-snapshot",
        lv.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutting-down",
        lv.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot",
        lv.VIR_DOMAIN_PAUSED_CRASHED: "crashed",
        lv.VIR_DOMAIN_PAUSED_STARTING_UP: "starting-up",
        lv.VIR_DOMAIN_PAUSED_POSTCOPY: "postcopy",
        lv.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postcopy-failed",
    },
    lv.VIR_DOMAIN_SHUTDOWN: {
        lv.VIR_DOMAIN_SHUTDOWN_UNKNOWN: "unknown",
        lv.VIR_DOMAIN_SHUTDOWN_USER: "user",
    },
    lv.VIR_DOMAIN_SHUTOFF: {
        lv.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
        lv.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
        lv.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
        lv.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
        lv.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
        lv.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
        lv.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
        lv.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from-snapshot",
        lv.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
    },
    lv.VIR_DOMAIN_CRASHED: {
        lv.VIR_DOMAIN_CRASHED_UNKNOWN: "unknown",
        lv.VIR_DOMAIN_CRASHED_PANICKED: "panicked",
    },
}


def power_state(state: int, reason: int) -> PowerState:
    """From virDomain.state()'s pair; numbers this table does not know stay visible."""
    return PowerState(STATES.get(state, f"state-{state}"),
                      REASONS.get(state, {}).get(reason, "unknown" if reason == 0 else f"reason-{reason}"))
