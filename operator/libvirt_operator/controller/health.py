"""The controller's health checks (see libvirt_operator.metrics.health for the endpoints):
ready while the API server answers its own query of VirtualMachines (its credentials, its RBAC)."""

from __future__ import annotations

from libvirt_operator.api import meta
from libvirt_operator.kube.client import custom_objects
from libvirt_operator.metrics import health

API_TIMEOUT_SECONDS = 5


def kube_api() -> str | None:
    custom_objects().list_cluster_custom_object(meta.GROUP, meta.VERSION, "virtualmachines", limit=1,
                                                _request_timeout=API_TIMEOUT_SECONDS)
    return None


def serve() -> None:
    health.serve_from_env({"kube-api": kube_api})
