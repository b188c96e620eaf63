"""Isolated libvirt nodes: separate daemons and cgroups, live migration, clean teardown."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from localenv.fixtures_libvirt import agent_ping, guest_domain_xml, wait_for_marker
from localenv.nodes import LibvirtNode, load_nodes

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 120.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def qemu_pids(node: LibvirtNode) -> list[int]:
    return [pid for pid in node.processes() if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")]


# The memory controller's hierarchy: cgroup v1 (this project's machines) or v2.
MEMORY_V1 = Path("/sys/fs/cgroup/memory").is_dir()


def memory_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if ("memory" in controllers.split(",")) if MEMORY_V1 else controllers == "":
            return path
    raise AssertionError(f"pid {pid} has no memory cgroup")


def test_nodes_are_separate_daemons(libvirt_nodes):
    node_a, node_b = libvirt_nodes
    conn_a, conn_b = node_a.connect(), node_b.connect()
    assert conn_a.getHostname() == conn_b.getHostname()  # one machine ...
    uuid_a = conn_a.getCapabilities().split("<uuid>")[1].split("</uuid>")[0]
    uuid_b = conn_b.getCapabilities().split("<uuid>")[1].split("</uuid>")[0]
    assert (uuid_a, uuid_b) == (node_a.host_uuid, node_b.host_uuid)  # ... two hosts
    assert uuid_a != uuid_b
    assert not set(node_a.processes()) & set(node_b.processes())


def test_domain_defined_on_one_node_is_invisible_on_the_other(libvirt_nodes, guest_image, storage_dir):
    node_a, node_b = libvirt_nodes
    name = unique("only-a")
    dom = node_a.connect().defineXML(guest_domain_xml(guest_image, name, storage_dir / f"{name}.log"))
    try:
        assert name not in [d.name() for d in node_b.connect().listAllDomains()]
        assert name in [d.name() for d in node_a.connect().listAllDomains()]
    finally:
        dom.undefine()


def test_same_name_and_id_on_both_nodes_get_separate_cgroups(libvirt_nodes, start_guest):
    """libvirt names a domain's cgroup machine/qemu-<id>-<name>.libvirt-qemu; two daemons
    sharing one cgroup tree would put both QEMUs in one cgroup."""
    node_a, node_b = libvirt_nodes
    name = unique("twin")
    dom_a, _ = start_guest(node_a, name, paused=True)
    dom_b, _ = start_guest(node_b, name, paused=True)
    for _ in range(50):  # each daemon numbers its domains itself: align the ids
        if dom_a.ID() == dom_b.ID():
            break
        behind = dom_a if dom_a.ID() < dom_b.ID() else dom_b
        behind.destroy()
        behind.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    assert dom_a.ID() == dom_b.ID()
    (qemu_a,), (qemu_b,) = qemu_pids(node_a), qemu_pids(node_b)
    cg_a, cg_b = memory_cgroup(qemu_a), memory_cgroup(qemu_b)
    leaf = f"/machine/qemu-{dom_a.ID()}-{name}.libvirt-qemu"
    assert cg_a.endswith(leaf) and cg_b.endswith(leaf)
    assert cg_a != cg_b
    assert node_a.cgroup_name in cg_a and node_b.cgroup_name in cg_b
    dom_a.setSchedulerParameters({"cpu_shares": 333})
    assert dom_b.schedulerParameters()["cpu_shares"] != 333
    # Inside its namespace each node sees the usual layout.
    machine = node_a.inside("/sys/fs/cgroup/memory/machine" if MEMORY_V1 else "/sys/fs/cgroup/machine")
    assert (machine / f"qemu-{dom_a.ID()}-{name}.libvirt-qemu").is_dir()


def test_live_migration_a_to_b_keeps_guest_running(libvirt_nodes, start_guest, storage_dir, guest_image):
    node_a, node_b = libvirt_nodes
    name = unique("mig")
    base, overlay = storage_dir / f"{name}-base.qcow2", storage_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)], check=True
    )
    dom, console_log = start_guest(node_a, name, disk=overlay)
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    assert agent_ping(dom) == {"return": {}}

    params = {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
    }
    # UNSAFE: the world's shared storage is a local filesystem, which libvirt 9.0
    # never treats as shared (only NFS, GFS2, Ceph, ...) and so refuses to migrate.
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        | libvirt.VIR_MIGRATE_UNSAFE
    )
    started = time.monotonic()
    dom.migrateToURI3(node_b.uri, params, flags)
    print(f"\nTIMING live migration a -> b: {time.monotonic() - started:.2f} s")

    assert name not in [d.name() for d in node_a.connect().listAllDomains()]
    moved = node_b.connect().lookupByName(name)
    assert moved.isActive() and moved.isPersistent()
    assert agent_ping(moved) == {"return": {}}
    assert qemu_pids(node_a) == []
    assert len(qemu_pids(node_b)) == 1
    assert console_log.read_text().count(guest_image.ready_marker) == 1  # migrated, not rebooted


STOP_FROM_FRESH_PROCESS = (
    "import json, sys; from localenv.nodes import stop_nodes; print(json.dumps(stop_nodes(sys.argv[1])))"
)
START_FROM_FRESH_PROCESS = "import sys; from localenv.nodes import start_nodes; start_nodes(sys.argv[1], sys.argv[2:])"


def test_nodes_outlive_their_starter_and_stop_leaves_nothing(tmp_path_factory, guest_image):
    """Start and stop run in processes of their own (like a CLI's up/down). One node's
    libvirtd is SIGKILLed first, so its QEMU must be found and killed as a straggler."""
    world = tmp_path_factory.mktemp("world")
    names = ["solo-a", "solo-b"]
    subprocess.run([sys.executable, "-c", START_FROM_FRESH_PROCESS, str(world), *names], check=True)
    nodes = load_nodes(world)
    try:
        assert [n.name for n in nodes] == names and all(n.is_running() for n in nodes)
        for node in nodes:
            conn = node.connect()
            conn.createXML(guest_domain_xml(guest_image, unique("doomed"), world / f"{node.name}.log"), 0)
            conn.close()
        healthy, crashed = nodes
        libvirtd_pid = int((crashed.state_dir / "libvirtd.pid").read_text())
        os.kill(libvirtd_pid, signal.SIGKILL)
        before = {n.name: n.processes() for n in nodes}
        orphan_qemus = qemu_pids(crashed)
        assert qemu_pids(healthy) and orphan_qemus

        stop = subprocess.run(
            [sys.executable, "-c", STOP_FROM_FRESH_PROCESS, str(world)], check=True, capture_output=True, text=True
        )

        killed = json.loads(stop.stdout)
        assert killed[healthy.name] == []  # domains destroyed through libvirt, daemons exited
        assert set(orphan_qemus) <= set(killed[crashed.name])
        for node in nodes:
            assert node.processes() == []
            assert not node.is_running()
            assert all(not _alive(pid) for pid in before[node.name])
            assert node.cgroup_dirs and all(not Path(d).exists() for d in node.cgroup_dirs)
    finally:
        for node in nodes:
            if node.processes():
                node.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
