"""netshape's pure parts: tc's printed rates and classes, device names, the trees planned per NIC and group."""

import pytest

from libvirt_operator.api.qos import NicEffective, PortGroupRef, PriorityQueue, Rate
from libvirt_operator.hypervisor import netshape as ns
from libvirt_operator.hypervisor.netshape import Direction, NicShape, PortGroupShape, Queue, Shaper


@pytest.mark.parametrize(("text", "bits"), [("800bit", 800), ("8192Kbit", 8_192_000), ("5Mbit", 5_000_000),
                                            ("1.5Gbit", 1_500_000_000)])
def test_parse_rate(text, bits):
    assert ns.parse_rate(text) == bits


def test_parse_rate_refuses_garbage():
    with pytest.raises(ValueError):
        ns.parse_rate("fast")


def test_parse_classes_of_leaves_and_inner_classes():
    text = ("class htb 1:1 root rate 9830Kbit ceil 9830Kbit burst 1597b cburst 1597b \n"
            "class htb 1:100 parent 1:1 leaf 8001: prio 7 rate 4915Kbit ceil 9830Kbit burst 1598b cburst 1597b \n")
    assert ns.parse_classes(text) == [ns.ClassInfo("1:1", None, None, 9_830_000, 9_830_000),
                                      ns.ClassInfo("1:100", "1:1", 7, 4_915_000, 9_830_000)]


def test_ifb_names_fit_the_kernel_limit_and_differ():
    names = {ns.ifb_name("nic", "vnet12345678"), ns.ifb_name("pgi", "a-very-long-namespace/policy-name"),
             ns.ifb_name("pgo", "a-very-long-namespace/policy-name")}
    assert len(names) == 3 and all(len(n) <= 15 for n in names)


def classes(commands):
    return {c.classid: c for c in ns._expected_classes(commands)}


def test_nic_plan_units_and_queues():
    nic = NicShape("vnet0", "52:54:00:00:00:01", inbound=Direction(1000, peak_kib=2000, burst_kib=32,
                                                                    queues=(Queue((46,), 30), Queue((10, 12), 20))))
    plan = Shaper().nic_plan(nic)
    assert set(plan) == {"vnet0"}
    cls = classes(plan["vnet0"])
    assert (cls["1:1"].rate_bits, cls["1:1"].ceil_bits) == (8_192_000, 16_384_000)
    assert [cls[i].prio for i in ("1:10", "1:11", "1:1f")] == [0, 1, 2]
    assert [cls[i].rate_bits for i in ("1:10", "1:11", "1:1f")] == [8_192_000 * 30 // 100, 8_192_000 * 20 // 100,
                                                                     8_192_000 * 50 // 100]
    assert plan["vnet0"][0][-2:] == ["default", "1f"]
    dscp = [c for c in plan["vnet0"] if c[:2] == ["filter", "add"] and "tos" in c]
    assert [c[c.index("tos") + 1] for c in dscp] == ["0xb8", "0x28", "0x30"]


def test_group_plan_members_priority_and_fair_share():
    group = PortGroupShape("ns/pg", outbound=Direction(1000))
    members = [NicShape("vnet1", "52:54:00:00:00:02", priority=7),
               NicShape("vnet0", "52:54:00:00:00:01", outbound=Direction(100, peak_kib=400))]
    plan = Shaper().group_plan(group, members)
    [ifb] = plan
    assert ifb == ns.ifb_name("pgo", "ns/pg")
    cls = classes(plan[ifb])
    # members sorted by device: vnet0 is 1:100, vnet1 is 1:200
    assert (cls["1:100"].rate_bits, cls["1:100"].ceil_bits, cls["1:100"].prio) == (819_200, 3_276_800, 7)
    assert (cls["1:200"].rate_bits, cls["1:200"].ceil_bits, cls["1:200"].prio) == (4_096_000, 8_192_000, 0)
    macs = [c for c in plan[ifb] if "ether" in c]
    assert [(c[c.index("src") + 1], c[-1]) for c in macs] == [("52:54:00:00:00:01", "1:100"),
                                                            ("52:54:00:00:00:02", "1:200")]


def test_same_tolerates_tc_rounding_but_not_changes():
    want = [ns.ClassInfo("1:1", None, 0, 5_734_400, 5_734_400)]
    assert ns._same([ns.ClassInfo("1:1", None, 0, 5_734_000, 5_734_000)], want)
    assert not ns._same([ns.ClassInfo("1:1", None, 0, 6_000_000, 6_000_000)], want)
    assert not ns._same([], want)


def test_plan_node_groups_by_port_group():
    pg = PortGroupRef(name="ns/pg", inbound=Rate(average_kib_per_second=500))
    items = [(NicEffective(name="a", port_group=pg, priority=3), "vnet0", "m0"),
             (NicEffective(name="b", outbound=Rate(average_kib_per_second=10),
                           queues=[PriorityQueue(dscp=[46], rate_percent=50)]), "vnet1", "m1"),
             (NicEffective(name="c", port_group=pg), "vnet2", "m2")]
    plan = ns.plan_node(items)
    [alone] = plan.nics
    assert alone.device == "vnet1" and alone.outbound.queues == (Queue((46,), 50),) and alone.inbound is None
    [(group, members)] = plan.groups
    assert group.inbound.average_kib == 500 and group.outbound is None
    assert [(m.device, m.priority) for m in members] == [("vnet0", 3), ("vnet2", 0)]
