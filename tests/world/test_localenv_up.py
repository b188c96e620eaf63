"""`python -m localenv up` on a world that is partly down starts only what is missing.

A world of its own (the command line's, in a temporary directory): up with the sample VM
running, one node's libvirtd killed, up again. The healthy node keeps its QEMU, the
controller and agents keep running (same PIDs), the dead node is back at the same URI.
Then the VM's own node loses its libvirtd: up again, and its QEMU is re-adopted, same PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from localenv import procs
from localenv.controlplane import REPO_DIR
from localenv.nodes import LibvirtNode, load_nodes
from localenv.operator import OperatorProcesses

pytestmark = pytest.mark.world


def localenv(world: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "localenv", *args, "--world", str(world)], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"localenv {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def qemu_pids(node: LibvirtNode) -> set[int]:
    return {pid for pid in node.processes() if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")}


def kill_libvirtd(node: LibvirtNode) -> None:
    os.kill(node._daemon_pid("libvirtd"), signal.SIGKILL)
    procs.wait_until(lambda: not node.is_running(), f"{node.name}'s libvirtd to die", 30)


def operator_pids(world: Path) -> dict[str, int]:
    ops = OperatorProcesses.load(world)
    assert all(ref.running() for ref in ops.processes.values()), ops.processes
    return {name: ref.pid for name, ref in ops.processes.items()}


@pytest.fixture
def cli_world() -> Iterator[Path]:
    world = Path(tempfile.mkdtemp(prefix="lvo-up-", dir="/var/tmp"))
    os.chmod(world, 0o755)
    try:
        yield world
    finally:
        subprocess.run([sys.executable, "-m", "localenv", "down", "--world", str(world)], cwd=REPO_DIR,
                       capture_output=True, timeout=300)
        shutil.rmtree(world, ignore_errors=True)


def test_up_again_starts_only_what_is_dead(cli_world: Path) -> None:
    localenv(cli_world, "up")
    nodes = {n.name: n for n in load_nodes(cli_world)}
    with_vm = [n for n in nodes.values() if qemu_pids(n)]
    assert len(with_vm) == 1, {n: qemu_pids(node) for n, node in nodes.items()}
    healthy = with_vm[0]
    dead = next(n for n in nodes.values() if n is not healthy)
    qemus_before = qemu_pids(healthy)
    operator_before = operator_pids(cli_world)
    assert set(operator_before) == {"controller", "agent-node-a", "agent-node-b"}
    libvirtd_before = dead._daemon_pid("libvirtd")

    kill_libvirtd(dead)

    second = localenv(cli_world, "up")
    assert "demo exists" in second.stdout, second.stdout

    assert qemu_pids(healthy) == qemus_before
    assert operator_pids(cli_world) == operator_before
    revived = LibvirtNode.load(cli_world, dead.name)
    assert revived.is_running() and revived.uri == dead.uri
    assert revived._daemon_pid("libvirtd") != libvirtd_before
    conn = libvirt.open(revived.uri)
    try:
        assert conn.getHostname()
    finally:
        conn.close()
    status = subprocess.run([sys.executable, "-m", "localenv", "status", "--world", str(cli_world)], cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr

    # Now the node that runs the VM loses its libvirtd: up restarts libvirtd in the node's own
    # namespaces, and the new libvirtd re-adopts the QEMU that kept running (same PID, still active).
    kill_libvirtd(healthy)
    localenv(cli_world, "up")
    assert qemu_pids(healthy) == qemus_before
    assert operator_pids(cli_world) == operator_before
    conn = libvirt.open(healthy.uri)
    try:
        assert len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) == 1
    finally:
        conn.close()
