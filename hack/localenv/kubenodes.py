"""Node objects for the local world, which has no kubelet.

A libvirt node of the test world shows up in Kubernetes as a Node registered
here: labels, capacity/allocatable and a Ready condition, as a kubelet would
report them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api.meta import LIBVIRT_NODE_LABEL

# Added by the TaintNodesByCondition admission plugin at creation; a kubelet's
# Ready report would make the node-lifecycle controller remove it.
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
MAX_PODS = "110"


def register_node(
    api_client: client.ApiClient,
    name: str,
    memory_bytes: int,
    cpus: int,
    labels: Mapping[str, str] | None = None,
) -> client.V1Node:
    """Create or update Node `name` as Ready with the given capacity; returns the Node."""
    core = client.CoreV1Api(api_client)
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
    all_labels[LIBVIRT_NODE_LABEL] = "true"
    try:
        node = core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=all_labels)))
    except ApiException as err:
        if err.status != 409:
            raise
        node = core.patch_node(name, {"metadata": {"labels": all_labels}})

    current = (node.spec and node.spec.taints) or []
    taints = [t for t in current if t.key != NOT_READY_TAINT]
    if len(taints) != len(current):
        # Taints have no merge key: the patched list replaces the old one.
        kept = [api_client.sanitize_for_serialization(t) for t in taints] or None
        core.patch_node(name, {"spec": {"taints": kept}})

    resources = {"cpu": str(cpus), "memory": str(memory_bytes), "pods": MAX_PODS}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "LocalWorldReady",
        "message": "registered by localenv (the world has no kubelet)",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [ready],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
    }
    return core.patch_node_status(name, {"status": status})
