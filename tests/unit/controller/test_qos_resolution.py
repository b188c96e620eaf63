"""QoS resolution: spec over policies, priority, deterministic ties, per-setting merge, bad input."""

import pytest

from libvirt_operator.api.qos import QosStatus, effective
from libvirt_operator.controller import qos as q


def vm(name="web", labels=None, qos=None, ns="default", vcpus=2, memory="1Gi", nics=("nic0",), disks=("root",)):
    spec = {"cpu": {"vcpus": vcpus}, "memory": {"size": memory},
            "interfaces": [{"name": n, "type": "bridge", "source": "br0"} for n in nics],
            "disks": [{"name": d, "path": f"/x/{d}.qcow2"} for d in disks] + [{"name": "iso", "device": "cdrom"}]}
    if qos is not None:
        spec["qos"] = qos
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "web"}, "generation": 3},
            "spec": spec}


def policy(name, priority=0, selector=None, ns="default", **spec):
    body = {"metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "web"}} if selector is None else selector,
                     "priority": priority, **spec}}
    return q.policy_of(body)


def value(res, kind, key):
    entry = res.status[kind][key]
    return entry["value"], entry["source"]


# -- selectors

@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ({}, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
])
def test_selector_semantics(selector, labels, expected):
    assert q.selector_matches(selector, labels) is expected


# -- precedence

def test_no_qos_at_all_is_valid_and_empty():
    res = q.resolve(vm(), [])
    assert res.status == {"valid": True, "policies": [], "observedGeneration": 3}
    assert QosStatus.model_validate(res.status).valid


def test_the_vm_spec_wins_over_every_policy_per_setting():
    pols = [policy("gold", 100, cpu={"shares": 4096, "limitPercent": 150})]
    res = q.resolve(vm(qos={"cpu": {"shares": 512}}), pols)
    assert value(res, "cpu", "shares") == (512, "spec")
    assert value(res, "cpu", "limitPercent") == (150, "policy/gold")
    assert res.conflicts == []


def test_higher_priority_wins_and_settings_merge_one_by_one():
    pols = [policy("low", 1, cpu={"shares": 100, "limitPercent": 50}), policy("high", 9, cpu={"shares": 900})]
    res = q.resolve(vm(), pols)
    assert value(res, "cpu", "shares") == (900, "policy/high")
    assert value(res, "cpu", "limitPercent") == (50, "policy/low")
    assert res.status["policies"] == ["high", "low"]


def test_equal_priority_tie_goes_to_the_first_name_and_is_a_conflict():
    pols = [policy("zeta", 5, cpu={"shares": 300}), policy("alpha", 5, cpu={"shares": 200})]
    res = q.resolve(vm(), pols)
    assert value(res, "cpu", "shares") == (200, "policy/alpha")
    [conflict] = res.conflicts
    assert conflict["field"] == "cpu.shares" and conflict["winner"] == "policy/alpha"
    assert conflict["losers"] == ["policy/zeta"]
    assert res.status["conflicts"] == res.conflicts and res.valid
    # the same in any input order
    assert q.resolve(vm(), list(reversed(pols))).status == res.status


def test_equal_priority_with_equal_values_or_disjoint_settings_is_no_conflict():
    same = [policy("a", 5, cpu={"shares": 300}), policy("b", 5, cpu={"shares": 300})]
    disjoint = [policy("a", 5, cpu={"shares": 300}), policy("b", 5, memory={"hardLimit": "2Gi"})]
    assert q.resolve(vm(), same).conflicts == []
    assert q.resolve(vm(), disjoint).conflicts == []


def test_a_tie_below_the_winner_is_no_conflict():
    pols = [policy("top", 9, cpu={"shares": 1}), policy("a", 5, cpu={"shares": 2}), policy("b", 5, cpu={"shares": 3})]
    res = q.resolve(vm(), pols)
    assert value(res, "cpu", "shares") == (1, "policy/top") and res.conflicts == []


def test_a_tie_is_no_conflict_when_the_vm_spec_decides():
    pols = [policy("a", 5, cpu={"shares": 2}), policy("b", 5, cpu={"shares": 3})]
    res = q.resolve(vm(qos={"cpu": {"shares": 7}}), pols)
    assert value(res, "cpu", "shares") == (7, "spec") and res.conflicts == []


