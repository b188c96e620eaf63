"""pytest plugin: the libvirt side of the local test world.

Session fixtures: ``guest_image`` (GuestImage), ``world_dir`` (fresh Path),
``storage_dir`` (``<world>/storage``, shared by all nodes) and
``libvirt_nodes`` (``[node-a, node-b]``, running LibvirtNodes). Missing
components make the fixtures error out, never skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from localenv.guest import (
    GuestImage,
    agent_ping,
    ensure_guest_image,
    guest_domain_xml,
    wait_for_marker,
    wait_for_shutoff,
)
from localenv.nodes import LibvirtNode, start_nodes, stop_nodes

__all__ = ["agent_ping", "guest_domain_xml", "wait_for_marker", "wait_for_shutoff"]  # helpers for tests

NODE_NAMES = ["node-a", "node-b"]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_guest_image()


@pytest.fixture(scope="session")
def world_dir() -> Iterator[Path]:
    """A fresh directory for this session's world; kept if LVO_KEEP_WORLD is set."""
    path = Path(tempfile.mkdtemp(prefix="lvo-world-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    if not os.environ.get("LVO_KEEP_WORLD"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def storage_dir(world_dir: Path) -> Path:
    path = world_dir / "storage"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def libvirt_nodes(world_dir: Path, storage_dir: Path) -> Iterator[list[LibvirtNode]]:
    nodes = start_nodes(world_dir, NODE_NAMES)
    yield nodes
    stop_nodes(world_dir)  # raises if any node process survives


@pytest.fixture
def start_guest(guest_image: GuestImage, storage_dir: Path, libvirt_nodes: list[LibvirtNode]):
    """Factory ``start_guest(node, name, disk=None, paused=False, nic=False) -> (virDomain, console_log)``:
    defines and starts a persistent test guest (not waiting for its marker).
    At teardown the guest is destroyed and undefined on whichever node holds it."""
    names: list[str] = []

    def start(node: LibvirtNode, name: str, disk: Path | None = None, paused: bool = False, nic: bool = False):
        console_log = storage_dir / f"{name}.console.log"
        conn = node.connect()
        dom = conn.defineXML(guest_domain_xml(guest_image, name, console_log, disk=disk, nic=nic))
        names.append(name)
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        return dom, console_log

    yield start
    for node in libvirt_nodes:
        conn = node.connect()
        for dom in conn.listAllDomains():
            if dom.name() in names:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
        conn.close()
