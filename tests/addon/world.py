"""The add-on world: the chart installed into a real control plane, its identities running the real operator.

The add-on world is separate from the session's (`cluster` fixture): its own control plane
(with an audit log of what the operator's ServiceAccounts call) and its own two libvirt
nodes. The session's controller is cluster-wide and would place this package's VMs too if
both shared an API server; separate libvirt nodes keep both agents' recoveries apart.

Nothing runs Pods here (no scheduler, no kubelet): `helm install` creates the Deployment and
DaemonSet objects, and the controller and agents run as local processes with exactly the
chart's ServiceAccounts, through tokens minted by localenv.identities (an agent's token is
bound to a placeholder Pod on its node, as a DaemonSet Pod's projected token would be).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config

from localenv import identities
from localenv.cluster import register_libvirt_nodes, stage_image
from localenv.controlplane import REPO_DIR, ControlPlane, expected_bin_dir, require_binaries
from localenv.guest import GuestImage, ensure_guest_image
from localenv.nodes import LibvirtNode, start_nodes, stop_nodes
from localenv.operator import OperatorProcesses

CHART = REPO_DIR / "charts" / "libvirt-operator"
RELEASE = "libvirt-operator"
NAMESPACE = "libvirt-operator-system"
CONTROLLER_SA = f"{RELEASE}-controller"
AGENT_SA = f"{RELEASE}-agent"
NODE_NAMES = ["node-a", "node-b"]

AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:{NAMESPACE}"]
  - level: None
"""


class AuditedControlPlane(ControlPlane):
    """The local control plane, plus an audit log of requests by the operator namespace's ServiceAccounts."""

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    def _apiserver_args(self) -> list[str]:
        policy = self.dir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [*super()._apiserver_args(), f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking"]

    def audit_events(self) -> list[dict]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]


def helm(cp: ControlPlane, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    done = subprocess.run([str(cp.bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


@dataclass
class AddonWorld:
    dir: Path
    cp: AuditedControlPlane
    api: client.ApiClient  # admin
    nodes: list[LibvirtNode]
    operator: OperatorProcesses
    image: GuestImage
    kubeconfigs: dict[str, Path]  # "controller", "agent-node-a", ...: the processes' identities
    install_seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return helm(self.cp, self.dir / "helm", *args, check=check)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.cp.bin_dir / "kubectl"), "--kubeconfig", str(self.cp.kubeconfig), *args],
                              capture_output=True, text=True, input=input, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done

    def client_for(self, kubeconfig: Path) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(kubeconfig))

    def mint(self, name: str, service_account: str, node: str | None = None) -> Path:
        """A fresh kubeconfig for one of the chart's ServiceAccounts (not one the processes use)."""
        return identities.service_account_kubeconfig(self.api, self.dir / "identities" / f"{name}.kubeconfig",
                                                      NAMESPACE, service_account, node=node)

    def process_token_ids(self) -> dict[str, str]:
        """credential-id (as audit events carry it) -> process name, for the processes' tokens."""
        return {f"JTI={identities.token_claims(identities.kubeconfig_token(kc))['jti']}": name
                for name, kc in self.kubeconfigs.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{ref.log_tail(25)}" for name, ref in self.operator.processes.items())


@contextlib.contextmanager
def addon_world() -> Iterator[AddonWorld]:
    """Start the world (about 6 s); stop and delete it on exit (kept with LVO_KEEP_WORLD)."""
    require_binaries(expected_bin_dir())
    image = ensure_guest_image()
    world = Path(tempfile.mkdtemp(prefix="lvo-addon-", dir="/var/tmp"))
    os.chmod(world, 0o755)
    timings: dict[str, float] = {}
    cp = ops = api = None
    nodes: list[LibvirtNode] = []
    try:
        began = time.monotonic()
        cp = AuditedControlPlane(world).start()
        timings["control plane"] = time.monotonic() - began

        began = time.monotonic()
        helm(cp, world / "helm", "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace")
        install_seconds = time.monotonic() - began

        began = time.monotonic()
        nodes = start_nodes(world, NODE_NAMES)
        api = cp.api_client()
        register_libvirt_nodes(api, nodes)
        timings["libvirt nodes"] = time.monotonic() - began

        began = time.monotonic()
        ids = world / "identities"
        kubeconfigs = {"controller": identities.service_account_kubeconfig(
            api, ids / "controller.kubeconfig", NAMESPACE, CONTROLLER_SA)}
        for node in nodes:
            kubeconfigs[f"agent-{node.name}"] = identities.service_account_kubeconfig(
                api, ids / f"agent-{node.name}.kubeconfig", NAMESPACE, AGENT_SA, node=node.name)
        storage = world / "storage"
        ops = OperatorProcesses(world)
        ops.start_controller(kubeconfigs["controller"], NAMESPACE)
        for node in nodes:
            ops.start_agent(node.name, node.uri, kubeconfigs[f"agent-{node.name}"], [storage], storage / "console",
                            NAMESPACE)
        timings["identities + processes"] = time.monotonic() - began

        yield AddonWorld(world, cp, api, nodes, ops, stage_image(image, storage), kubeconfigs, install_seconds,
                         timings)
        shown = {"helm install": install_seconds, **timings}
        print("\naddon world: " + ", ".join(f"{what} {seconds:.2f}s" for what, seconds in shown.items()))
    finally:
        if ops:
            ops.stop()
        if api:
            api.close()
        if nodes:
            stop_nodes(world)
        if cp:
            cp.stop()
        if not os.environ.get("LVO_KEEP_WORLD"):
            shutil.rmtree(world, ignore_errors=True)
