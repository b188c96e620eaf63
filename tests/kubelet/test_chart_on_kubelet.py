"""The chart for real: helm install on a kubelet node, Pods in containerd, a VM on the node's libvirtd.

The tests run in order on one release (see conftest.py for the world); each leaves the release
installed and the VM `demo` running for the next, until the uninstall at the end.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import libvirt
import pytest
import yaml
from kubernetes import client

from libvirt_operator.api import meta
from localenv import kubelet
from localenv.controlplane import REPO_DIR
from tests.kubelet.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    KubeletLane,
    pod_ready,
    seconds_to_ready,
    wait_for,
)

pytestmark = pytest.mark.world

MANIFEST = REPO_DIR / "manifests" / "libvirt-operator.yaml"


# --- helpers ------------------------------------------------------------------------------------


def ready_pods(lane: KubeletLane, component: str, image: str | None = None) -> list[client.V1Pod]:
    pods = [p for p in lane.pods(component) if p.metadata.deletion_timestamp is None]
    if not pods or not all(pod_ready(p) for p in pods):
        return []
    if image is not None and any(p.spec.containers[0].image != image for p in pods):
        return []
    return pods


def container_task(lane: KubeletLane, pod: client.V1Pod, container: str) -> tuple[str, int]:
    """(containerd task id, host PID) of a running container of the Pod, as containerd itself reports it."""
    status = next(s for s in pod.status.container_statuses if s.name == container)
    assert status.container_id.startswith("containerd://"), status.container_id
    cid = status.container_id.removeprefix("containerd://")
    rows = [line.split() for line in lane.cluster.kubelet.ctr("tasks", "ls").stdout.splitlines()[1:]]
    task = {row[0]: row for row in rows}.get(cid)
    assert task is not None and task[2] == "RUNNING", f"containerd has no running task {cid}: {rows}"
    return cid, int(task[1])


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def process_tree_args(pid: int) -> str:
    """The command lines of the process and its children (tini is PID 1 of the container)."""
    args = [" ".join(cmdline(pid))]
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    args += [" ".join(cmdline(int(c))) for c in children]
    return " | ".join(args)


def qemu_pids(lane: KubeletLane) -> set[int]:
    return {pid for pid in lane.node.processes() if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")}


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def phase(vm: dict) -> str | None:
    return (vm.get("status") or {}).get("phase")


def vm_ready(vm: dict) -> bool:
    conditions = (vm.get("status") or {}).get("conditions") or []
    return phase(vm) == "Running" and any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def active_domains(lane: KubeletLane) -> list[str]:
    conn = libvirt.open(lane.node.uri)
    try:
        return sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    finally:
        conn.close()


# --- the tests, in order ------------------------------------------------------------------------


def test_helm_install_runs_the_pods_in_containerd_and_a_vm_on_the_node(lane: KubeletLane):
    lane.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace", "-f", str(lane.values))
    images = lane.cluster.images
    controller = wait_for(lane, lambda: ready_pods(lane, "controller", images.ref("controller")),
                          "Ready controller Pod")
    agent = wait_for(lane, lambda: ready_pods(lane, "agent", images.ref("agent")), "Ready agent Pod")
    assert [p.spec.node_name for p in agent] == [kubelet.NODE_NAME]
    lane.timings["controller Pod start-to-Ready"] = seconds_to_ready(controller[0])
    lane.timings["agent Pod start-to-Ready"] = seconds_to_ready(agent[0])

    # Really containers of this containerd: the task's process runs the component under tini.
    _, controller_pid = container_task(lane, controller[0], "controller")
    assert "libvirt-operator-controller" in process_tree_args(controller_pid)
    _, agent_pid = container_task(lane, agent[0], "agent")
    assert "libvirt-operator-agent" in process_tree_args(agent_pid)

    lane.kubectl("apply", "-f", "-", input=lane.sample_manifest())
    vm = wait_for(lane, lambda: (v := lane.vm("demo")) and vm_ready(v) and v, "demo Running and Ready")
    assert vm["status"]["nodeName"] == kubelet.NODE_NAME
    # The VM's QEMU runs in the node's libvirt (its namespaces, reaped by the node's subreaper,
    # which started libvirtd) and is the domain the agent created.
    (qemu,) = qemu_pids(lane)
    assert parent(qemu) == lane.node._daemon_pid("subreaper") or parent(qemu) in lane.node.processes()
    assert vm["status"]["domain"]["name"] in active_domains(lane)
    assert vm["metadata"]["uid"] in " ".join(cmdline(qemu))


def test_helm_upgrade_to_a_new_tag_rolls_both_and_keeps_the_vm(lane: KubeletLane):
    images = lane.cluster.images
    qemus = qemu_pids(lane)
    old = {c: {p.metadata.uid for p in lane.pods(c)} for c in ("controller", "agent")}
    new_tags = {c: f"{images.key}-{c}-v2" for c in ("controller", "agent")}
    for c, tag in new_tags.items():
        lane.cluster.kubelet.ctr("images", "tag", "--force", images.ref(c), f"{kubelet.IMAGE_REPOSITORY}:{tag}")
    lane.helm("upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(lane.values),
              "--set", f"controller.image.tag={new_tags['controller']}",
              "--set", f"agent.image.tag={new_tags['agent']}")
    for c, tag in new_tags.items():
        pods = wait_for(lane, lambda c=c, tag=tag: ready_pods(lane, c, f"{kubelet.IMAGE_REPOSITORY}:{tag}"),
                        f"the {c} rolled to {tag}")
        assert not {p.metadata.uid for p in pods} & old[c]
    assert qemu_pids(lane) == qemus
    assert vm_ready(lane.vm("demo"))


def test_a_deleted_agent_pod_is_recreated_and_readopts_the_vm(lane: KubeletLane):
    qemus = qemu_pids(lane)
    (agent,) = ready_pods(lane, "agent")
    client.CoreV1Api(lane.api).delete_namespaced_pod(agent.metadata.name, NAMESPACE)
    (new,) = wait_for(lane, lambda: [p for p in ready_pods(lane, "agent") if p.metadata.uid != agent.metadata.uid],
                      "a new Ready agent Pod")
    container_task(lane, new, "agent")
    assert qemu_pids(lane) == qemus
    # The new agent manages the running domain: it pauses and resumes it (same QEMU throughout).
    api = client.CustomObjectsApi(lane.api)
    for state, want in (("Paused", "Paused"), ("Running", "Running")):
        api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines", "demo",
                                           {"spec": {"powerState": state}})
        wait_for(lane, lambda want=want: phase(lane.vm("demo")) == want, f"demo {want}")
    assert qemu_pids(lane) == qemus


def test_the_agent_goes_unready_while_libvirtd_is_down(lane: KubeletLane):
    qemus = qemu_pids(lane)
    (agent,) = ready_pods(lane, "agent")
    libvirtd = lane.node._daemon_pid("libvirtd")
    os.kill(libvirtd, signal.SIGKILL)
    wait_for(lane, lambda: not ready_pods(lane, "agent"), "the agent Pod unready", timeout=60)
    (same,) = lane.pods("agent")
    assert same.metadata.uid == agent.metadata.uid  # unready, not restarted
    assert lane.node.revive()
    (back,) = wait_for(lane, lambda: ready_pods(lane, "agent"), "the agent Pod Ready again", timeout=120)
    assert back.metadata.uid == agent.metadata.uid
    assert qemu_pids(lane) == qemus
    wait_for(lane, lambda: vm_ready(lane.vm("demo")), "demo Ready again")


def test_helm_uninstall_leaves_crds_disks_and_domains(lane: KubeletLane):
    qemus = qemu_pids(lane)
    disk_files = {lane.image.kernel, lane.image.initrd}
    domains = active_domains(lane)
    lane.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    wait_for(lane, lambda: not lane.pods("controller") and not lane.pods("agent"), "the Pods gone")
    crds = client.ApiextensionsV1Api(lane.api).list_custom_resource_definition().items
    assert {c.metadata.name for c in crds} >= {f"virtualmachines.{meta.GROUP}"}
    assert lane.vm("demo")["metadata"]["name"] == "demo"
    assert all(f.exists() for f in disk_files)
    assert active_domains(lane) == domains
    assert qemu_pids(lane) == qemus


def adapt_manifests(lane: KubeletLane, docs: list[dict]) -> list[dict]:
    """manifests/ is the chart with default values (the full image libvirt-operator:0.1.0, Pod
    network, /run/libvirt, /var/lib/libvirt/images). This world needs the adjustments its Helm
    values make: applied to the rendered workloads, as a kustomize overlay would."""
    values = yaml.safe_load(lane.values.read_text())
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "DaemonSet"):
            continue
        component = "controller" if doc["kind"] == "Deployment" else "agent"
        own = values[component]
        pod = doc["spec"]["template"]["spec"]
        pod["hostNetwork"], pod["dnsPolicy"] = True, "ClusterFirstWithHostNet"
        container = pod["containers"][0]
        ports = {"LVO_METRICS_PORT": own["metricsPort"], "LVO_HEALTH_PORT": own["healthPort"]}
        for env in container["env"]:
            if env["name"] in ports:
                env["value"] = str(ports[env["name"]])
            if env["name"] == "LVO_STORAGE_ROOTS":
                env["value"] = str(lane.cluster.storage)
        container["env"] += own["extraEnv"]
        for port in container["ports"]:
            port["containerPort"] = own["metricsPort"] if port["name"] == "metrics" else own["healthPort"]
        if component == "agent":
            for mount in container["volumeMounts"]:
                if mount["name"] == "storage-0":
                    mount["mountPath"] = str(lane.cluster.storage)
            for volume in pod["volumes"]:
                if volume["name"] == "libvirt-run":
                    volume["hostPath"]["path"] = str(lane.node.socket_dir)
                if volume["name"] == "storage-0":
                    volume["hostPath"]["path"] = str(lane.cluster.storage)
    return docs


def test_kubectl_apply_of_the_manifests_runs_the_same_and_delete_leaves_the_vm(lane: KubeletLane):
    qemus = qemu_pids(lane)
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"libvirt-operator:0.1.0"}, images
    # The default image name, as the kubelet resolves it, is the full image built here.
    lane.cluster.kubelet.import_images(lane.cluster.images, ("full",))
    lane.cluster.kubelet.ctr("images", "tag", "--force", lane.cluster.images.ref("full"),
                             "docker.io/library/libvirt-operator:0.1.0")
    manifest = yaml.safe_dump_all(adapt_manifests(lane, docs))
    lane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    wait_for(lane, lambda: ready_pods(lane, "controller", "libvirt-operator:0.1.0"), "Ready controller Pod")
    (agent,) = wait_for(lane, lambda: ready_pods(lane, "agent", "libvirt-operator:0.1.0"), "Ready agent Pod")
    _, pid = container_task(lane, agent, "agent")
    assert "libvirt-operator-agent" in process_tree_args(pid)
    api = client.CustomObjectsApi(lane.api)
    for state in ("Paused", "Running"):  # this agent manages the VM the Helm release started
        api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines", "demo",
                                           {"spec": {"powerState": state}})
        wait_for(lane, lambda state=state: phase(lane.vm("demo")) == state, f"demo {state}")
    assert qemu_pids(lane) == qemus

    # Deleting what was applied, CRDs aside (deleting a CRD deletes its objects), leaves the VM.
    rest = [d for d in docs if d["kind"] not in ("CustomResourceDefinition", "Namespace")]
    lane.kubectl("delete", "--wait", "-f", "-", input=yaml.safe_dump_all(rest))
    wait_for(lane, lambda: not lane.pods("controller") and not lane.pods("agent"), "the Pods gone")
    assert qemu_pids(lane) == qemus
    assert lane.vm("demo")["metadata"]["name"] == "demo"
