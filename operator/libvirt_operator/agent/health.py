"""The agent's health checks (see libvirt_operator.metrics.health for the endpoints).

Ready only while both halves of its job work: the libvirt connection is up (a stopped
libvirtd makes the agent unready at once: the host's connection-lost event clears it), and
the API server answers the agent's own watch query (its node's VirtualMachines, with its
own credentials).
"""

from __future__ import annotations

from collections.abc import Callable

from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.api import meta
from libvirt_operator.kube.client import custom_objects
from libvirt_operator.metrics import health

API_TIMEOUT_SECONDS = 5


def checks(cfg: AgentConfig, libvirt_connected: Callable[[], bool]) -> dict[str, health.Check]:
    def libvirt() -> str | None:
        return None if libvirt_connected() else f"not connected to {cfg.libvirt_uri}"

    def kube_watch() -> str | None:
        custom_objects().list_cluster_custom_object(
            meta.GROUP, meta.VERSION, "virtualmachines", label_selector=f"{meta.NODE_LABEL}={cfg.node_name}",
            limit=1, _request_timeout=API_TIMEOUT_SECONDS)
        return None

    return {"libvirt": libvirt, "kube-api": kube_watch}


def serve(cfg: AgentConfig, libvirt_connected: Callable[[], bool]) -> None:
    health.serve_from_env(checks(cfg, libvirt_connected))
