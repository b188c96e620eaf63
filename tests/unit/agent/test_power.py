"""The power decision table: desired x observed x history -> one action."""

import pytest

from libvirt_operator.agent.power import Action, Desired, History, Observed, decide, reassess


def want(power="Running", policy="OnFailure", mode="acpi", timeout=60.0, force=False, gen=1, deleting=False):
    return Desired(power, policy, mode, timeout, force, gen, deleting)


RUNNING = Observed("running", "booted")


def test_new_vm_is_started():
    d = decide(want(), Observed("shutoff", "unknown"), History(phase="Scheduled"))
    assert d.action is Action.START and d.phase == "Running"


def test_running_vm_that_should_run_is_left_alone():
    d = decide(want(), RUNNING, History(phase="Running"))
    assert d.action is Action.NONE and d.converged


@pytest.mark.parametrize(("policy", "reason", "restarts"), [
    ("OnFailure", "shutdown", False), ("OnFailure", "destroyed", True), ("OnFailure", "crashed", True),
    ("Always", "shutdown", True), ("Never", "destroyed", False), ("Never", "shutdown", False),
])
def test_unexpected_stop_follows_restart_policy(policy, reason, restarts):
    d = decide(want(policy=policy), Observed("shutoff", reason), History(phase="Running"))
    assert (d.action is Action.START) is restarts
    assert d.halt is (not restarts)
    if not restarts:
        assert d.phase == "Stopped" and not d.converged


def test_halted_vm_stays_stopped_until_the_spec_changes():
    halted = History(phase="Stopped", halted_generation=3)
    assert decide(want(gen=3), Observed("shutoff", "shutdown"), halted).action is Action.NONE
    assert decide(want(gen=4), Observed("shutoff", "shutdown"), halted).action is Action.START


def test_guest_seen_shutting_down_then_off_follows_restart_policy():
    # A pass saw the domain in state "shutdown" (the guest powering off) and reported Stopping.
    shutting = decide(want(), Observed("shutdown", "user"), History(phase="Running"))
    assert shutting.action is Action.NONE and shutting.phase == "Stopping"
    d = decide(want(), Observed("shutoff", "shutdown"), History(phase="Stopping"))
    assert d.action is Action.NONE and d.halt and d.reason == "GuestShutdown"


def test_vm_stopped_by_our_shutdown_starts_when_the_spec_flips_back():
    d = decide(want(gen=2), Observed("shutoff", "shutdown"), History(phase="Stopping", shutdown_elapsed=4))
    assert d.action is Action.START


def test_domain_that_stops_during_a_pass_is_recorded_as_halted():
    # First look: running, nothing to do; second look, after acting: the guest has powered off.
    done = decide(want(gen=3), RUNNING, History(phase="Running"))
    after = reassess(want(gen=3), Observed("shutoff", "shutdown"), done, History(phase="Running"))
    assert after.halt and after.phase == "Stopped" and after.reason == "GuestShutdown"


def test_halt_decided_before_acting_stays_recorded_after():
    done = decide(want(gen=3), Observed("shutoff", "shutdown"), History(phase="Running"))
    after = reassess(want(gen=3), Observed("shutoff", "shutdown"), done, History(phase="Running"))
    assert done.halt and after.halt and after.action is Action.NONE and after.phase == "Stopped"


def test_halted_vm_is_not_halted_again():
    past = History(phase="Stopped", halted_generation=3)
    done = decide(want(gen=3), Observed("shutoff", "shutdown"), past)
    assert not reassess(want(gen=3), Observed("shutoff", "shutdown"), done, past).halt


def test_vm_stopped_on_request_starts_again_when_asked():
    d = decide(want(gen=5), Observed("shutoff", "shutdown"), History(phase="Stopped"))
    assert d.action is Action.START


def test_graceful_stop_then_wait_then_timeout():
    first = decide(want("Stopped"), RUNNING, History(phase="Running"))
    assert first.action is Action.SHUTDOWN and first.phase == "Stopping"
    waiting = decide(want("Stopped", timeout=60), RUNNING,
                     History(phase="Stopping", shutdown_elapsed=10, shutdown_sent_elapsed=2))
    assert waiting.action is Action.NONE and 0 < waiting.requeue <= 3
    late = decide(want("Stopped", timeout=60), RUNNING, History(phase="Stopping", shutdown_elapsed=61))
    assert late.action is Action.NONE and late.timed_out and late.reason == "ShutdownTimeout"
    forced = decide(want("Stopped", timeout=60, force=True), RUNNING, History(shutdown_elapsed=61))
    assert forced.action is Action.DESTROY


