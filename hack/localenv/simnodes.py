"""Simulated libvirt nodes: Node objects whose agent Leases a thread renews, with no agent and no libvirt.

The controller sees them as live libvirt nodes and places VirtualMachines on them; the VMs never
start, since no agent runs for them. For scale tests of the controller (many nodes, many VMs).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.kube.leases import LEASE_SECONDS, lease_name
from localenv.kubenodes import register_node


class SimNodes:
    """`count` Nodes named `<prefix>-<i>`, each with `memory_bytes` allocatable, leases renewed every `every` s."""

    def __init__(self, api: client.ApiClient, namespace: str, count: int, memory_bytes: int,
                 prefix: str = "sim", every: float = 10.0):
        self.api, self.namespace, self.every = api, namespace, every
        self.names = [f"{prefix}-{i:03d}" for i in range(count)]
        self.memory_bytes = memory_bytes
        self.renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SimNodes:
        for name in self.names:
            register_node(self.api, name, memory_bytes=self.memory_bytes, cpus=8)
        self.renew_all()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="simnodes")
        self._thread.start()
        return self

    def renew_all(self) -> None:
        leases = client.CoordinationV1Api(self.api)
        now = datetime.now(UTC)
        for node in self.names:
            spec = {"holderIdentity": node, "renewTime": now.isoformat(), "leaseDurationSeconds": LEASE_SECONDS}
            try:
                leases.patch_namespaced_lease(lease_name(node), self.namespace, {"spec": spec})
            except ApiException as exc:
                if exc.status != 404:
                    raise
                leases.create_namespaced_lease(self.namespace, client.V1Lease(
                    metadata=client.V1ObjectMeta(name=lease_name(node), namespace=self.namespace,
                                                 labels={meta.NODE_LABEL: node}),
                    spec=client.V1LeaseSpec(holder_identity=node, lease_duration_seconds=LEASE_SECONDS,
                                            renew_time=now, acquire_time=now)))
        self.renewals += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.renew_all()
            except Exception:  # a slow API server: the next round tries again (the lease lasts 40 s)
                continue

    def stop(self, delete: bool = False) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        if delete:
            core, leases = client.CoreV1Api(self.api), client.CoordinationV1Api(self.api)
            for name in self.names:
                for call in (lambda n=name: core.delete_node(n),
                             lambda n=name: leases.delete_namespaced_lease(lease_name(n), self.namespace)):
                    try:
                        call()
                    except ApiException as exc:
                        if exc.status != 404:
                            raise
