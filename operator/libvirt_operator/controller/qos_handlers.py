"""QoS resolution in the controller: watch VMQosPolicies and VirtualMachines, write each VM's effective
QoS into `status.qos` and each policy's status (matched VMs, conflicts, phase, conditions).

Level-based: every event of either kind re-resolves what it can change (a VM: that VM; a policy: every
VM of its namespace) from an in-memory view of both kinds, seeded by listing them at startup so that a
restarted controller never writes a resolution that misses policies it has not seen yet. Writes are
server-side applies under the field manager QOS_MANAGER (so the placement's own status fields, owned by
meta.CONTROLLER_MANAGER, are never touched) and only when the result differs from what was written.
The rules themselves are in controller/qos.py.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.controller import qos
from libvirt_operator.kube import conditions, resources
from libvirt_operator.kube.conditions import Cond

log = logging.getLogger(__name__)

QOS_MANAGER = f"{meta.CONTROLLER_MANAGER}-qos"
WRITE_CONCURRENCY = 8


def _slim(body: Mapping) -> dict:
    """The parts of a VM resolution reads (kopf bodies are views; keep a copy)."""
    md = body.get("metadata") or {}
    return {
        "metadata": {k: copy.deepcopy(md.get(k)) for k in ("name", "namespace", "uid", "generation", "labels",
                                                          "deletionTimestamp") if md.get(k) is not None},
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": {"qos": copy.deepcopy((body.get("status") or {}).get("qos"))},
    }


class QosController:
    def __init__(self) -> None:
        self._vms: dict[str, dict[str, dict]] = {}  # namespace -> name -> slim VM
        self._policies: dict[str, dict[str, qos.Policy]] = {}  # namespace -> name -> parsed policy
        self._policy_bodies: dict[tuple[str, str], dict] = {}  # generation, status (for conditions)
        self._written_vm: dict[tuple[str, str, str], dict] = {}  # (ns, name, uid) -> status.qos written
        self._written_policy: dict[tuple[str, str], dict] = {}
        self._contributions: dict[tuple[str, str], tuple] = {}  # what a VM adds to policy reports
        self._lock = asyncio.Lock()
        self._writes = asyncio.Semaphore(WRITE_CONCURRENCY)

    # -- entry points

    async def seed(self) -> None:
        """Lists both kinds once, so that the first resolutions see every policy. A failure is logged and
        the watches fill the view instead (never blocking the controller's start)."""
        try:
            policies, vms = await asyncio.gather(asyncio.to_thread(resources.list_all, resources.QOS_POLICIES),
                                                 asyncio.to_thread(resources.list_all, resources.VMS))
        except ApiException as exc:
            log.error("QoS: cannot list policies and VMs at startup (%s %s); relying on the watches",
                      exc.status, exc.reason)
            return
        async with self._lock:
            for body in policies:
                self._store_policy(body)
            for body in vms:
                self._store_vm(body)
        log.info("QoS: %d policies, %d VMs seen at startup", len(policies), len(vms))

    async def on_vm(self, event_type: str | None, body: Mapping) -> None:
        md = body.get("metadata") or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        async with self._lock:
            if event_type == "DELETED":
                self._vms.get(ns, {}).pop(name, None)
                for key in [k for k in self._written_vm if k[:2] == (ns, name)]:
                    del self._written_vm[key]
                if self._contributions.pop((ns, name), None):
                    await self._write_reports(ns)
                return
            self._store_vm(body)
            await self._sync(ns, only=name)

    async def on_policy(self, event_type: str | None, body: Mapping) -> None:
        md = body.get("metadata") or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        async with self._lock:
            if event_type == "DELETED":
                self._policies.get(ns, {}).pop(name, None)
                self._policy_bodies.pop((ns, name), None)
                self._written_policy.pop((ns, name), None)
            else:
                known = self._policy_bodies.get((ns, name))
                # Skipped only once this generation's report was written (e.g. our own status write coming
                # back). A policy first seen by seed() still needs its report: in a namespace without VMs
                # no VM event would ever write it (it stayed without status, not Idle).
                same_spec = known is not None and name in self._policies.get(ns, {}) and \
                    known.get("generation") == md.get("generation") and (ns, name) in self._written_policy
                self._store_policy(body)
                if same_spec:
                    return
            await self._sync(ns)

    # -- the view

    def _store_vm(self, body: Mapping) -> None:
        vm = _slim(body)
        md = vm["metadata"]
        self._vms.setdefault(md.get("namespace", ""), {})[md.get("name", "")] = vm

    def _store_policy(self, body: Mapping) -> None:
        md = body.get("metadata") or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        parsed = qos.policy_of(body)
        if parsed is None:
            log.warning("VMQosPolicy %s/%s does not parse; ignored", ns, name)
            self._policies.get(ns, {}).pop(name, None)
            return
        self._policies.setdefault(ns, {})[name] = parsed
        self._policy_bodies[(ns, name)] = {"generation": md.get("generation"),
                                           "status": copy.deepcopy(dict(body.get("status") or {}))}

    # -- resolution and writes

    async def _sync(self, ns: str, only: str | None = None) -> None:
        vms = self._vms.get(ns, {})
        policies = list(self._policies.get(ns, {}).values())
        writes, reports_changed = [], only is None
        for name, vm in vms.items():
            if only is not None and name != only:
                continue
            if vm["metadata"].get("deletionTimestamp"):
                continue
            res = qos.resolve(vm, policies)
            status = res.status
            contribution = (tuple(res.matched), repr(res.conflicts))
            if self._contributions.get((ns, name)) != contribution:
                self._contributions[(ns, name)] = contribution
                reports_changed = True
            key = (ns, name, vm["metadata"].get("uid", ""))
            if self._written_vm.get(key) == status:
                continue
            if key not in self._written_vm and (_same_qos(vm["status"].get("qos"), status)
                                                or (vm["status"].get("qos") is None and _empty(status))):
                self._written_vm[key] = status  # already there (e.g. before a restart), or nothing to say
                continue
            writes.append(self._write_vm(key, status))
        await asyncio.gather(*writes)
        if reports_changed:
            await self._write_reports(ns)

    async def _write_vm(self, key: tuple[str, str, str], status: dict) -> None:
        ns, name, _ = key
        async with self._writes:
            try:
                await asyncio.to_thread(resources.apply_status, resources.VMS, ns, name, {"qos": status},
                                        QOS_MANAGER)
            except ApiException as exc:
                if exc.status == 404:
                    return
                log.warning("QoS: cannot write status.qos of %s/%s: %s", ns, name, exc.reason)
                return
        self._written_vm[key] = status
        if status.get("valid"):
            log.info("QoS of %s/%s: %s", ns, name, _summary(status))
        else:
            log.info("QoS of %s/%s is invalid: %s: %s", ns, name, status.get("reason"), status.get("message"))

    async def _write_reports(self, ns: str) -> None:
        policies = list(self._policies.get(ns, {}).values())
        if not policies:
            return
        vms = [vm for vm in self._vms.get(ns, {}).values() if not vm["metadata"].get("deletionTimestamp")]
        _, reports = qos.resolve_all(vms, policies)
        writes = []
        for (pns, pname), report in reports.items():
            body = self._policy_bodies.get((pns, pname), {})
            status = qos.policy_status(report, body.get("generation"))
            conds = [Cond(t, ok, reason, message) for t, ok, reason, message in qos.policy_conditions(report)]
            rendered = conditions.render(conds, (body.get("status") or {}).get("conditions"), body.get("generation"))
            comparable = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                                   for c in rendered]}
            if self._written_policy.get((pns, pname)) == comparable:
                continue
            writes.append(self._write_policy(pns, pname, {**status, "conditions": rendered}, comparable))
        await asyncio.gather(*writes)

    async def _write_policy(self, ns: str, name: str, status: dict, comparable: dict) -> None:
        async with self._writes:
            try:
                done = await asyncio.to_thread(resources.apply_status, resources.QOS_POLICIES, ns, name, status,
                                               QOS_MANAGER)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("QoS: cannot write the status of policy %s/%s: %s", ns, name, exc.reason)
                return
        self._written_policy[(ns, name)] = comparable
        body = self._policy_bodies.get((ns, name))
        if body is not None:
            body["status"] = dict(done.get("status") or {})


