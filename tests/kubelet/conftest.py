"""The kubelet lane: the chart installed by helm, its Pods run by a real kubelet + containerd.

One world per package (hack/localenv/kubelet.py): control plane with scheduler, a libvirt node,
containerd, kubelet. Its prerequisites (lane packages, kubelet, images) are built by
hack/test.sh's kubelet lane or hack/kubelet-up.sh; missing ones are an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from libvirt_operator.api import meta
from localenv import kubelet
from localenv.cluster import stage_image
from localenv.controlplane import REPO_DIR
from localenv.guest import GuestImage, ensure_guest_image

CHART = REPO_DIR / "charts" / "libvirt-operator"
RELEASE = "lvo"
NAMESPACE = "libvirt-operator-system"
SAMPLE = REPO_DIR / "examples" / "vm-demo.yaml"


@dataclass
class KubeletLane:
    cluster: kubelet.KubeletCluster
    api: client.ApiClient
    image: GuestImage
    values: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cp(self):
        return self.cluster.cp

    @property
    def node(self) -> kubelet.KubeletLibvirtNode:
        return self.cluster.node

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.cp.bin_dir / "kubectl"), "--kubeconfig", str(self.cp.kubeconfig), *args],
                              capture_output=True, text=True, input=input, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        home = self.cluster.world_dir / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.cp.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
               "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        done = subprocess.run([str(self.cp.bin_dir / "helm"), *args], capture_output=True, text=True, env=env,
                              timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
        return done

    def pods(self, component: str) -> list[client.V1Pod]:
        return client.CoreV1Api(self.api).list_namespaced_pod(
            NAMESPACE, label_selector=f"app.kubernetes.io/component={component}").items

    def vm(self, name: str) -> dict:
        return client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            meta.GROUP, meta.VERSION, "default", "virtualmachines", name)

    def sample_manifest(self, name: str = "demo") -> str:
        storage = str(self.cluster.storage)
        doc = yaml.safe_load(SAMPLE.read_text().replace("@STORAGE@", storage))
        doc["metadata"]["name"] = name
        doc["spec"]["boot"]["kernel"] = {"kernel": str(self.image.kernel), "initrd": str(self.image.initrd),
                                         "cmdline": self.image.cmdline}
        return yaml.safe_dump(doc)

    def diagnostics(self) -> str:
        """Pods, recent events, the containers' logs (read from the kubelet's pod log directory:
        `kubectl logs` needs a node address, and a loopback node IP is not published) and kubelet's."""
        out = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout,
               self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]]
        kubelet_dir = self.cluster.world_dir / "kubelet"
        for log in sorted((kubelet_dir / "kubelet" / "pod-logs").glob("*/*/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-20:]
            out.append(f"--- {log.parent.parent.name}/{log.parent.name}\n" + "\n".join(lines))
        log = kubelet_dir / "logs" / "kubelet.log"
        if log.exists():
            out.append("--- kubelet.log\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(out)


def pod_ready(pod: client.V1Pod) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def wait_for(lane: KubeletLane, check: Callable[[], object], what: str, timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f}s\n{lane.diagnostics()}")
        time.sleep(0.5)


def seconds_to_ready(pod: client.V1Pod) -> float:
    ready = next(c for c in pod.status.conditions if c.type == "Ready")
    return (ready.last_transition_time - pod.status.start_time).total_seconds()


@pytest.fixture(scope="package")
def lane() -> Iterator[KubeletLane]:
    world = Path(tempfile.mkdtemp(prefix="lvo-kubelet-", dir="/var/tmp"))
    os.chmod(world, 0o755)
    api = None
    try:
        began = time.monotonic()
        cluster = kubelet.up(world)
        timings = {"kubelet world up": time.monotonic() - began}
        image = stage_image(ensure_guest_image(), cluster.storage)
        values = world / "values.yaml"
        values.write_text(yaml.safe_dump(kubelet.chart_values(cluster.cp, cluster.images, cluster.node,
                                                              cluster.storage)))
        api = cluster.cp.api_client()
        yield KubeletLane(cluster, api, image, values, timings)
        print("\nkubelet lane: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    finally:
        if api is not None:
            api.close()
        kubelet.down(world)
        if not os.environ.get("LVO_KEEP_WORLD"):
            shutil.rmtree(world, ignore_errors=True)
