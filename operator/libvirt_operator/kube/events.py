"""Post Kubernetes Events about our objects (what `kubectl describe` shows)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from kubernetes import client

from libvirt_operator.kube.client import core

log = logging.getLogger(__name__)


def post(obj: dict, reason: str, message: str, *, warning: bool = False, component: str) -> None:
    """Best effort: an Event that cannot be posted is logged, never raised."""
    md = obj["metadata"]
    now = datetime.now(UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"{md['name']}.{uuid.uuid4().hex[:12]}", namespace=md["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=obj["apiVersion"], kind=obj["kind"], name=md["name"],
            namespace=md["namespace"], uid=md.get("uid"), resource_version=md.get("resourceVersion"),
        ),
        reason=reason,
        message=message[:1024],
        type="Warning" if warning else "Normal",
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=client.V1EventSource(component=component),
        reporting_component=component,
        reporting_instance=component,
    )
    try:
        core().create_namespaced_event(md["namespace"], event)
    except Exception as exc:
        log.warning("could not post event %s on %s/%s: %s", reason, md["namespace"], md["name"], exc)
