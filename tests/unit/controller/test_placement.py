"""Placement decisions: pinned nodes, most-free choice, reasons and the reservations' bookkeeping."""

from libvirt_operator.api import meta
from libvirt_operator.controller import placement as p
from libvirt_operator.controller.placement import DiskUse, Node, VMRef

GI = 2**30


def vm(uid="new", memory=GI, pinned=None, node=None, disks=()):
    return VMRef(uid=uid, name=f"ns/{uid}", memory_bytes=memory, pinned_node=pinned, node=node, disks=tuple(disks))


def test_picks_the_live_node_with_most_free_memory():
    nodes = [Node("a", 8 * GI), Node("b", 4 * GI), Node("c", 16 * GI)]
    placed = [vm("x", 10 * GI, node="c")]  # c: 6Gi free, a: 8Gi free
    d = p.decide(vm(), nodes, {"a", "b", "c"}, placed)
    assert (d.node, d.reason) == ("a", p.SCHEDULED)
    assert "8Gi of 8Gi" in d.message


def test_a_tie_goes_to_the_first_name():
    nodes = [Node("b", 4 * GI), Node("a", 4 * GI)]
    assert p.decide(vm(), nodes, {"a", "b"}, []).node == "a"


def test_only_live_uncordoned_libvirt_nodes_are_candidates():
    nodes = [Node("dead", 64 * GI), Node("plain", 64 * GI, libvirt=False),
             Node("cordoned", 64 * GI, cordoned=True), Node("small", 2 * GI)]
    alive = {"plain", "cordoned", "small"}
    assert p.decide(vm(), nodes, alive, []).node == "small"


def test_no_live_agent_is_no_node_available():
    d = p.decide(vm(), [Node("a", 8 * GI), Node("b", 8 * GI, cordoned=True)], {"b"}, [])
    assert (d.node, d.reason) == (None, p.NO_NODE_AVAILABLE)
    assert "without a live agent (a)" in d.message and "cordoned (b)" in d.message


def test_no_libvirt_node_at_all_is_no_node_available():
    d = p.decide(vm(), [], set(), [])
    assert d.reason == p.NO_NODE_AVAILABLE and meta.LIBVIRT_NODE_LABEL in d.message


def test_no_room_names_the_numbers():
    nodes = [Node("a", 4 * GI), Node("b", 2 * GI)]
    placed = [vm("x", 3 * GI, node="a")]
    d = p.decide(vm(memory=3 * GI), nodes, {"a", "b"}, placed)
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_MEMORY)
    assert d.message == "the VM needs 3Gi of memory; no live node has room: b 2Gi free of 2Gi, a 1Gi free of 4Gi"


def test_memory_that_exactly_fits_is_placed():
    assert p.decide(vm(memory=2 * GI), [Node("a", 3 * GI)], {"a"}, [vm("x", GI, node="a")]).node == "a"


def test_pinned_node_must_exist():
    d = p.decide(vm(pinned="gone"), [Node("a", 8 * GI)], {"a"}, [])
    assert (d.node, d.reason) == (None, p.NODE_NOT_FOUND)
    assert "gone" in d.message


def test_pinned_node_must_have_enough_allocatable_memory():
    d = p.decide(vm(memory=16 * GI, pinned="a"), [Node("a", 8 * GI)], {"a"}, [])
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_MEMORY)
    assert d.message == "node a has 8Gi allocatable memory, the VM needs 16Gi"


def test_pinned_node_needs_no_live_agent_and_ignores_other_vms_memory():
    placed = [vm("x", 8 * GI, node="a")]
    assert p.decide(vm(pinned="a"), [Node("a", 8 * GI, libvirt=False)], set(), placed).node == "a"


def test_a_vm_is_not_counted_against_itself():
    me = vm("me", 4 * GI)
    assert p.decide(me, [Node("a", 4 * GI)], {"a"}, [vm("me", 4 * GI, node="a")]).node == "a"


def test_writable_disk_shared_on_a_node_is_avoided():
    disk = [DiskUse("/images/d.qcow2", True)]
    placed = [vm("x", GI, node="a", disks=disk)]
    nodes = [Node("a", 64 * GI), Node("b", 2 * GI)]
    assert p.decide(vm(disks=disk), nodes, {"a", "b"}, placed).node == "b"
    d = p.decide(vm(disks=disk), nodes[:1], {"a"}, placed)
    assert (d.node, d.reason) == (None, p.DISK_CONFLICT)
    assert "ns/x" in d.message
    assert p.decide(vm(disks=disk, pinned="a"), nodes, {"a"}, placed).reason == p.DISK_CONFLICT