def _empty(status: Mapping) -> bool:
    """No QoS at all: a VM without status.qos needs none written (the agent then leaves its domain alone)."""
    return bool(status.get("valid")) and not status.get("policies") and \
        set(status) <= {"valid", "policies", "observedGeneration"}


def _same_qos(current: Any, wanted: Mapping) -> bool:
    return isinstance(current, Mapping) and dict(current) == dict(wanted)


def _summary(status: Mapping) -> str:
    parts = []
    for kind in ("cpu", "memory"):
        for key, entry in (status.get(kind) or {}).items():
            parts.append(f"{kind}.{key}={entry['value']} ({entry['source']})")
    parts += [f"network[{n['name']}]" for n in status.get("network") or []]
    parts += [f"disks[{d['name']}]" for d in status.get("disks") or []]
    return ", ".join(parts) or "none"


def register(registry: kopf.OperatorRegistry, controller: QosController | None = None) -> QosController:
    controller = controller or QosController()

    @kopf.on.startup(id="qos-seed", registry=registry)
    async def seed(**_) -> None:
        await controller.seed()

    @kopf.on.event(meta.GROUP, meta.VERSION, resources.VMS, id="qos-vm", registry=registry)
    async def vm_event(event: Mapping, body: kopf.Body, **_) -> None:
        await controller.on_vm(event.get("type"), body)

    @kopf.on.event(meta.GROUP, meta.VERSION, resources.QOS_POLICIES, id="qos-policy", registry=registry)
    async def policy_event(event: Mapping, body: kopf.Body, **_) -> None:
        await controller.on_policy(event.get("type"), body)

    return controller
