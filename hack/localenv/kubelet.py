"""The kubelet world: the chart's Pods on a real node.

One machine, all on 127.0.0.1, everything under one world directory:

- the local control plane plus kube-scheduler, and kube-controller-manager with every
  controller (Deployments, ReplicaSets, DaemonSets, node lifecycle...);
- containerd + runc (Debian packages) with its own root, state and socket, the CNI plugins
  (Debian) on a bridge of its own (``lvo-cni<N>``, 10.244.N.0/24), and the operator images
  (hack/build-image.sh) imported into its ``k8s.io`` namespace;
- a libvirt node (nodes.py) whose ``/run/libvirt`` is a host directory, so the agent Pod
  mounts its socket by hostPath: socket mode, the node's "own" libvirtd;
- kubelet (built by hack/build-kubelet.sh from the control plane's k8s.io/kubernetes version)
  registered as that node.

The kubelet flags this sandbox needs (a VM whose PID 1 is not systemd, cgroup v1, no swap):
``cgroupDriver: cgroupfs`` (no systemd to delegate to), ``cgroupsPerQOS: false`` and
``enforceNodeAllocatable: []`` (no kubepods QoS hierarchy: the machine's cgroups are not all
ours to divide), ``failSwapOn: false``, ``failCgroupV1: false`` (cgroup v1 is deprecated, still
supported in 1.34), the node IP and every endpoint on 127.0.0.1, and a local pause image
(``localhost/pause:lvo``, images/pause) because no registry is reachable. containerd needs
``restrict_oom_score_adj = true``: root may not lower an oom_score_adj here.

The Pods run with hostNetwork (the chart's ``*.hostNetwork``): the API server listens on
127.0.0.1 only and there is no kube-proxy for the ``kubernetes`` Service, so the components
get ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and the API server's port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from localenv import procs
from localenv.controlplane import REPO_DIR, ControlPlane, issue_client_cert, write_kubeconfig
from localenv.nodes import PRIVATE_DIRS, LibvirtNode, _free_port_blocks

NODE_NAME = "kubelet-node"
BUILD_KUBELET = REPO_DIR / "hack" / "build-kubelet.sh"
BUILD_IMAGE = REPO_DIR / "hack" / "build-image.sh"
IMAGE_REPOSITORY = "localhost/libvirt-operator"
PAUSE_IMAGE = "localhost/pause:lvo"
CNI_BIN_DIR = Path("/usr/lib/cni")
START_TIMEOUT = 120.0


def build_kubelet() -> Path:
    out = subprocess.run(["bash", str(BUILD_KUBELET)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Images:
    key: str  # the tag: a hash of the image inputs
    archives: Path  # <key>/{controller,agent,full,pause}.tar

    def ref(self, target: str) -> str:
        return f"{IMAGE_REPOSITORY}:{self.key}" if target == "full" else f"{IMAGE_REPOSITORY}:{self.key}-{target}"


def build_images() -> Images:
    out = subprocess.run(["bash", str(BUILD_IMAGE)], stdout=subprocess.PIPE, text=True, check=True)
    key, archives = out.stdout.strip().splitlines()[-1].split()
    return Images(key, Path(archives))


# --- control plane: + kube-scheduler, every controller ------------------------------------------


class FullControlPlane(ControlPlane):
    """The local control plane as a cluster with nodes needs it."""

    kubelet_bin_dir: Path | None = None

    def _kcm_args(self, kubeconfig: Path) -> list[str]:
        args = [a for a in super()._kcm_args(kubeconfig) if not a.startswith("--controllers=")]
        # Every default controller (Deployments, DaemonSets, node lifecycle, ...); no cloud here.
        return [*args, "--controllers=*", "--node-monitor-grace-period=20s"]

    def _apiserver_args(self) -> list[str]:
        # `kubectl logs/exec` reach the kubelet with the admin certificate.
        return [*super()._apiserver_args(), f"--kubelet-client-certificate={self.pki / 'admin.crt'}",
                f"--kubelet-client-key={self.pki / 'admin.key'}", "--kubelet-preferred-address-types=InternalIP"]

    def _start_processes(self, timeout: float) -> None:
        super()._start_processes(timeout)
        issue_client_cert(self.pki, "kube-scheduler", "system:kube-scheduler")
        kubeconfig = self.dir / "kube-scheduler.kubeconfig"
        write_kubeconfig(kubeconfig, self.server, self.pki, "kube-scheduler", "kube-scheduler")
        bin_dir = self.kubelet_bin_dir or build_kubelet()
        ref = procs.start_detached("kube-scheduler", [
            str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={procs.free_port()}", "--leader-elect=false",
        ], self.dir / "logs" / "kube-scheduler.log")
        self.processes["kube-scheduler"] = ref
        self._save()
        time.sleep(1)
        if not ref.running():
            raise procs.StartupError(f"kube-scheduler exited at once:\n{ref.log_tail()}")

    def is_running(self) -> bool:
        return super().is_running() and self.processes.get("kube-scheduler") is not None \
            and self.processes["kube-scheduler"].running()

    def stop(self, purge: bool = False) -> None:
        if "kube-scheduler" in self.processes:
            procs.stop(self.processes.pop("kube-scheduler"))
        super().stop(purge)


# --- the libvirt node of the kubelet ------------------------------------------------------------


class KubeletLibvirtNode(LibvirtNode):
    """A libvirt node whose /run/libvirt (the socket directory) is <state>/run on the host."""

    private_dirs = {**PRIVATE_DIRS, "run": "/run/libvirt"}

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "run"


# --- containerd + kubelet -----------------------------------------------------------------------


def _containerd_config(d: Path, cni_conf_dir: Path) -> str:
    return f"""\