def test_read_only_sharing_is_allowed():
    iso = DiskUse("/images/install.iso", False)
    placed = [vm("x", GI, node="a", disks=[iso])]
    assert p.decide(vm(disks=[iso]), [Node("a", 8 * GI)], {"a"}, placed).node == "a"
    writer = [DiskUse("/images/install.iso", True)]
    assert p.decide(vm(disks=writer), [Node("a", 8 * GI)], {"a"}, placed).node is None


def test_vm_ref_reads_the_wire_form():
    obj = {
        "metadata": {"uid": "u1", "namespace": "ns", "name": "web", "labels": {meta.NODE_LABEL: "n1"}},
        "spec": {"nodeName": "n1", "memory": {"size": "1536Mi"}, "disks": [
            {"name": "root", "path": "/i/root.qcow2"},
            {"name": "seed", "path": "/i/seed.iso", "device": "cdrom"},
            {"name": "ro", "path": "/i/ro.raw", "readOnly": True},
            {"name": "empty", "device": "cdrom"},
        ]},
    }
    assert p.vm_ref(obj) == VMRef("u1", "ns/web", 1536 * 2**20, (
        DiskUse("/i/root.qcow2", True), DiskUse("/i/seed.iso", False), DiskUse("/i/ro.raw", False),
    ), pinned_node="n1", node="n1")


def test_human_bytes():
    assert [p.human_bytes(n) for n in (512, 2048, 1536 * 2**20, 3 * GI, 2**40 + 2**39)] == [
        "512", "2Ki", "1.5Gi", "3Gi", "1.5Ti"]


def test_a_vm_that_may_grow_reserves_its_ceiling():
    obj = {"metadata": {"uid": "u", "namespace": "ns", "name": "grow"},
           "spec": {"memory": {"size": "1Gi", "maxSize": "4Gi"}}}
    ref = p.vm_ref(obj)
    assert ref.memory_bytes == 4 * GI
    # 3Gi free: size would fit, the ceiling does not.
    d = p.decide(ref, [Node("a", 4 * GI)], {"a"}, [vm("x", GI, node="a")])
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_MEMORY)
    assert "needs 4Gi" in d.message
    # And a placed VM that may grow counts with its ceiling against the next one.
    placed = [p.vm_ref({**obj, "metadata": {**obj["metadata"], "labels": {meta.NODE_LABEL: "a"}}})]
    assert p.used_memory(placed) == {"a": 4 * GI}
    assert p.decide(vm(memory=GI), [Node("a", 4 * GI)], {"a"}, placed).reason == p.INSUFFICIENT_MEMORY


def test_reserved_memory_without_a_ceiling_is_the_size():
    assert p.reserved_memory({"size": "512Mi"}) == 512 * 2**20
    assert p.reserved_memory({"size": "2Gi", "maxSize": "2Gi"}) == 2 * GI


def mac_vm(uid, created, macs, node=None, pinned=None):
    return VMRef(uid=uid, name=f"ns/{uid}", memory_bytes=GI, node=node, pinned_node=pinned,
                 macs=tuple(macs), created=created)


def test_a_later_vm_with_a_mac_in_use_is_not_placed():
    first = mac_vm("first", "2026-01-01T00:00:00Z", ["52:54:00:00:00:01"])
    later = mac_vm("later", "2026-01-01T00:00:05Z", ["52:54:00:00:00:09", "52:54:00:00:00:01"])
    nodes = [Node("a", 8 * GI)]
    # The earlier VM, not placed yet, is placed as if the later did not exist ...
    assert p.decide(first, nodes, {"a"}, [], [later]).node == "a"
    # ... and the later one waits, whether the earlier is placed already or not.
    d = p.decide(later, nodes, {"a"}, [], [first])
    assert (d.node, d.reason) == (None, p.MAC_IN_USE)
    assert d.message == "MAC 52:54:00:00:00:01 is already used by VM ns/first (created earlier, not placed yet)"
    placed_first = mac_vm("first", first.created, first.macs, node="a")
    d = p.decide(later, nodes, {"a"}, [placed_first])
    assert d.reason == p.MAC_IN_USE and "placed on node a" in d.message
    # Pinned VMs too.
    assert p.decide(mac_vm("later", later.created, later.macs, pinned="a"), nodes, {"a"}, [placed_first]).reason \
        == p.MAC_IN_USE