def test_policies_of_other_namespaces_or_selectors_do_not_apply():
    pols = [policy("other-ns", 9, ns="prod", cpu={"shares": 9}),
            policy("other-app", 9, selector={"matchLabels": {"app": "db"}}, cpu={"shares": 8}),
            policy("mine", 0, cpu={"shares": 7})]
    res = q.resolve(vm(), pols)
    assert value(res, "cpu", "shares") == (7, "policy/mine") and res.status["policies"] == ["mine"]


def test_a_policy_that_stops_matching_takes_its_values_away():
    pol = [policy("gold", 1, cpu={"shares": 4096}, memory={"softLimit": "512Mi"})]
    assert "cpu" in q.resolve(vm(), pol).status
    res = q.resolve(vm(labels={"app": "other"}), pol)
    assert "cpu" not in res.status and "memory" not in res.status and res.status["policies"] == []


# -- network and disks

def test_network_per_interface_with_interface_filter_and_port_group():
    rate = {"averageKibPerSecond": 1000, "peakKibPerSecond": 2000, "burstKib": 64}
    pols = [policy("net", 1, network={"interfaces": ["nic1"], "inbound": rate, "priority": 6,
                                      "portGroup": {"outbound": {"averageKibPerSecond": 5000}}})]
    res = q.resolve(vm(nics=("nic0", "nic1"), qos={"network": [{"name": "nic0", "vlan": 42}]}), pols)
    nic0, nic1 = res.status["network"]
    assert nic0 == {"name": "nic0", "vlan": {"value": 42, "source": "spec"}}
    assert nic1["inbound"] == {"value": rate, "source": "policy/net"}
    assert nic1["priority"]["value"] == 6
    assert nic1["portGroup"] == {"value": {"name": "default/net", "outbound": {"averageKibPerSecond": 5000}},
                                 "source": "policy/net"}


def test_a_rate_is_taken_whole_never_mixed_from_two_sources():
    pols = [policy("a", 9, network={"inbound": {"averageKibPerSecond": 100}}),
            policy("b", 1, network={"inbound": {"averageKibPerSecond": 50, "peakKibPerSecond": 80}})]
    nic = q.resolve(vm(), pols).status["network"][0]
    assert nic["inbound"]["value"] == {"averageKibPerSecond": 100}


def test_disk_io_applies_to_disks_not_cdroms_and_is_whole():
    pols = [policy("io", 1, diskIo={"totalIops": 200}),
            policy("io2", 0, diskIo={"disks": ["data"], "readBytesPerSecond": 10**6})]
    res = q.resolve(vm(disks=("root", "data"), qos={"disks": [{"name": "root", "writeIops": 50}]}), pols)
    assert res.status["disks"] == [
        {"name": "root", "ioTune": {"value": {"writeIops": 50}, "source": "spec"}},
        {"name": "data", "ioTune": {"value": {"totalIops": 200}, "source": "policy/io"}},
    ]


# -- bad input: each with its own reason, and nothing to apply

