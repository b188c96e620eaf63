"""Pure rules of hypervisor/tuning: limits to libvirt values, floor shares, what a node can honour."""

import itertools

import pytest

from libvirt_operator.api.qos import CpuQos, EffectiveQos, MemoryQos, NicEffective, Rate
from libvirt_operator.hypervisor import tuning as t

V1 = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
TC_HERE = frozenset({"htb", "tbf", "ingress", "u32", "mirred"})


def test_cgroup_version_from_mounts():
    assert t.cgroup_version(V1) == 1
    assert t.cgroup_version(V2) == 2


@pytest.mark.parametrize(("percent", "expected"), [(None, (100000, -1)), (25, (100000, 25000)),
                                                   (150, (100000, 150000)), (1, (100000, 1000))])
def test_cpu_limit(percent, expected):
    assert t.cpu_limit(percent) == expected


def test_memory_limits_with_the_guarantee_as_soft_floor():
    assert t.memory_limits_kib(MemoryQos()) == (None, None)
    assert t.memory_limits_kib(MemoryQos(hard_limit="1Gi", soft_limit="512Mi")) == (1048576, 524288)
    assert t.memory_limits_kib(MemoryQos(soft_limit="256Mi", guarantee="384Mi")) == (None, 393216)
    assert t.memory_limits_kib(MemoryQos(soft_limit="512Mi", guarantee="384Mi")) == (None, 524288)
    assert t.balloon_floor_kib(MemoryQos(guarantee="1Mi")) == 1024 and t.balloon_floor_kib(MemoryQos()) == 0


def test_io_tune_from_the_api_sets_all_six():
    from libvirt_operator.api.qos import DiskIoTune
    tune = t.BlockIoTune.from_api(DiskIoTune(total_iops=100, read_bytes_per_second=5))
    assert tune.params() == {"total_bytes_sec": 0, "read_bytes_sec": 5, "write_bytes_sec": 0,
                             "total_iops_sec": 100, "read_iops_sec": 0, "write_iops_sec": 0}


def test_no_floors_keeps_shares_as_they_are():
    plan = t.floor_shares({"a": CpuQos(shares=4096), "b": CpuQos(), "c": CpuQos(shares=1)}, 2)
    assert plan.shares == {"a": 4096, "b": 1024, "c": 2} and not plan.overcommitted


def share_of(plan, key):
    return plan.shares[key] / sum(plan.shares.values())


@pytest.mark.parametrize("cpus", [1, 2, 8])
@pytest.mark.parametrize("version", [1, 2])
def test_floors_hold_under_full_contention(cpus, version):
    capacity = cpus * 100
    for floors in itertools.product([0, 10, 30], repeat=3):
        if sum(floors) >= capacity:
            continue
        vms = {f"vm{i}": CpuQos(min_percent=f or None, shares=w) for i, (f, w) in
               enumerate(zip(floors, [None, 8000, 2], strict=True))}
        vms["noisy"] = CpuQos(shares=t.SHARES[version][1])
        plan = t.floor_shares(vms, cpus, version)
        low, high, _ = t.SHARES[version]
        assert all(low <= s <= high for s in plan.shares.values())
        for i, f in enumerate(floors):
            assert share_of(plan, f"vm{i}") * capacity >= f * 0.99, (floors, plan)


def test_reservation_and_min_take_the_larger_floor():
    assert t.floor_percent(CpuQos(min_percent=20, reservation_percent=50)) == 50
    plan = t.floor_shares({"r": CpuQos(reservation_percent=50), "x": CpuQos()}, 1)
    assert share_of(plan, "r") >= 0.5


def test_overcommitted_floors_are_scaled_and_flagged():
    plan = t.floor_shares({"a": CpuQos(reservation_percent=100), "b": CpuQos(reservation_percent=100)}, 1)
    assert plan.overcommitted and plan.floors_percent == 200
    assert abs(share_of(plan, "a") - 0.5) < 0.01


def caps(version=1, tc=TC_HERE, ifb=True, vlan=False, cpus=2):
    return t.Capabilities(cgroup_version=version, tc=tc, ifb=ifb, vlan=vlan, cpus=cpus)


def test_this_kernel_shapes_with_tc_not_libvirt():
    here = caps()
    assert here.network_mechanism == "tc" and not here.libvirt_bandwidth
    assert caps(tc=TC_HERE | {"sfq", "fw", "police"}).network_mechanism == "libvirt"
    assert caps(ifb=False).network_mechanism is None


@pytest.mark.parametrize(("qos", "c", "field"), [
    (EffectiveQos(cpu=CpuQos(shares=100000)), caps(version=2), "cpu.shares"),
    (EffectiveQos(cpu=CpuQos(shares=1)), caps(version=1), "cpu.shares"),
    (EffectiveQos(cpu=CpuQos(limit_percent=300)), caps(cpus=2), "cpu.limitPercent"),
    (EffectiveQos(cpu=CpuQos(reservation_percent=250)), caps(cpus=2), "cpu.reservationPercent"),
    (EffectiveQos(network=[NicEffective(name="nic0", vlan=42)]), caps(), "network[nic0].vlan"),
    (EffectiveQos(network=[NicEffective(name="nic0", inbound=Rate(average_kib_per_second=10))]),
     caps(ifb=False), "network[nic0]"),
])
def test_judge_names_what_the_node_cannot_honour(qos, c, field):
    [problem] = t.judge(qos, c)
    assert problem.reason == t.HOST_UNSUPPORTED and problem.field == field


def test_judge_accepts_what_fits():
    qos = EffectiveQos(cpu=CpuQos(shares=100000, limit_percent=200, reservation_percent=50),
                       network=[NicEffective(name="n", vlan=7, inbound=Rate(average_kib_per_second=1))])
    assert t.judge(qos, caps(version=1, vlan=True)) == []
