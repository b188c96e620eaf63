"""setvcpus, setmem, vcpupin, emulatorpin: spec.cpu and spec.memory edits, refusals, and the
spec-applied outcome --wait follows."""

from __future__ import annotations

import jsonpatch
import pytest
from virsh_cases import applied_status, apply, make_vm, plan

from libvirt_operator.cli.plan import Refused
from libvirt_operator.cli.vmread import cpulist, size_arg


def test_setvcpus_sets_cpu_vcpus_guarded_by_the_generation():
    vm = make_vm()
    p = plan("setvcpus web 3", vm)
    after = apply(vm, p)
    assert after["spec"]["cpu"] == {"vcpus": 3, "maxVcpus": 4}
    assert "2 -> 3" in p.summary and not p.note
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(make_vm(generation=4), p)


def test_setvcpus_refuses_above_max_and_out_of_range():
    with pytest.raises(Refused, match=r"above cpu.maxVcpus \(4\)"):
        plan("setvcpus web 5", make_vm())
    with pytest.raises(Refused, match="out of range"):
        plan("setvcpus web 0", make_vm())


def test_setvcpus_without_a_ceiling_says_it_needs_a_restart():
    vm = make_vm(cpu={"vcpus": 1})
    p = plan("setvcpus web 2", vm)
    assert apply(vm, p)["spec"]["cpu"]["vcpus"] == 2 and "kubectl virsh restart web" in p.note


def test_setvcpus_refuses_to_drop_a_pinned_vcpu():
    vm = make_vm(cpu={"vcpus": 3, "pinning": {"vcpus": [{"vcpu": 2, "cpuset": "1"}]}})
    with pytest.raises(Refused, match=r"pins vCPU 2.*vcpupin web 2 --clear"):
        plan("setvcpus web 2", vm)


def test_setvcpus_same_count_changes_nothing():
    p = plan("setvcpus web 2", make_vm())
    assert p.actions == [] and "already 2" in p.summary


@pytest.mark.parametrize(("arg", "quantity"), [("393216", "393216Ki"), ("512Mi", "512Mi"), ("1Gi", "1Gi"),
                                                 ("300M", "300M")])
def test_setmem_takes_kib_numbers_and_quantities(arg, quantity):
    vm = make_vm()
    after = apply(vm, plan(["setmem", "web", arg], vm))
    assert after["spec"]["memory"] == {"size": quantity, "maxSize": "1Gi"}


def test_setmem_refusals():
    with pytest.raises(Refused, match=r"above memory.maxSize \(1Gi\)"):
        plan("setmem web 2Gi", make_vm())
    with pytest.raises(Refused, match="below the minimum of 16Mi"):
        plan("setmem web 8Mi", make_vm())
    with pytest.raises(Refused, match="not a size"):
        plan("setmem web lots", make_vm())
    assert plan("setmem web 262144", make_vm()).actions == []  # 262144 KiB == 256Mi


def test_setmem_without_a_ceiling_says_it_needs_a_restart():
    vm = make_vm(memory={"size": "256Mi"})
    p = plan("setmem web 512Mi", vm)
    assert apply(vm, p)["spec"]["memory"] == {"size": "512Mi"} and "restart" in p.note


def test_the_spec_applied_outcome():
    vm = make_vm()
    p = plan("setmem web 512Mi", vm)
    after = apply(vm, p)
    check = p.check(after)
    assert check(applied_status(after, generation=3)) is None  # the agent has not seen it yet
    assert check(applied_status(after, ready=False)) is None  # seen, not applied yet
    outcome = check(applied_status(after))
    assert outcome.ok and "generation 4" in outcome.message
    # A stale blocking condition (of the old generation) does not end the wait ...
    old = applied_status(after, generation=3, RestartRequired=("Pending", "cpu.maxVcpus"))
    assert check(old) is None
    # ... a current one does, with its reason and message, whatever Ready says.
    for type_ in ("Failure", "RestartRequired", "HostDeviceUnavailable", "Drifted"):
        now = applied_status(after, ready=False, **{type_: ("Why", "memory.size needs a restart")})
        outcome = check(now)
        assert not outcome.ok and outcome.message == f"{type_}: Why: memory.size needs a restart"


def test_vcpupin_merges_by_vcpu():
    vm = make_vm()
    after = apply(vm, plan("vcpupin web 1 0-3,^2", vm))
    assert after["spec"]["cpu"]["pinning"] == {"vcpus": [{"vcpu": 1, "cpuset": "0-1,3"}]}
    after = apply(after, plan("vcpupin web 0 2", after))
    after = apply(after, plan("vcpupin web 1 3", after))
    assert after["spec"]["cpu"]["pinning"]["vcpus"] == [{"vcpu": 0, "cpuset": "2"}, {"vcpu": 1, "cpuset": "3"}]
    assert after["spec"]["cpu"]["vcpus"] == 2  # the rest of cpu is kept
    after = apply(after, plan("vcpupin web 0 --clear", after))
    assert after["spec"]["cpu"]["pinning"]["vcpus"] == [{"vcpu": 1, "cpuset": "3"}]


def test_vcpupin_without_cpulist_prints_the_pinning_and_changes_nothing():
    vm = make_vm(cpu={"vcpus": 2, "maxVcpus": 3, "pinning": {"vcpus": [{"vcpu": 1, "cpuset": "0-1"}]}})
    p = plan("vcpupin web", vm)
    assert p.actions == [] and p.check is None
    assert [line.split() for line in p.output.splitlines()] == [
        ["VCPU", "CPU", "AFFINITY"], ["0", "*"], ["1", "0-1"], ["2", "*"]]
    assert plan("vcpupin web 1", vm).output.splitlines()[1].split() == ["1", "0-1"]


def test_vcpupin_refusals():
    with pytest.raises(Refused, match="has no vCPU 4"):
        plan("vcpupin web 4 0", make_vm())  # maxVcpus 4: vCPUs 0..3
    with pytest.raises(Refused, match="not a CPU list"):
        plan("vcpupin web 0 0-x", make_vm())
    with pytest.raises(Refused, match="names no CPU"):
        plan("vcpupin web 0 1,^1", make_vm())
    with pytest.raises(Refused, match="--clear takes a VCPU"):
        plan("vcpupin web --clear", make_vm())


def test_emulatorpin_sets_prints_and_clears():
    vm = make_vm()
    after = apply(vm, plan("emulatorpin web 0-1", vm))
    assert after["spec"]["cpu"]["pinning"] == {"vcpus": [], "emulator": "0-1"}
    assert plan("emulatorpin web", after).output.splitlines()[1].strip() == "0-1"
    assert plan("emulatorpin web 0,1", after).actions == []  # the same set, written otherwise
    cleared = apply(after, plan("emulatorpin web --clear", after))
    assert "emulator" not in cleared["spec"]["cpu"]["pinning"]


def test_pinning_creates_missing_parents():
    vm = make_vm()
    del vm["spec"]["cpu"]
    after = apply(vm, plan("emulatorpin web 3", vm))
    assert after["spec"]["cpu"] == {"pinning": {"vcpus": [], "emulator": "3"}}


@pytest.mark.parametrize(("text", "spec"), [("0", "0"), ("0-3", "0-3"), ("3,1,2", "1-3"), ("0-7,^3-4", "0-2,5-7"),
                                            ("1, 5", "1,5")])
def test_cpulist(text, spec):
    assert cpulist(text) == spec


def test_size_arg():
    assert size_arg("1024") == "1024Ki"
    with pytest.raises(Refused):
        size_arg("-1")