@pytest.mark.parametrize(("the_vm", "pols", "reason", "words"), [
    (vm(qos={"cpu": {"reservationPercent": 80}}), [policy("cap", 1, cpu={"limitPercent": 50})],
     q.LIMIT_BELOW_RESERVATION, "cpu.limitPercent 50 (policy/cap) is below"),
    (vm(qos={"cpu": {"minPercent": 60}}), [policy("cap", 1, cpu={"limitPercent": 50})],
     q.LIMIT_BELOW_RESERVATION, "lower limit"),
    (vm(vcpus=1, qos={"cpu": {"reservationPercent": 150}}), [], q.EXCEEDS_VM, "1 vCPU(s)"),
    (vm(qos={"memory": {"guarantee": "1Gi"}}), [policy("m", 1, memory={"hardLimit": "512Mi"})],
     q.LIMIT_BELOW_RESERVATION, "memory.hardLimit 512Mi (policy/m) is below memory.guarantee"),
    (vm(qos={"memory": {"softLimit": "900Mi"}}), [policy("m", 1, memory={"hardLimit": "512Mi"})],
     q.LIMIT_BELOW_RESERVATION, "memory.softLimit"),
    (vm(memory="256Mi", qos={"memory": {"guarantee": "512Mi"}}), [], q.EXCEEDS_VM, "memory.size 256Mi"),
    (vm(qos={"network": [{"name": "nic9", "priority": 1}]}), [], q.UNKNOWN_DEVICE, "'nic9'"),
    (vm(qos={"disks": [{"name": "iso9", "totalIops": 1}]}), [], q.UNKNOWN_DEVICE, "'iso9'"),
    (vm(), [policy("qq", 1, network={"queues": [{"dscp": [46], "ratePercent": 50}]})],
     q.QUEUES_WITHOUT_RATE, "policy/qq"),
    (vm(qos={"cpu": {"shares": "lots"}}), [], q.INVALID_SPEC, "spec.qos"),
])
def test_bad_input_is_invalid_with_a_reason_and_no_values(the_vm, pols, reason, words):
    res = q.resolve(the_vm, pols)
    assert res.status["valid"] is False and res.status["reason"] == reason
    assert words in res.status["message"]
    assert not {"cpu", "memory", "network", "disks"} & set(res.status)
    assert effective(res.status) is None  # the agent gets nothing to apply


def test_memory_floor_equal_to_the_limit_is_fine():
    res = q.resolve(vm(qos={"memory": {"hardLimit": "512Mi", "guarantee": "512Mi", "softLimit": "512Mi"}}), [])
    assert res.valid


# -- the agent's view

def test_effective_strips_the_sources():
    pols = [policy("net", 1, network={"outbound": {"averageKibPerSecond": 10}, "portGroup": {
        "inbound": {"averageKibPerSecond": 99}}}, cpu={"limitPercent": 25})]
    eff = effective(q.resolve(vm(qos={"memory": {"hardLimit": "1Gi"}, "disks": [{"name": "root", "totalIops": 9}]}),
                              pols).status)
    assert eff.cpu.limit_percent == 25 and eff.cpu.shares is None
    assert eff.memory.hard_limit == "1Gi"
    [nic] = eff.network
    assert nic.outbound.average_kib_per_second == 10 and nic.port_group.name == "default/net"
    assert nic.port_group.inbound.average_kib_per_second == 99
    assert eff.disks[0].name == "root" and eff.disks[0].total_iops == 9


# -- a namespace: policy reports

def test_policy_reports_count_matches_and_carry_conflicts():
    vms = [vm("a"), vm("b"), vm("c", labels={"app": "db"})]
    pols = [policy("p1", 5, cpu={"shares": 1}), policy("p2", 5, cpu={"shares": 2}),
            policy("none", 0, selector={"matchLabels": {"app": "nothing"}}, cpu={"shares": 3}),
            policy("all", 0, selector={}, memory={"softLimit": "100Mi"})]
    results, reports = q.resolve_all(vms, pols)
    assert set(results) == {"default/a", "default/b", "default/c"}
    assert reports[("default", "p1")].matched == 2 and reports[("default", "all")].matched == 3
    assert reports[("default", "p1")].phase == q.DEGRADED and reports[("default", "p2")].phase == q.DEGRADED
    assert [c["vm"] for c in reports[("default", "p2")].conflicts] == ["a", "b"]
    assert reports[("default", "none")].phase == q.IDLE and reports[("default", "all")].phase == q.ACTIVE
    st = q.policy_status(reports[("default", "none")], 4)
    assert st == {"phase": "Idle", "matchedVms": 0, "conflicts": [], "observedGeneration": 4}
    [(ctype, ok, reason, _), _] = q.policy_conditions(reports[("default", "none")])
    assert (ctype, ok, reason) == ("Matched", False, q.NO_MATCH)
    conflict = q.policy_conditions(reports[("default", "p1")])[1]
    assert conflict[:3] == ("Conflict", True, q.POLICY_CONFLICT)


def test_reservation_accounting():
    res = q.resolve(vm(qos={"cpu": {"reservationPercent": 120}}), [])
    assert q.reserved_cpu_percent(res.status) == 120
    assert q.reserved_cpu_percent({"valid": False}) == 0 and q.reserved_cpu_percent(None) == 0
    assert q.cpu_room(2, [120, 50]) == 30
