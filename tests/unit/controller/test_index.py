"""The watch-fed index of VMs: memory per node, VMs per node, MAC holders; reservations, stale events, seeds."""

from libvirt_operator.controller import placement as p
from libvirt_operator.controller.index import VMIndex
from libvirt_operator.controller.placement import DiskUse, Node, VMRef

GI = 2**30


def vm(uid, memory=GI, node=None, macs=(), disks=(), created=""):
    return VMRef(uid=uid, name=f"ns/{uid}", memory_bytes=memory, node=node, macs=tuple(macs), disks=tuple(disks),
                 created=created)


def test_memory_and_vms_per_node_follow_updates_and_removals():
    ix = VMIndex()
    ix.update(vm("a", 2 * GI, node="n1"), 1.0)
    ix.update(vm("b", GI, node="n1"), 1.0)
    ix.update(vm("c", GI), 1.0)  # unplaced: counts nowhere
    assert (ix.used("n1"), ix.used("n2"), len(ix)) == (3 * GI, 0, 3)
    assert {v.uid for v in ix.on("n1")} == {"a", "b"}
    ix.update(vm("b", 4 * GI, node="n1"), 2.0)  # a new spec of b (maxSize raised)
    assert ix.used("n1") == 6 * GI
    ix.remove("a", 3.0)
    assert ix.used("n1") == 4 * GI and {v.uid for v in ix.on("n1")} == {"b"}
    ix.remove("b", 3.0)
    assert ix.used("n1") == 0 and list(ix.on("n1")) == []


def test_a_stale_event_never_unplaces_a_vm():
    ix = VMIndex()
    ix.update(vm("a", node="n1"), 1.0)
    ix.update(vm("a"), 2.0)  # an event older than our label patch, delivered late
    assert ix.get("a").node == "n1" and ix.used("n1") == GI


def test_a_reservation_counts_at_once_and_a_failed_patch_releases_it():
    ix = VMIndex()
    ix.update(vm("a"), 1.0)
    previous = ix.reserve(vm("a"), "n1")
    assert ix.used("n1") == GI
    ix.update(vm("a"), 2.0)  # the watch has not seen the label yet: still reserved
    assert ix.used("n1") == GI
    ix.release("a", previous)
    assert ix.used("n1") == 0 and ix.get("a").node is None
    assert ix.release("b", ix.reserve(vm("b"), "n2")) is None and ix.get("b") is None


def test_decisions_in_a_burst_never_overcommit():
    ix = VMIndex()
    nodes = [Node("x", 2 * GI), Node("y", 2 * GI)]
    placed = []
    for i in range(5):
        ref = vm(f"v{i}")
        ix.update(ref, 1.0)
        d = p.decide_in(ref, nodes, {"x", "y"}, ix)
        if d.node:
            ix.reserve(ref, d.node)
            placed.append(d.node)
        else:
            assert d.reason == p.INSUFFICIENT_MEMORY
    assert sorted(placed) == ["x", "x", "y", "y"]


def test_a_placed_vm_is_not_counted_against_itself():
    ix = VMIndex()
    ix.update(vm("me", 4 * GI, node="a"), 1.0)
    assert p.decide_in(vm("me", 4 * GI), [Node("a", 4 * GI)], {"a"}, ix).node == "a"


def test_disk_conflicts_and_mac_holders_come_from_the_index():
    ix = VMIndex()
    disk = [DiskUse("/i/d.qcow2", True)]
    ix.update(vm("x", node="a", disks=disk, macs=["52:54:00:00:00:01"], created="t1"), 1.0)
    nodes = [Node("a", 64 * GI), Node("b", 2 * GI)]
    assert p.decide_in(vm("new", disks=disk), nodes, {"a", "b"}, ix).node == "b"
    d = p.decide_in(vm("later", macs=["52:54:00:00:00:01"], created="t2"), nodes, {"a", "b"}, ix)
    assert d.reason == p.MAC_IN_USE and "ns/x" in d.message
    assert [h.uid for h in ix.holders(["52:54:00:00:00:01", "52:54:00:00:00:02"])] == ["x"]
    ix.remove("x", 2.0)
    assert ix.holders(["52:54:00:00:00:01"]) == []


def test_a_seed_adds_what_the_watch_has_not_shown_and_drops_what_is_gone():
    ix = VMIndex()
    ix.update(vm("old", node="n1"), 1.0)  # deleted while the watch was away: the listing lacks it
    ix.update(vm("fresh", node="n2"), 6.0)  # created after the listing started
    ix.remove("deleted", 7.0)  # the listing (started at 5) still shows it
    ix.seed([vm("listed", node="n1"), vm("deleted", node="n1"), vm("fresh")], listed_at=5.0)
    assert ix.get("old") is None and ix.get("deleted") is None
    assert ix.get("listed").node == "n1" and ix.get("fresh").node == "n2"
    assert (ix.used("n1"), ix.used("n2"), ix.seeded_at) == (GI, GI, 5.0)


def test_a_seed_keeps_a_reservation_the_listing_predates():
    ix = VMIndex()
    ix.update(vm("a"), 1.0)
    ix.reserve(vm("a"), "n1")
    ix.seed([vm("a")], listed_at=2.0)  # listed before the label patch landed
    assert ix.get("a").node == "n1" and ix.used("n1") == GI