def test_a_graceful_request_is_sent_again_until_the_timeout():
    # A guest still booting ignores the ACPI button: the request is repeated, as Nova does.
    again = decide(want("Stopped", timeout=60), RUNNING,
                   History(phase="Stopping", shutdown_elapsed=12, shutdown_sent_elapsed=5))
    assert again.action is Action.SHUTDOWN and again.phase == "Stopping"
    # not while the guest is already powering off
    busy = decide(want("Stopped", timeout=60), Observed("shutdown", "user"),
                  History(phase="Stopping", shutdown_elapsed=12, shutdown_sent_elapsed=6))
    assert busy.action is Action.NONE
    # after the timeout, deletion forces
    late = decide(want(deleting=True, timeout=60), RUNNING, History(shutdown_elapsed=61, shutdown_sent_elapsed=5))
    assert late.action is Action.DESTROY


def test_reassess_after_sending_a_shutdown_waits_instead_of_resending():
    from libvirt_operator.agent.power import reassess
    w = want("Stopped", timeout=60)
    first = decide(w, RUNNING, History(phase="Running"))
    after = reassess(w, RUNNING, first, History(phase="Running"))
    assert after.action is Action.NONE and after.reason == "ShuttingDown"


def test_force_mode_powers_off_at_once():
    assert decide(want("Stopped", mode="force"), RUNNING, History()).action is Action.DESTROY


def test_deletion_stops_gracefully_then_forces():
    d = decide(want(deleting=True), RUNNING, History(phase="Running"))
    assert d.action is Action.SHUTDOWN and d.phase == "Terminating"
    late = decide(want(deleting=True, timeout=5), RUNNING, History(shutdown_elapsed=6))
    assert late.action is Action.DESTROY


def test_pause_and_resume():
    assert decide(want("Paused"), RUNNING, History(phase="Running")).action is Action.SUSPEND
    assert decide(want("Running"), Observed("paused", "user"), History(phase="Paused")).action is Action.RESUME
    assert decide(want("Paused"), Observed("shutoff", "unknown"), History()).action is Action.START_PAUSED


def test_hypervisor_pause_is_reported_not_overridden():
    d = decide(want(), Observed("paused", "ioerror"), History(phase="Running"))
    assert d.action is Action.NONE and not d.converged and d.reason == "PausedByHypervisor"


def test_stopped_vm_that_should_stop_is_converged():
    d = decide(want("Stopped"), Observed("shutoff", "shutdown"), History(phase="Stopping", shutdown_elapsed=3))
    assert d.action is Action.NONE and d.converged and d.phase == "Stopped"


def test_started_domain_not_yet_active_is_reported_starting():
    done = decide(want(), Observed("shutoff", "unknown"), History(phase="Scheduled"))
    after = reassess(want(), Observed("shutoff", "unknown"), done, History(phase="Scheduled"))
    assert (after.phase, after.converged, after.reason) == ("Starting", False, "Starting")


# -- the states and reasons snapshots leave (see /work/notes/snapshot-facts.md) ---------------------

@pytest.mark.parametrize("policy", ["Always", "OnFailure", "Never"])
def test_memory_saved_by_a_snapshot_is_not_booted_cold(policy):
    d = decide(want(policy=policy, gen=2), Observed("shutoff", "saved"), History(phase="Running"))
    assert d.action is Action.NONE and d.halt and d.reason == "SavedBySnapshot" and d.phase == "Stopped"
    later = decide(want(policy=policy, gen=2), Observed("shutoff", "saved"),
                   History(phase="Stopped", halted_generation=2))
    assert later.action is Action.NONE and later.reason == "SavedBySnapshot"
    assert decide(want(policy=policy, gen=3), Observed("shutoff", "saved"),
                  History(phase="Stopped", halted_generation=2)).action is Action.START


@pytest.mark.parametrize(("reason", "action"), [
    ("unknown", Action.RESUME),  # the end of a live memory snapshot, should it be left paused
    ("snapshot", Action.NONE),  # a non-live snapshot in progress: libvirt resumes it
    ("save", Action.NONE),  # a save in progress
])
def test_paused_by_snapshot_reasons(reason, action):
    d = decide(want(), Observed("paused", reason), History(phase="Running"))
    assert d.action is action


@pytest.mark.parametrize("reason", ["restored", "unpaused", "from-snapshot"])
def test_running_after_restore_or_snapshot_is_left_alone(reason):
    d = decide(want(), Observed("running", reason), History(phase="Running"))
    assert d.action is Action.NONE and d.converged