def test_a_placed_vm_holds_its_mac_even_if_created_later():
    older_unplaced = mac_vm("old", "2026-01-01T00:00:00Z", ["52:54:00:00:00:01"])
    younger_placed = mac_vm("young", "2026-01-01T00:00:09Z", ["52:54:00:00:00:01"], node="a")
    assert p.decide(older_unplaced, [Node("a", 8 * GI)], {"a"}, [younger_placed]).reason == p.MAC_IN_USE


def test_mac_ties_are_broken_by_uid_and_distinct_macs_do_not_conflict():
    a = mac_vm("a", "2026-01-01T00:00:00Z", ["52:54:00:00:00:01"])
    b = mac_vm("b", "2026-01-01T00:00:00Z", ["52:54:00:00:00:01"])
    nodes = [Node("n", 8 * GI)]
    assert p.decide(a, nodes, {"n"}, [], [b]).node == "n"
    assert p.decide(b, nodes, {"n"}, [], [a]).reason == p.MAC_IN_USE
    c = mac_vm("c", "2026-01-01T00:00:00Z", ["52:54:00:00:00:02"])
    assert p.decide(c, nodes, {"n"}, [], [a, b]).node == "n"
    assert p.decide(mac_vm("d", "", []), nodes, {"n"}, [], [a]).node == "n"  # no MAC set: generated


def test_vm_ref_reads_macs_and_creation_time():
    obj = {"metadata": {"uid": "u1", "namespace": "ns", "name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"memory": {"size": "1Gi"}, "interfaces": [
               {"name": "a", "type": "user", "mac": "52:54:00:aa:bb:cc"}, {"name": "b", "type": "user"}]}}
    ref = p.vm_ref(obj)
    assert (ref.macs, ref.created) == (("52:54:00:aa:bb:cc",), "2026-01-01T00:00:00Z")


# -- Q12: CPU reservations (percent of one host CPU) never over-reserve a node


def cpu_vm(uid="new", reserved=0, node=None, pinned=None):
    return VMRef(uid=uid, name=f"ns/{uid}", memory_bytes=GI, node=node, pinned_node=pinned, cpu_reserved=reserved)


def test_a_reservation_goes_where_the_reservations_leave_room():
    nodes = [Node("a", 16 * GI, cpu_percent=200), Node("b", 8 * GI, cpu_percent=200)]
    placed = [cpu_vm("x", 150, node="a")]  # a: most memory free, but only 50 % CPU left
    d = p.decide(cpu_vm(reserved=60), nodes, {"a", "b"}, placed)
    assert (d.node, d.reason) == ("b", p.SCHEDULED)
    assert p.decide(cpu_vm(reserved=50), nodes, {"a", "b"}, placed).node == "a"  # exactly the room left


def test_no_node_with_room_for_the_reservation_is_insufficient_cpu():
    nodes = [Node("a", 16 * GI, cpu_percent=200), Node("b", 8 * GI, cpu_percent=100)]
    placed = [cpu_vm("x", 150, node="a"), cpu_vm("y", 30, node="b"), cpu_vm("z", 30, node="b")]
    d = p.decide(cpu_vm(reserved=60), nodes, {"a", "b"}, placed)
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_CPU)
    assert "node a has 200% CPU, 150% reserved by 1 VM(s); the VM reserves 60%" in d.message
    assert "node b has 100% CPU, 60% reserved by 2 VM(s)" in d.message


def test_a_pinned_vm_whose_reservation_does_not_fit_is_insufficient_cpu():
    nodes = [Node("a", 16 * GI, cpu_percent=100)]
    placed = [cpu_vm("x", 80, node="a")]
    d = p.decide(cpu_vm(reserved=30, pinned="a"), nodes, {"a"}, placed)
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_CPU)
    assert p.decide(cpu_vm(reserved=20, pinned="a"), nodes, {"a"}, placed).node == "a"


