"""Blocking reads and writes behind placement (run them in threads)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta, quantity
from libvirt_operator.controller.placement import Node, VMRef, vm_ref
from libvirt_operator.kube import leases, resources
from libvirt_operator.kube.client import coordination, core, custom_objects

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    nodes: list[Node]
    alive: set[str]
    read_at: float = 0.0  # monotonic time the reading started


def read(pinned_node: str | None, operator_namespace: str) -> Snapshot:
    """The nodes a VM could go to (just its pinned node, if any) and the live agents."""
    began = time.monotonic()
    if pinned_node:
        nodes = [n for n in [_get_node(pinned_node)] if n is not None]
    else:
        nodes = [node_of(n) for n in core().list_node(label_selector=f"{meta.LIBVIRT_NODE_LABEL}=true").items]
    return Snapshot(nodes, leases.alive_nodes(operator_namespace), began)


def warm_up() -> None:
    """Import the API modules placement uses (the client library loads each on first use)."""
    core(), custom_objects(), coordination()


LIST_PAGE = 500  # objects per page: a large cluster is never held in memory all at once


def list_vms() -> tuple[list[VMRef], float]:
    """Every VM of every namespace as placement sees it, and the monotonic time the listing started."""
    began = time.monotonic()
    refs: list[VMRef] = []
    token = None
    while True:
        kwargs = {"limit": LIST_PAGE, **({"_continue": token} if token else {})}
        page = custom_objects().list_cluster_custom_object(meta.GROUP, meta.VERSION, resources.VMS, **kwargs)
        refs.extend(vm_ref(vm) for vm in page.get("items", []))
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return refs, began


def node_of(node: client.V1Node) -> Node:
    labels = node.metadata.labels or {}
    memory = ((node.status and node.status.allocatable) or {}).get("memory", "0")
    try:
        allocatable = quantity.to_bytes(memory)
    except ValueError:
        log.warning("node %s: unreadable allocatable memory %r, counting 0", node.metadata.name, memory)
        allocatable = 0
    return Node(
        name=node.metadata.name,
        allocatable_bytes=allocatable,
        libvirt=labels.get(meta.LIBVIRT_NODE_LABEL) == "true",
        cordoned=bool(node.spec and node.spec.unschedulable),
        cpu_percent=cpu_percent(node),
    )


def cpu_percent(node: client.V1Node) -> int | None:
    """The node's CPUs x 100 (allocatable, else capacity; "2" or "1500m"), None when it says neither."""
    status = node.status
    for amounts in ((status and status.allocatable) or {}, (status and status.capacity) or {}):
        value = str(amounts.get("cpu") or "")
        try:
            return int(value[:-1]) // 10 if value.endswith("m") else round(float(value) * 100)
        except ValueError:
            continue
    return None


def _get_node(name: str) -> Node | None:
    try:
        return node_of(core().read_node(name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def label_node(namespace: str, name: str, node: str, resource_version: str) -> dict:
    """Record the placement; fails with 409 if the VM changed since it was read."""
    patch = {"metadata": {"labels": {meta.NODE_LABEL: node}, "resourceVersion": resource_version}}
    return resources.merge_patch(resources.VMS, namespace, name, patch)
