"""domiftune, schedinfo, memtune, blkdeviotune: the effective values with their source and what the node
applied; edits of spec.qos guarded by the generation; refusals; the QosApplied outcome --wait follows."""

from __future__ import annotations

import copy

import jsonpatch
import pytest
from virsh_cases import apply, make_vm, plan

from libvirt_operator.cli.plan import Refused

RESOLVED = {
    "valid": True, "policies": ["gold"], "observedGeneration": 3,
    "cpu": {"shares": {"value": 2048, "source": "policy/gold"}, "limitPercent": {"value": 50, "source": "spec"}},
    "memory": {"hardLimit": {"value": "512Mi", "source": "policy/gold"}},
    "network": [{"name": "nic0", "inbound": {"value": {"averageKibPerSecond": 250}, "source": "spec"},
                 "portGroup": {"value": {"name": "default/gold", "outbound": {"averageKibPerSecond": 100}},
                               "source": "policy/gold"}}],
    "disks": [{"name": "root", "ioTune": {"value": {"totalIops": 200}, "source": "policy/gold"}}],
}
APPLIED = {"networkMechanism": "tc", "cgroup": "v1", "generation": 3,
           "cpu": {"shares": 2048, "periodMicroseconds": 100000, "quotaMicroseconds": 50000},
           "memory": {"hardLimitKib": 524288}, "disks": {"root": {"total_iops_sec": 200}},
           "interfaces": {"nic0": {"inboundRateBits": 2048000, "inboundCeilBits": 2048000}}}


def qos_vm(generation: int = 3, qos: dict | None = None, **status) -> dict:
    spec = {"qos": qos} if qos is not None else {}
    return make_vm(generation=generation, status={"qos": copy.deepcopy(RESOLVED), "qosApplied": APPLIED,
                                                  "conditions": [{"type": "QosApplied", "status": "True",
                                                                  "reason": "Applied", "message": "applied: cpu",
                                                                  "observedGeneration": generation}],
                                                  **status}, **spec)


def outcome(vm_before: dict, argv: str, after_status: dict):
    p = plan(argv, vm_before)
    updated = apply(vm_before, p)
    now = copy.deepcopy(updated)
    now["status"] = after_status
    return p.check(updated)(now)


def test_reads_show_the_effective_value_its_source_and_what_is_applied():
    vm = qos_vm()
    out = plan("schedinfo web", vm).output
    assert "cpu_shares" in out and "2048" in out and "policy/gold" in out
    assert "50%" in out and "spec" in out and "50000 us / 100000 us" in out
    assert "network mechanism tc, cgroup v1, applied for generation 3" in out and "QosApplied: True (Applied" in out
    out = plan("memtune web", vm).output
    assert "512Mi" in out and "524288 KiB" in out
    out = plan("domiftune web nic0", vm).output
    assert "250 KiB/s" in out and "rate 250 KiB/s, ceil 250 KiB/s" in out and "default/gold" in out
    assert plan("domiftune web 52:54:00:00:00:01", vm).output == out  # by MAC, as virsh takes it
    out = plan("blkdeviotune web vda", vm).output  # by target
    assert "total_iops_sec" in out and "200" in out and "policy/gold" in out
    assert not plan("schedinfo web", vm).actions


def test_a_read_of_a_vm_without_qos_says_so():
    out = plan("schedinfo web", make_vm()).output
    assert "QosApplied: not reported yet" in out and "unlimited" in out


def test_an_invalid_resolution_is_shown_with_its_reason():
    vm = qos_vm()
    vm["status"]["qos"] = {"valid": False, "reason": "LimitBelowReservation", "message": "cpu.reservationPercent..."}
    assert "status.qos is invalid: LimitBelowReservation" in plan("schedinfo web", vm).output


def test_schedinfo_sets_shares_and_a_quota_as_percent_guarded_by_the_generation():
    vm = make_vm()
    p = plan(["schedinfo", "web", "--set", "cpu_shares=512", "--set", "vcpu_quota=25000"], vm)
    after = apply(vm, p)
    assert after["spec"]["qos"] == {"cpu": {"shares": 512, "limitPercent": 25}}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(make_vm(generation=4), p)
    after = apply(after, plan(["schedinfo", "web", "--set", "global_quota=-1", "--set", "reservation_percent=30"],
                              after))
    assert after["spec"]["qos"] == {"cpu": {"shares": 512, "reservationPercent": 30}}
    assert apply(after, plan("schedinfo web --set limit_percent=40%", after))["spec"]["qos"]["cpu"][
        "limitPercent"] == 40


def test_schedinfo_refusals():
    with pytest.raises(Refused, match="KEY one of cpu_shares"):
        plan("schedinfo web --set weight=3", make_vm())
    with pytest.raises(Refused, match="multiple of 1000 us"):
        plan("schedinfo web --set vcpu_quota=25500", make_vm())
    with pytest.raises(Refused, match=r"cpu.reservationPercent \(60%\) cannot exceed cpu.limitPercent \(50%\)"):
        plan(["schedinfo", "web", "--set", "limit_percent=50", "--set", "reservation_percent=60"], make_vm())


