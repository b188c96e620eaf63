"""Agent heartbeats: one coordination.k8s.io Lease per node in the operator's namespace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.kube.client import coordination

LEASE_SECONDS = 40


def lease_name(node: str) -> str:
    return meta.AGENT_LEASE_PREFIX + node


def renew(namespace: str, node: str) -> None:
    now = datetime.now(UTC)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(name=lease_name(node), namespace=namespace,
                                     labels={meta.NODE_LABEL: node}),
        spec=client.V1LeaseSpec(holder_identity=node, lease_duration_seconds=LEASE_SECONDS, renew_time=now),
    )
    api = coordination()
    try:
        api.patch_namespaced_lease(lease_name(node), namespace,
                                   {"spec": {"holderIdentity": node, "renewTime": now.isoformat(),
                                             "leaseDurationSeconds": LEASE_SECONDS}})
    except ApiException as exc:
        if exc.status != 404:
            raise
        body.spec.acquire_time = now
        api.create_namespaced_lease(namespace, body)


def alive_nodes(namespace: str) -> set[str]:
    """Nodes whose agent renewed its lease within the lease duration."""
    now = datetime.now(UTC)
    alive = set()
    for lease in coordination().list_namespaced_lease(namespace).items:
        if not lease.metadata.name.startswith(meta.AGENT_LEASE_PREFIX) or not lease.spec.renew_time:
            continue
        duration = timedelta(seconds=lease.spec.lease_duration_seconds or LEASE_SECONDS)
        if lease.spec.renew_time + duration > now:
            alive.add(lease.spec.holder_identity or lease.metadata.name[len(meta.AGENT_LEASE_PREFIX):])
    return alive
