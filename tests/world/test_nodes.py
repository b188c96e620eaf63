"""Isolated libvirt nodes: separate daemons and cgroups, live migration, prompt reaping,
clean teardown."""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from libvirt_operator.hypervisor.events import register_event_loop
from localenv.fixtures_libvirt import agent_ping, guest_domain_xml, wait_for_marker
from localenv.nodes import LibvirtNode, load_nodes, start_nodes

from .hypervisor_support import background_loop, qemu_pid

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 120.0
POWEROFFS = 3
# QEMU exit -> STOPPED event. The product needs < 2 s; libvirt polls for the exited pid every
# 200 ms, and a lazy reaper (this machine's PID 1: 1-2 s) would push it past 1 s.


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def qemu_pids(node: LibvirtNode, domain: str | None = None) -> list[int]:
    """QEMU processes of the node (of one domain if named; other tests' guests may run too)."""
    return [pid for pid in node.processes() if comm(pid).startswith("qemu-system")
            and (domain is None or f"guest={domain}," in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"))]


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def subreaper(node: LibvirtNode) -> int:
    (pid,) = subreapers(node)
    return pid


def subreapers(node: LibvirtNode) -> set[int]:
    """A node revived after its libvirtd died has a second reaper: the first still holds the old QEMUs."""
    return {pid for pid in node.processes() if comm(pid) == "lvo-subreaper"}


def exit_time(pid: int) -> Future:
    """Resolves to time.time() when `pid` exits (its pidfd turns readable then, before reaping)."""
    fd, done = os.pidfd_open(pid), Future()

    def watch():
        select.select([fd], [], [])
        done.set_result(time.time())
        os.close(fd)

    threading.Thread(target=watch, daemon=True).start()
    return done


def wait_for(value, timeout: float):
    deadline = time.monotonic() + timeout
    while (result := value()) is None:
        assert time.monotonic() < deadline, f"nothing after {timeout} s"
        time.sleep(0.01)
    return result


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
    (qemu_a,), (qemu_b,) = qemu_pids(node_a, name), qemu_pids(node_b, name)
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
    assert qemu_pids(node_a, name) == []
    assert len(qemu_pids(node_b, name)) == 1
    assert console_log.read_text().count(guest_image.ready_marker) == 1  # migrated, not rebooted


def test_guest_powering_itself_off_is_reported_stopped_at_once(libvirt_nodes, start_guest, guest_image):
    """libvirtd reports STOPPED only once the exited QEMU's pid is gone. QEMU daemonizes, so
    its zombie must go to the node's subreaper, which reaps at once, not to a lazy PID 1."""
    node = libvirt_nodes[0]
    register_event_loop(background_loop())  # before connecting: only then does libvirt send events
    conn = node.connect()
    stopped: dict[str, tuple[float, int]] = {}

    def on_lifecycle(_conn, dom, event, detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            stopped[dom.UUIDString()] = (time.time(), detail)

    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    delays = []
    try:
        for _ in range(POWEROFFS):
            name = unique("poweroff")
            dom, console_log = start_guest(node, name)
            wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
            assert agent_ping(dom) == {"return": {}}
            pid = qemu_pid(name)
            assert parent(pid) in subreapers(node)
            exited = exit_time(pid)
            # The guest powers itself off (qemu-ga runs poweroff). The agent never replies to
            # guest-shutdown, so the call ends in an error once QEMU is gone.
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-shutdown"}', 5, 0)
            at, detail = wait_for(partial(stopped.get, dom.UUIDString()), 10)
            assert detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
            delays.append(at - exited.result(10))
    finally:
        conn.domainEventDeregisterAny(callback)
        conn.close()
    # The reaping is proven by the parent above; the delay is a figure, not an assertion (no timed tests).
    print(f"\nTIMING QEMU exit -> STOPPED event: {', '.join(f'{d:.3f}' for d in delays)} s")


# Leaves a process whose main thread is a zombie while another thread runs on.
MAIN_THREAD_EXITS = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(600,)).start()
ctypes.CDLL(None).syscall(60, 0)  # exit(2), not exit_group(2): only this thread ends
"""


def test_stop_waits_for_every_thread_of_a_process(tmp_path_factory):
    """A SIGKILLed QEMU's main thread can be a zombie while its other threads are still
    exiting, and those still hold the node's cgroups: stop() must count such a process
    as alive, or removing the cgroups fails with EBUSY."""
    (node,) = start_nodes(tmp_path_factory.mktemp("threads"), ["threads"])
    libvirtd = int((node.state_dir / "libvirtd.pid").read_text())
    procs_files = [f"{d}/daemons/cgroup.procs" for d in node.cgroup_dirs]
    join_node = 'pid=$1; shift; for f in "$@"; do echo $$ >"$f"; done; exec nsenter -t $pid -m "$0" -c "$CODE"'
    proc = subprocess.Popen(
        ["sh", "-c", join_node, sys.executable, str(libvirtd), *procs_files],
        env={**os.environ, "CODE": MAIN_THREAD_EXITS},
    )
    try:
        wait_for(lambda: _state(proc.pid) == "Z" or None, 10)
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2  # the main thread is a zombie, one runs
        assert proc.pid in node.processes()
        killed = node.stop()
        assert proc.pid in killed
        assert proc.wait(10) == -signal.SIGKILL
        assert all(not Path(d).exists() for d in node.cgroup_dirs)
    finally:
        proc.kill()
        proc.wait()
        node.stop()


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
        for node in nodes:  # the starter is gone; each node's subreaper adopted its daemons
            daemons = [int((node.state_dir / f"{d}.pid").read_text()) for d in ("libvirtd", "virtlogd")]
            assert [parent(pid) for pid in daemons] == [subreaper(node)] * 2
        healthy, crashed = nodes
        libvirtd_pid = int((crashed.state_dir / "libvirtd.pid").read_text())
        os.kill(libvirtd_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{libvirtd_pid}").exists() or None, 1.0)  # reaped at once
        before = {n.name: n.processes() for n in nodes}
        orphan_qemus = qemu_pids(crashed)
        assert qemu_pids(healthy) and orphan_qemus

        stop = subprocess.run(
            [sys.executable, "-c", STOP_FROM_FRESH_PROCESS, str(world)], capture_output=True, text=True
        )
        assert stop.returncode == 0, f"stop_nodes failed:\n{stop.stderr}"

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
    return _state(pid) not in (None, "Z")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