def test_the_same_values_change_nothing():
    vm = make_vm(qos={"cpu": {"shares": 512}})
    p = plan("schedinfo web --set cpu_shares=512", vm)
    assert "unchanged" in p.summary and not p.actions


def test_memtune_takes_kib_or_quantities_and_removes_with_minus_one():
    vm = make_vm(qos={"cpu": {"shares": 512}})
    after = apply(vm, plan("memtune web --hard-limit 524288 --soft-limit 192Mi --min-guarantee 64Mi", vm))
    assert after["spec"]["qos"] == {"cpu": {"shares": 512},
                                    "memory": {"hardLimit": "524288Ki", "softLimit": "192Mi", "guarantee": "64Mi"}}
    after = apply(after, plan("memtune web --hard-limit -1 --soft-limit 0", after))
    assert after["spec"]["qos"]["memory"] == {"guarantee": "64Mi"}


def test_memtune_refusals():
    with pytest.raises(Refused, match=r"memory.softLimit \(1Gi\) cannot exceed memory.hardLimit"):
        plan("memtune web --hard-limit 512Mi --soft-limit 1Gi", make_vm())
    with pytest.raises(Refused, match=r"memory.guarantee \(300Mi\) cannot exceed memory.size \(256Mi\)"):
        plan("memtune web --min-guarantee 300Mi", make_vm())


def test_domiftune_sets_and_removes_a_direction():
    vm = make_vm()
    after = apply(vm, plan("domiftune web nic0 --inbound 250,500,64 --outbound 100", vm))
    assert after["spec"]["qos"]["network"] == [{"name": "nic0", "outbound": {"averageKibPerSecond": 100},
                                                "inbound": {"averageKibPerSecond": 250, "peakKibPerSecond": 500,
                                                            "burstKib": 64}}]
    after = apply(after, plan("domiftune web nic0 --inbound 0", after))
    assert after["spec"]["qos"]["network"] == [{"name": "nic0", "outbound": {"averageKibPerSecond": 100}}]
    after = apply(after, plan("domiftune web nic0 --outbound 0", after))
    assert "qos" not in after["spec"]  # nothing of its own left: spec.qos removed


def test_domiftune_refusals():
    with pytest.raises(Refused, match="has no interface 'eth9'"):
        plan("domiftune web eth9 --inbound 10", make_vm())
    with pytest.raises(Refused, match="the peak cannot be below the average"):
        plan("domiftune web nic0 --inbound 100,50", make_vm())
    with pytest.raises(Refused, match="average"):
        plan("domiftune web nic0 --outbound fast", make_vm())


def test_blkdeviotune_sets_and_refuses_total_with_read_write():
    vm = make_vm()
    after = apply(vm, plan("blkdeviotune web root --read-bytes-sec 1048576 --write-iops-sec 50", vm))
    assert after["spec"]["qos"]["disks"] == [{"name": "root", "readBytesPerSecond": 1048576, "writeIops": 50}]
    with pytest.raises(Refused, match="a total bytes limit excludes the read/write ones"):
        plan("blkdeviotune web root --total-bytes-sec 2000000", after)
    after = apply(after, plan("blkdeviotune web vda --total-bytes-sec 2000000 --read-bytes-sec 0", after))
    assert after["spec"]["qos"]["disks"] == [{"name": "root", "writeIops": 50, "totalBytesPerSecond": 2000000}]
    with pytest.raises(Refused, match="has no disk 'vdz'"):
        plan("blkdeviotune web vdz --total-iops-sec 5", make_vm())


def test_wait_follows_qos_applied_for_the_new_generation():
    vm = qos_vm(generation=3)
    argv = "schedinfo web --set cpu_shares=900"
    old = copy.deepcopy(vm["status"])
    assert outcome(vm, argv, old) is None  # nothing for generation 4 yet
    resolved = {**copy.deepcopy(old), "qos": {**RESOLVED, "observedGeneration": 4}}
    assert outcome(vm, argv, resolved) is None  # resolved, the agent has not applied it
    done = copy.deepcopy(resolved)
    done["qosApplied"] = {**APPLIED, "generation": 4}
    done["conditions"][0]["observedGeneration"] = 4
    result = outcome(vm, argv, done)
    assert result.ok and "CPU QoS applied (generation 4" in result.message
    refused = copy.deepcopy(resolved)
    refused["conditions"] = [{"type": "QosApplied", "status": "False", "reason": "HostUnsupported",
                              "message": "cpu.shares 900 ...", "observedGeneration": 4}]
    result = outcome(vm, argv, refused)
    assert not result.ok and result.message.startswith("QosApplied: HostUnsupported")
    invalid = {**copy.deepcopy(old), "qos": {"valid": False, "reason": "ExceedsVM", "message": "too much",
                                             "observedGeneration": 4}}
    result = outcome(vm, argv, invalid)
    assert not result.ok and result.message == "ExceedsVM: too much"


def test_wait_on_a_stopped_vm_ends_once_resolved():
    vm = qos_vm(generation=3)
    vm["spec"]["powerState"] = "Stopped"
    resolved = {"qos": {**RESOLVED, "observedGeneration": 4}}
    result = outcome(vm, "memtune web --hard-limit 1Gi", resolved)
    assert result.ok and "applies it when the VM starts" in result.message
