"""Install the operator into a running local world: CRDs, namespace, Nodes, controller, agents."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
from kubernetes import client

from localenv.controlplane import ControlPlane
from localenv.guest import GuestImage
from localenv.kubenodes import register_node
from localenv.nodes import LibvirtNode
from localenv.operator import NAMESPACE, OperatorProcesses

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    control_plane: ControlPlane
    nodes: list[LibvirtNode]
    operator: OperatorProcesses
    storage_dir: Path
    image: GuestImage  # copies of the guest kernel + initrd inside the storage root

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.control_plane.bin_dir / "kubectl"),
                               "--kubeconfig", str(self.control_plane.kubeconfig), *args],
                              capture_output=True, text=True, check=check, input=input)

    def node(self, name: str) -> LibvirtNode:
        return next(n for n in self.nodes if n.name == name)


def install_crds(cp: ControlPlane) -> None:
    kubectl = [str(cp.bin_dir / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True,
                   capture_output=True, text=True)
    wait_established(kubectl, REPO / "crds")


def wait_established(kubectl: list[str], path) -> None:
    """kubectl wait for the CRDs in `path` to be Established; again while a just-applied CRD has no
    status.conditions yet (kubectl errors out then instead of waiting)."""
    for _ in range(50):
        waited = subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(path)],
                                capture_output=True, text=True)
        if waited.returncode == 0 or "accessor error" not in waited.stderr:
            break
        time.sleep(0.2)
    waited.check_returncode()


def ensure_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise


def register_libvirt_nodes(api: client.ApiClient, nodes: list[LibvirtNode]) -> None:
    for node in nodes:
        conn = libvirt.open(node.uri)
        try:
            _model, memory_mib, cpus, *_ = conn.getInfo()
        finally:
            conn.close()
        register_node(api, node.name, memory_bytes=memory_mib * 2**20, cpus=cpus)


def stage_image(image: GuestImage, storage_dir: Path) -> GuestImage:
    """Copy the guest kernel + initrd under the storage root, where VMs may reference them."""
    dest = storage_dir / "images"
    dest.mkdir(parents=True, exist_ok=True)
    for src in (image.kernel, image.initrd):
        target = dest / src.name
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            shutil.copy2(src, target)
    return GuestImage(dest / image.kernel.name, dest / image.initrd.name, image.cmdline, image.ready_marker)


def install(cp: ControlPlane, nodes: list[LibvirtNode], storage_dir: Path, image: GuestImage,
            world_dir: Path) -> Cluster:
    install_crds(cp)
    with cp.api_client() as api:
        ensure_namespace(api, NAMESPACE)
        register_libvirt_nodes(api, nodes)
    ops = OperatorProcesses(world_dir)
    ops.start_controller(cp.kubeconfig)
    for node in nodes:
        ops.start_node_agent(node, cp.kubeconfig, storage_dir)
    return Cluster(cp, nodes, ops, storage_dir, stage_image(image, storage_dir))
