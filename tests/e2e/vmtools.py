"""Helpers for end-to-end tests: VirtualMachine objects through the real API server."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import libvirt
from kubernetes import client

from libvirt_operator.api import meta
from localenv.cluster import Cluster
from localenv.guest import guest_sh, qemu_pid, qemu_pids  # noqa: F401 (qemu_pid(s): for the tests)

NS = "default"


def manifest(cluster: Cluster, name: str, **spec) -> dict:
    img = cluster.image
    base = {
        "domainType": "qemu",
        "memory": {"size": "192Mi"},
        "boot": {"kernel": {"kernel": str(img.kernel), "initrd": str(img.initrd), "cmdline": img.cmdline}},
        "shutdown": {"mode": "acpi", "timeoutSeconds": 60},
    }
    base.update(spec)
    return {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NS}, "spec": base}


class VMs:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.api = client.CustomObjectsApi(cluster.control_plane.api_client())
        self.created: list[str] = []

    def create(self, body: dict) -> dict:
        vm = self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines",
                                                      copy.deepcopy(body))
        self.created.append(body["metadata"]["name"])
        return vm

    def delete_created(self) -> None:
        """Delete (without waiting) every VM this helper created, so guests do not pile up."""
        for name in self.created:
            try:
                self.delete(name)
            except client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise
        self.created.clear()

    def get(self, name: str) -> dict | None:
        try:
            return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", name)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", name,
                                                       {"spec": spec})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", name)

    def wait(self, name: str, check: Callable[[dict], bool], what: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        vm = None
        while time.monotonic() < deadline:
            vm = self.get(name)
            if vm is not None and check(vm):
                return vm
            time.sleep(0.2)
        raise AssertionError(f"{name}: timed out waiting for {what}; last seen:\n{_brief(vm)}")

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict:
        return self.wait(name, lambda vm: phase_of(vm) == phase, f"phase {phase}", timeout)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(name) is None:
                return
            time.sleep(0.2)
        raise AssertionError(f"{name} still exists: {_brief(self.get(name))}")

    def domain(self, vm: dict) -> libvirt.virDomain | None:
        node = self.cluster.node(vm["status"]["nodeName"])
        conn = libvirt.open(node.uri)
        try:
            return conn.lookupByUUIDString(vm["metadata"]["uid"])
        except libvirt.libvirtError:
            return None

    def console(self, vm: dict) -> str:
        path = self.cluster.storage_dir / "console" / f"{NS}_{vm['metadata']['name']}.console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def boots(self, vm: dict) -> int:
        return self.console(vm).count(self.cluster.image.ready_marker)

    def events(self, name: str) -> list[client.CoreV1Event]:
        core = client.CoreV1Api(self.cluster.control_plane.api_client())
        return core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items


def phase_of(vm: dict) -> str | None:
    return (vm.get("status") or {}).get("phase")


def condition(vm: dict, type_: str) -> dict:
    for c in (vm.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


def _brief(vm: dict | None) -> str:
    if vm is None:
        return "(absent)"
    return str({"labels": vm["metadata"].get("labels"), "status": vm.get("status")})


# -- proofs from inside the guest and from the host -------------------------------------------------

def guest_run(dom: libvirt.virDomain, command: str, timeout: float = 30) -> str:
    """stdout of `sh -c command` in the guest (qemu-ga guest-exec); AssertionError when it fails."""
    return guest_sh(dom, command, timeout)


def wait_guest(dom: libvirt.virDomain, command: str, check: Callable[[str], bool], what: str,
               timeout: float = 60) -> str:
    """Runs `command` in the guest until `check(stdout)` holds (a failing run counts as not yet)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        try:
            out = guest_run(dom, command)
        except (AssertionError, libvirt.libvirtError, KeyError) as exc:
            out = f"<{exc}>"
        if check(out):
            return out
        time.sleep(0.3)
    raise AssertionError(f"guest: timed out waiting for {what}; last output of {command!r}: {out!r}")


# -- where a VM runs: QEMU processes and libvirt definitions per node (for migrations) -------------

def domain_state(node, uuid: str) -> str:
    """'absent', or 'running'/'paused'/'shutoff'/... plus '+persistent' or '+transient', of domain `uuid`
    as node's libvirtd sees it."""
    conn = libvirt.open(node.uri)
    try:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "absent"
            raise
        names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                 libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}
        state = names.get(dom.state()[0], f"state-{dom.state()[0]}")
        return f"{state}+{'persistent' if dom.isPersistent() else 'transient'}"
    finally:
        conn.close()


def placement_facts(cluster: Cluster, uuid: str) -> dict:
    """Each node's libvirt view of the domain, and which node owns each of its QEMU processes."""
    pids = qemu_pids(uuid)
    return {"domains": {n.name: domain_state(n, uuid) for n in cluster.nodes},
            "qemu": {pid: [n.name for n in cluster.nodes if n._owns(pid)] for pid in pids}}


def wait_runs_only_on(cluster: Cluster, uuid: str, node: str, timeout: float = 90) -> int:
    """Waits until domain `uuid` runs (persistent) on `node` alone: exactly one QEMU on the machine, owned by
    that node, and no definition (persistent or transient) on any other node. Returns the QEMU pid."""
    want = {n.name: ("running+persistent" if n.name == node else "absent") for n in cluster.nodes}
    deadline = time.monotonic() + timeout
    while True:
        facts = placement_facts(cluster, uuid)
        if facts["domains"] == want and list(facts["qemu"].values()) == [[node]]:
            return next(iter(facts["qemu"]))
        if time.monotonic() > deadline:
            raise AssertionError(f"domain {uuid} does not run on {node} alone: {facts}")
        time.sleep(0.3)


class CustomObjects:
    """One kind of ours in the test namespace: create, get, delete, and the ones a test made."""

    kind = plural = ""

    def __init__(self, cluster):
        self.api = client.CustomObjectsApi(cluster.control_plane.api_client())
        self.created: list[str] = []

    def create(self, name: str, vm: str, **spec) -> dict:
        body = {"apiVersion": meta.API_VERSION, "kind": self.kind, "metadata": {"name": name, "namespace": NS},
                "spec": {"vmName": vm, **spec}}
        self.created.append(name)
        return self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, self.plural, body)

    def get(self, name: str) -> dict | None:
        try:
            return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, self.plural, name)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, self.plural, name)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