version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
[grpc]
  address = "{d / 'containerd.sock'}"
[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"
[debug]
  address = "{d / 'debug.sock'}"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Root here may not lower an oom_score_adj (no CAP_SYS_RESOURCE in this sandbox); without this,
  # runc fails every Pod sandbox with "failed to update /proc/self/oom_score_adj: Permission denied".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
"""


def _cni_config(bridge: str, subnet: str) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": bridge,  # also host-local's state directory: /var/lib/cni/networks/<name>
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _free_bridge() -> tuple[str, int]:
    """A bridge name and subnet index no other kubelet world on this machine uses."""
    for n in range(1, 200):
        name = f"lvo-cni{n}"
        if not Path(f"/sys/class/net/{name}").exists() and not Path(f"/var/lib/cni/networks/{name}").exists():
            return name, n
    raise RuntimeError("no free lvo-cni bridge name")


class KubeletWorld:
    """containerd + kubelet (+ its libvirt node) in <world>/kubelet/, against a FullControlPlane."""

    def __init__(self, world_dir: Path | str):
        self.world_dir = Path(world_dir)
        self.dir = self.world_dir / "kubelet"
        self.containerd_dir = self.dir / "containerd"
        self.processes: dict[str, procs.ProcessRef] = {}
        self.bridge = ""
        self.kubelet_port = 0
        self.images: Images | None = None

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        procs.write_json(self.state_file, {
            "processes": {n: r.to_dict() for n, r in self.processes.items()}, "bridge": self.bridge,
            "kubelet_port": self.kubelet_port,
            "images": {"key": self.images.key, "archives": str(self.images.archives)} if self.images else None})

    @classmethod
    def load(cls, world_dir: Path | str) -> KubeletWorld:
        kw = cls(world_dir)
        if kw.state_file.exists():
            state = json.loads(kw.state_file.read_text())
            kw.processes = {n: procs.ProcessRef.from_dict(r) for n, r in state["processes"].items()}
            kw.bridge, kw.kubelet_port = state["bridge"], state["kubelet_port"]
            if state.get("images"):
                kw.images = Images(state["images"]["key"], Path(state["images"]["archives"]))
        return kw

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=check, timeout=600)

    # -- containerd

    def start_containerd(self) -> procs.ProcessRef:
        ref = self.processes.get("containerd")
        if ref is not None and ref.running():
            return ref
        d = self.containerd_dir
        d.mkdir(parents=True, exist_ok=True)
        cni_conf = self.dir / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        if not self.bridge:
            self.bridge, n = _free_bridge()
            (cni_conf / "10-lvo.conflist").write_text(json.dumps(_cni_config(self.bridge, f"10.244.{n}.0/24"),
                                                                 indent=2))
        (d / "config.toml").write_text(_containerd_config(d, cni_conf))
        ref = procs.start_detached("containerd", ["containerd", "--config", str(d / "config.toml")],
                                   self.dir / "logs" / "containerd.log")
        self.processes["containerd"] = ref
        self._save()
        procs.wait_until(lambda: self.ctr("version", check=False).returncode == 0, "containerd", 60, [ref])
        return ref

    def import_images(self, images: Images, targets: tuple[str, ...] = ("controller", "agent")) -> None:
        present = set(self.ctr("images", "list", "-q").stdout.split())
        for target, ref in [("pause", PAUSE_IMAGE), *((t, images.ref(t)) for t in targets)]:
            if ref not in present:
                self.ctr("images", "import", str(images.archives / f"{target}.tar"))
        self.images = images
        self._save()

    # -- kubelet

    def start_kubelet(self, cp: ControlPlane, bin_dir: Path, node: KubeletLibvirtNode) -> procs.ProcessRef:
        ref = self.processes.get("kubelet")
        if ref is not None and ref.running():
            return ref
        d = self.dir / "kubelet"
        for sub in ("root", "certs", "pod-logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        name = f"kubelet-{NODE_NAME}"
        issue_client_cert(cp.pki, name, f"system:node:{NODE_NAME}", ("system:nodes",))
        kubeconfig = d / "kubelet.kubeconfig"
        write_kubeconfig(kubeconfig, cp.server, cp.pki, name, f"system:node:{NODE_NAME}")
        self.kubelet_port = self.kubelet_port or procs.free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(cp.pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "failCgroupV1": False,
            "podLogsDir": str(d / "pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            "registerNode": True,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "localStorageCapacityIsolation": False,
            "makeIPTablesUtilChains": False,
            "protectKernelDefaults": False,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        argv = [
            str(bin_dir / "kubelet"), f"--config={d / 'config.yaml'}", f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}", "--node-ip=127.0.0.1", f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'certs'}", "--node-labels=virt.libvirt-operator.io/libvirt-node=true", "--v=2",
        ]
        ref = procs.start_detached("kubelet", argv, self.dir / "logs" / "kubelet.log")
        self.processes["kubelet"] = ref
        self._save()
        return ref

    def stop(self) -> None:
        """kubelet first (nothing restarts containers then), every container, containerd, leftovers."""
        ref = self.processes.get("kubelet")
        if ref is not None:
            procs.stop(ref)
        containerd = self.processes.get("containerd")
        if containerd is not None and containerd.running():
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
            for task in tasks:
                for _ in range(50):
                    if self.ctr("tasks", "delete", task, check=False).returncode == 0:
                        break
                    time.sleep(0.1)
            procs.stop(containerd)
        # Shims outlive containerd: stop what is left of this world's.
        for pid in _shims_of(self.containerd_dir):
            procs.stop(procs.ProcessRef("shim", pid, _start_ticks(pid), ""), timeout=5)
        self._unmount_all()
        if self.bridge:
            if Path(f"/sys/class/net/{self.bridge}").exists():
                subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
            shutil.rmtree(f"/var/lib/cni/networks/{self.bridge}", ignore_errors=True)
        self._save()

    def _unmount_all(self) -> None:
        """Unmount what containerd and kubelet mounted under the world (rootfs overlays, volumes, netns)."""
        prefix = str(self.dir.resolve()) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mp in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)


def _shims_of(containerd_dir: Path) -> list[int]:
    """containerd-shim processes started for this containerd (their command line names its address)."""
    needle = str(containerd_dir / "containerd.sock").encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"/usr/bin/containerd-shim") and needle in cmdline:
            pids.append(int(p.name))
    return pids


def _start_ticks(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(raw[raw.rindex(")") + 2:].split()[19])


def wait_node_ready(api, name: str = NODE_NAME, timeout: float = START_TIMEOUT, watch=()) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api)

    def ready() -> bool:
        try:
            node = core.read_node(name)
        except ApiException:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))

    procs.wait_until(ready, f"node {name} Ready", timeout, watch, interval=0.5)


def chart_values(cp: ControlPlane, images: Images, node: KubeletLibvirtNode, storage: Path) -> dict:
    """Helm values for the kubelet world: slim images, host network, the node's socket dir."""
    api_env = [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
               {"name": "KUBERNETES_SERVICE_PORT", "value": str(cp.ports["kube-apiserver"])}]
    ports = {p: procs.free_port() for p in ("cm", "ch", "am", "ah")}
    return {
        "image": {"repository": IMAGE_REPOSITORY, "tag": images.key, "pullPolicy": "Never"},
        "controller": {"image": {"tag": f"{images.key}-controller"}, "hostNetwork": True, "extraEnv": api_env,
                       "metricsPort": ports["cm"], "healthPort": ports["ch"]},
        "agent": {"image": {"tag": f"{images.key}-agent"}, "hostNetwork": True, "extraEnv": api_env,
                  "metricsPort": ports["am"], "healthPort": ports["ah"],
                  "libvirt": {"mode": "socket", "socketDir": str(node.socket_dir)},
                  "storageRoots": [str(storage)], "consoleLogDir": str(storage / "console")},
    }


@dataclass
class KubeletCluster:
    world_dir: Path
    cp: FullControlPlane
    kubelet: KubeletWorld
    node: KubeletLibvirtNode
    images: Images
    storage: Path


def up(world_dir: Path) -> KubeletCluster:
    """Start (or find running) every part of the kubelet world; returns it."""
    world_dir.mkdir(parents=True, exist_ok=True)
    kubelet_bin = build_kubelet()
    images = build_images()
    try:
        cp = FullControlPlane.load(world_dir)
    except FileNotFoundError:
        cp = None
    if cp is None or not cp.healthy():
        if cp is not None:
            cp.stop()
        cp = FullControlPlane(world_dir)
        cp.kubelet_bin_dir = kubelet_bin
        cp.start()
    storage = world_dir / "storage"
    (storage / "console").mkdir(parents=True, exist_ok=True)  # the agent's consoleLogDir (virtlogd writes there)
    os.chmod(storage, 0o755)
    try:
        node = KubeletLibvirtNode.load(world_dir, NODE_NAME)
    except FileNotFoundError:
        node = KubeletLibvirtNode(name=NODE_NAME, world_dir=world_dir, port=_free_port_blocks(1)[0],
                                  host_uuid=str(uuid.uuid4()))
    if not node.is_running() and not node.revive():
        node.stop()
        node.start()
    kw = KubeletWorld.load(world_dir)
    containerd = kw.start_containerd()
    kw.import_images(images)
    kubelet = kw.start_kubelet(cp, kubelet_bin, node)
    with cp.api_client() as api:
        wait_node_ready(api, watch=[containerd, kubelet])
    return KubeletCluster(world_dir, cp, kw, node, images, storage)


def down(world_dir: Path) -> None:
    KubeletWorld.load(world_dir).stop()
    with contextlib.suppress(FileNotFoundError):
        KubeletLibvirtNode.load(world_dir, NODE_NAME).stop()
    with contextlib.suppress(FileNotFoundError):
        FullControlPlane.load(world_dir).stop()
