"""VMSnapshots: the controller hands each one to the agent of its VM's node (the node label), or says
why it cannot (VMNotFound, VMNotPlaced). Everything else about a snapshot is the agent's work.

Low-level event handlers, as for VMs: kopf writes no state onto the objects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import kopf
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.api.base import utcnow
from libvirt_operator.kube import resources

log = logging.getLogger(__name__)
RETRY_SECONDS = 5.0
MANAGER = meta.CONTROLLER_MANAGER + "-snapshots"


def _node_of(obj: Mapping) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(meta.NODE_LABEL) or None


def unplaced_reason(snapshot: Mapping, vm: Mapping | None) -> tuple[str, str] | None:
    """(reason, message) when the snapshot cannot go to an agent yet; None when its VM has a node."""
    ns, name = snapshot["metadata"]["namespace"], snapshot["spec"]["vmName"]
    if vm is None:
        return "VMNotFound", f"VirtualMachine {ns}/{name} does not exist"
    if _node_of(vm) is None:
        return "VMNotPlaced", f"VirtualMachine {ns}/{name} has no node yet"
    return None


class SnapshotHandover:
    def __init__(self) -> None:
        self._retries: dict[str, asyncio.TimerHandle] = {}

    async def on_event(self, event_type: str | None, snapshot: Mapping) -> None:
        md = snapshot["metadata"]
        if event_type == "DELETED" or md.get("deletionTimestamp") or _node_of(snapshot):
            self._cancel(md["uid"])
            return
        vm = await asyncio.to_thread(resources.get, resources.VMS, md["namespace"], snapshot["spec"]["vmName"])
        problem = unplaced_reason(snapshot, vm)
        if problem is None:
            try:
                await asyncio.to_thread(resources.merge_patch, resources.SNAPSHOTS, md["namespace"], md["name"], {
                    "metadata": {"labels": {meta.NODE_LABEL: _node_of(vm)},
                                 "resourceVersion": md["resourceVersion"]}})
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise
            return
        reason, message = problem
        final = reason == "VMNotFound"
        await asyncio.to_thread(self._report, snapshot, reason, message, final)
        if not final:  # placed later: look again
            self._retry(snapshot)

    @staticmethod
    def _report(snapshot: Mapping, reason: str, message: str, final: bool) -> None:
        md = snapshot["metadata"]
        cond = {"type": "Ready", "status": "False", "reason": reason, "message": message,
                "observedGeneration": md.get("generation", 1), "lastTransitionTime": utcnow()}
        old = next((c for c in (snapshot.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"),
                   None)
        if old and old.get("reason") == reason and old.get("message") == message:
            return
        try:
            resources.apply_status(resources.SNAPSHOTS, md["namespace"], md["name"],
                                   {"phase": "Failed" if final else "Pending", "conditions": [cond]}, MANAGER)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _retry(self, snapshot: Mapping) -> None:
        uid = snapshot["metadata"]["uid"]
        self._cancel(uid)
        loop = asyncio.get_running_loop()
        ns, name = snapshot["metadata"]["namespace"], snapshot["metadata"]["name"]
        self._retries[uid] = loop.call_later(RETRY_SECONDS, lambda: asyncio.ensure_future(self._again(ns, name)))

    async def _again(self, ns: str, name: str) -> None:
        obj = await asyncio.to_thread(resources.get, resources.SNAPSHOTS, ns, name)
        if obj is not None:
            await self.on_event("MODIFIED", obj)

    def _cancel(self, uid: str) -> None:
        handle = self._retries.pop(uid, None)
        if handle:
            handle.cancel()


def register(registry: kopf.OperatorRegistry) -> SnapshotHandover:
    handover = SnapshotHandover()

    @kopf.on.event(meta.GROUP, meta.VERSION, resources.SNAPSHOTS, registry=registry)
    async def snapshot_event(event: Mapping, body: kopf.Body, **_) -> None:
        try:
            await handover.on_event(event.get("type"), body)
        except Exception:  # never let kopf retry-storm; the next event or the retry timer looks again
            log.exception("handing over VMSnapshot %s/%s failed", body["metadata"].get("namespace"),
                          body["metadata"].get("name"))

    return handover