def test_without_a_reservation_or_a_known_cpu_count_cpu_does_not_count():
    full = [cpu_vm("x", 200, node="a")]
    assert p.decide(cpu_vm(), [Node("a", 16 * GI, cpu_percent=200)], {"a"}, full).node == "a"
    assert p.decide(cpu_vm(reserved=50), [Node("a", 16 * GI)], {"a"}, full).node == "a"


def test_a_placed_vm_does_not_count_against_itself():
    nodes = [Node("a", 16 * GI, cpu_percent=100)]
    me = cpu_vm("me", 80, node="a", pinned="a")
    assert p.decide_in(me, nodes, {"a"}, p.ListView([me])).node == "a"


def test_the_reservation_comes_from_status_qos_else_the_own_spec():
    def body(spec_qos=None, status_qos=None):
        return {"metadata": {"uid": "u", "namespace": "ns", "name": "v"},
                "spec": {"memory": {"size": "1Gi"}, **({"qos": spec_qos} if spec_qos else {})},
                "status": {"qos": status_qos} if status_qos else {}}

    resolved = {"valid": True, "cpu": {"reservationPercent": {"value": 70, "source": "policy/gold"}}}
    assert p.vm_ref(body(status_qos=resolved)).cpu_reserved == 70
    assert p.vm_ref(body({"cpu": {"reservationPercent": 40}})).cpu_reserved == 40  # not resolved yet
    assert p.vm_ref(body({"cpu": {"reservationPercent": 40}}, {"valid": False, "reason": "ExceedsVM"})).cpu_reserved \
        == 0  # invalid: the agent applies none of it
    assert p.vm_ref(body()).cpu_reserved == 0


def test_q7_placement_reserves_the_memory_ceiling():
    d = p.decide(VMRef("new", "ns/new", p.reserved_memory({"size": "1Gi", "maxSize": "6Gi"})),
                 [Node("a", 4 * GI)], {"a"}, [])
    assert (d.node, d.reason) == (None, p.INSUFFICIENT_MEMORY) and "needs 6Gi" in d.message


def test_the_node_cpu_count_is_allocatable_else_capacity():
    from kubernetes import client

    from libvirt_operator.controller.cluster import cpu_percent

    def node(allocatable=None, capacity=None):
        return client.V1Node(metadata=client.V1ObjectMeta(name="n"),
                             status=client.V1NodeStatus(allocatable=allocatable, capacity=capacity))

    assert cpu_percent(node({"cpu": "2"}, {"cpu": "4"})) == 200
    assert cpu_percent(node({"cpu": "1500m"})) == 150
    assert cpu_percent(node(None, {"cpu": "8"})) == 800
    assert cpu_percent(node({"memory": "1Gi"})) is None


def test_recorded_chains_count_in_the_disk_conflict():
    # web runs on a snapshot leaf over its spec file: it writes the leaf and only reads the spec file
    web = {"metadata": {"uid": "u1", "namespace": "ns", "name": "web", "labels": {meta.NODE_LABEL: "a"}},
           "spec": {"memory": {"size": "1Gi"}, "disks": [{"name": "root", "path": "/i/root.qcow2"},
                                                          {"name": "ro", "path": "/i/ro.raw", "readOnly": True}]},
           "status": {"disks": [
               {"name": "root", "device": "disk", "path": "/i/root.s1.qcow2", "backingChain": ["/i/root.qcow2"]},
               {"name": "ro", "device": "disk", "path": "/i/ro.raw", "backingChain": []}]}}
    ref = p.vm_ref(web)
    assert ref.disks == (DiskUse("/i/root.qcow2", False), DiskUse("/i/ro.raw", False),
                         DiskUse("/i/root.s1.qcow2", True))
    nodes = [Node("a", 8 * GI)]
    # another VM writing the leaf (not in web's spec) conflicts; reading the backing file does not
    assert p.decide(vm("x", disks=[DiskUse("/i/root.s1.qcow2", True)]), nodes, {"a"}, [ref]).reason == p.DISK_CONFLICT
    assert p.decide(vm("y", disks=[DiskUse("/i/root.qcow2", False)]), nodes, {"a"}, [ref]).node == "a"
    assert p.decide(vm("z", disks=[DiskUse("/i/root.qcow2", True)]), nodes, {"a"}, [ref]).reason == p.DISK_CONFLICT
