"""Placement of VirtualMachines on nodes: kopf watch events in, node label + status + Events out.

Level-triggered and idempotent: every watch event (including the initial listing after a
restart) of a VM that `schedule_status.needs_work` re-runs `Scheduler.reconcile`. A VM that
cannot be placed yet is retried on a timer. Low-level event handlers keep kopf from writing
any state, annotation or finalizer onto the VMs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import kopf
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.controller import cluster, placement, schedule_status
from libvirt_operator.controller.index import VMIndex
from libvirt_operator.controller.placement import Decision
from libvirt_operator.kube import events, resources
from libvirt_operator.metrics import controller as metrics

log = logging.getLogger(__name__)

CONFLICT_RETRY_SECONDS = 0.2
CONFLICT_ATTEMPTS = 3  # re-read and decide again this often when the VM changed under the label patch
NODES_REUSE_SECONDS = 1.0  # within a burst, a reading of nodes and leases serves the decisions of this long
RESEED_SECONDS = 300.0  # a full listing of VMs this often, for deletions the watch may have missed
EVENT_THREADS = 2
WORKERS = 8  # placements in flight (each: a read, a decision, a label patch, a status write)
# Blocking API calls in flight (asyncio's default is cores + 4). With the Events' threads, no more than
# the client's connection pool keeps (cores * 5, at least 10): a thread beyond it opens a new TLS
# connection per call, which costs the API server and us more than waiting.
API_THREADS = 8


@dataclass(frozen=True)
class VMKey:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class _Retry:
    generation: int | None
    handle: asyncio.TimerHandle


class Scheduler:
    """Decisions one at a time, from the watch-fed index and one reading of nodes and leases per burst
    (a burst: decisions queued for the lock; at most NODES_REUSE_SECONDS); each decision counts
    at once in the index, so the label patches, status writes and Events of a burst all run
    concurrently, outside the lock."""

    def __init__(self, operator_namespace: str, retry_seconds: float = 5.0):
        self.operator_namespace = operator_namespace
        self.retry_seconds = retry_seconds
        self._lock = asyncio.Lock()  # one placement decision at a time
        self.index = VMIndex()
        # Nodes and leases as read for the current burst (decisions waiting for the lock), at most
        # NODES_REUSE_SECONDS old; by pinned node (None: all libvirt nodes).
        self._nodes: dict[str | None, cluster.Snapshot] = {}
        self._waiting = 0
        # uid -> resourceVersion our label patch returned, until the watch brings that version back
        # (it shows the label without the status we wrote right after: nothing to do).
        self._labelled: dict[str, str] = {}
        self._retries: dict[str, _Retry] = {}
        self._queue: asyncio.Queue[VMKey] | None = None  # VMs waiting for a placement worker
        self._queued: set[str] = set()
        self._latest: dict[str, dict] = {}  # uid -> the newest event's VM (slim), while queued
        self._workers: list[asyncio.Task] = []
        self._again: dict[str, bool] = {}  # uid -> another attempt wanted, for VMs being reconciled
        self._events = ThreadPoolExecutor(EVENT_THREADS, thread_name_prefix="events")
        metrics.track_waiting(lambda: len(self._retries))

    # -- entry points

    async def on_event(self, event_type: str | None, vm: Mapping) -> None:
        md = vm["metadata"]
        key = VMKey(md["namespace"], md["name"], md["uid"])
        self._track(event_type, vm)
        if event_type == "DELETED" or not schedule_status.needs_work(vm):
            self._labelled.pop(key.uid, None)
            self._latest.pop(key.uid, None)
            self._cancel_retry(key.uid)
            return
        retry = self._retries.get(key.uid)
        if retry is not None and retry.generation == md.get("generation"):
            return  # same spec as the last attempt: the pending retry will look again
        if md.get("resourceVersion") and self._labelled.get(key.uid) == md["resourceVersion"]:
            del self._labelled[key.uid]  # our own label patch coming back: its status write followed it
            return
        self._cancel_retry(key.uid)
        if not (md.get("labels") or {}).get(meta.NODE_LABEL):
            # An unplaced VM as the event shows it, slimmed: the label patch is conditional on its
            # resourceVersion, so a stale one costs only a re-read. A placed one is read afresh
            # (its event may predate our own status write).
            self._latest[key.uid] = slim(vm)
        self._enqueue(key)

    def _enqueue(self, key: VMKey) -> None:
        """Hand the VM to a placement worker and return: kopf's handler never waits on the API, so a
        backlog holds VM keys here, not an event body per VM in kopf (worker reads the VM afresh)."""
        if key.uid in self._again:  # being reconciled: once more after that
            self._again[key.uid] = True
            return
        if key.uid in self._queued:
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [asyncio.create_task(self._work(), name=f"placement-worker-{i}")
                             for i in range(WORKERS)]
        self._queued.add(key.uid)
        self._queue.put_nowait(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key.uid)
            await self._run(key, self._latest.pop(key.uid, None))

    def _track(self, event_type: str | None, vm: Mapping) -> None:
        now = time.monotonic()
        if event_type == "DELETED":
            self.index.remove(vm["metadata"]["uid"], now)
            return
        try:
            self.index.update(placement.vm_ref(vm), now)
        except (ValueError, KeyError, TypeError):  # unreadable (the schema prevents it): reconcile says so
            log.warning("cannot index %s/%s", vm["metadata"].get("namespace"), vm["metadata"].get("name"))

    def close(self) -> None:
        for uid in list(self._retries):
            self._cancel_retry(uid)
        for task in self._workers:
            task.cancel()
        self._events.shutdown(wait=False)

    # -- one attempt

    @metrics.timed_reconcile
    async def reconcile(self, key: VMKey, vm: Mapping | None = None) -> tuple[float | None, int | None]:
        """Place the VM if needed and make its status say so; returns (retry delay or None, generation).

        `vm`: the object as a watch event just showed it (else it is read); the label patch is
        conditional on its resourceVersion, so a stale one only costs a re-read.
        """
        generation: int | None = None
        for _ in range(CONFLICT_ATTEMPTS):
            if vm is None:
                vm = await asyncio.to_thread(resources.get, resources.VMS, key.namespace, key.name)
            if vm is None or vm["metadata"]["uid"] != key.uid or not schedule_status.needs_work(vm):
                return None, None
            generation = vm["metadata"].get("generation")
            node = (vm["metadata"].get("labels") or {}).get(meta.NODE_LABEL)
            decision: Decision | None = None
            labelled_rv: str | None = None
            if not node:
                decision, previous = await self._decide(vm)
                metrics.placed(decision)
                if decision.node is not None:
                    try:
                        vm = await asyncio.to_thread(cluster.label_node, key.namespace, key.name,
                                                     decision.node, vm["metadata"]["resourceVersion"])
                    except ApiException as exc:
                        self.index.release(key.uid, previous)
                        if exc.status == 409:  # changed meanwhile: decide again on the new version
                            vm = None
                            continue
                        if exc.status == 404:
                            return None, None
                        raise
                    except BaseException:
                        self.index.release(key.uid, previous)
                        raise
                    self.index.update(placement.vm_ref(vm), time.monotonic())
                    node = decision.node
                    labelled_rv = vm["metadata"].get("resourceVersion")
                    log.info("placed %s/%s on node %s: %s", key.namespace, key.name, node, decision.message)
            if node:
                if labelled_rv:
                    self._labelled[key.uid] = labelled_rv
                await self._report_scheduled(vm, node, decision)
                return None, generation
            await self._report_unscheduled(vm, decision)
            return self.retry_seconds, generation
        return CONFLICT_RETRY_SECONDS, generation

    async def _decide(self, vm: Mapping) -> tuple[Decision, placement.VMRef | None]:
        """One decision; a placement counts in the index at once. Returns it and what to `release`."""
        ref = placement.vm_ref(vm)
        clone = (vm.get("spec") or {}).get("cloneFrom")
        if clone and not ref.pinned_node:  # a clone's leaves go beside its snapshot's files
            node, problem = await clone_node(vm["metadata"]["namespace"], clone["snapshot"])
            if node is None:
                return Decision(None, "CloneSourceNotReady", problem), None
            ref = dataclasses.replace(ref, pinned_node=node)
        self._waiting += 1
        async with self._lock:
            self._waiting -= 1
            try:
                await self._seed_if_due()
                snap = await self._nodes_for(ref.pinned_node)
                decision = placement.decide_in(ref, snap.nodes, snap.alive, self.index)
                previous = self.index.reserve(ref, decision.node) if decision.node else None
            finally:
                if self._waiting == 0:
                    self._nodes.clear()  # end of the burst: the next decision reads nodes and leases afresh
        return decision, previous

    async def _seed_if_due(self) -> None:
        seeded = self.index.seeded_at
        if seeded is None or time.monotonic() - seeded > RESEED_SECONDS:
            refs, listed_at = await asyncio.to_thread(cluster.list_vms)
            self.index.seed(refs, listed_at)
            log.info("indexed %d VirtualMachines", len(self.index))

    async def _nodes_for(self, pinned: str | None) -> cluster.Snapshot:
        now = time.monotonic()
        for stale in [k for k, s in self._nodes.items() if now - s.read_at > NODES_REUSE_SECONDS]:
            del self._nodes[stale]
        snap = self._nodes.get(pinned)
        if snap is None:
            snap = await asyncio.to_thread(cluster.read, pinned, self.operator_namespace)
            self._nodes[pinned] = snap
        return snap

    def _post_event(self, vm: Mapping, reason: str, message: str, warning: bool = False) -> None:
        """In the background, on threads of their own: an Event never delays a status write."""
        md = vm["metadata"]
        about = {"apiVersion": vm.get("apiVersion", meta.API_VERSION), "kind": vm.get("kind", "VirtualMachine"),
                 "metadata": {k: md.get(k) for k in ("name", "namespace", "uid", "resourceVersion")}}
        asyncio.get_running_loop().run_in_executor(  # with only what the Event names, not the whole body
            self._events, functools.partial(events.post, about, reason, message, warning=warning,
                                            component=meta.CONTROLLER_MANAGER))

    # -- status and Events

    async def _report_scheduled(self, vm: dict, node: str, decision: Decision | None) -> None:
        old = schedule_status.find_condition(vm)
        if decision is None:  # placed earlier (e.g. before a restart): keep what was said then, unless it moved
            keep = (old is not None and old.get("status") == "True"
                    and (vm.get("status") or {}).get("nodeName") in (None, node))
            decision = Decision(node, placement.SCHEDULED, old["message"] if keep else f"placed on node {node}")
        new_event = old is None or old.get("status") != "True"
        await apply_status(vm, lambda with_phase: schedule_status.scheduled(vm, node, decision.message, with_phase))
        if new_event:
            self._post_event(vm, placement.SCHEDULED, decision.message)

    async def _report_unscheduled(self, vm: dict, decision: Decision) -> None:
        md = vm["metadata"]
        changed = schedule_status.condition_changed(vm, decision)
        await apply_status(vm, lambda with_phase: schedule_status.unscheduled(vm, decision, with_phase))
        if changed:
            log.info("cannot place %s/%s yet: %s: %s", md["namespace"], md["name"], decision.reason, decision.message)
            self._post_event(vm, "FailedScheduling", f"{decision.reason}: {decision.message}", warning=True)

    # -- retries

    async def _run(self, key: VMKey, vm: Mapping | None = None) -> None:
        """Reconcile one VM, never twice at once: a call during an attempt asks for one more."""
        if key.uid in self._again:
            self._again[key.uid] = True
            return
        self._again[key.uid] = False
        try:
            while True:
                delay, generation = await self._attempt(key, vm)
                vm = None  # another attempt reads the VM afresh
                if not self._again[key.uid]:
                    break
                self._again[key.uid] = False
        finally:
            del self._again[key.uid]
        if delay is not None:
            self._schedule_retry(key, generation, delay)

    async def _attempt(self, key: VMKey, vm: Mapping | None = None) -> tuple[float | None, int | None]:
        try:
            return await self.reconcile(key, vm)
        except Exception:
            log.exception("placement of %s/%s failed; retrying in %ss", key.namespace, key.name,
                          self.retry_seconds)
            return self.retry_seconds, None

    def _schedule_retry(self, key: VMKey, generation: int | None, delay: float) -> None:
        self._cancel_retry(key.uid)
        handle = asyncio.get_running_loop().call_later(delay, self._fire, key)
        self._retries[key.uid] = _Retry(generation, handle)

    def _fire(self, key: VMKey) -> None:
        self._retries.pop(key.uid, None)
        self._enqueue(key)

    def _cancel_retry(self, uid: str) -> None:
        retry = self._retries.pop(uid, None)
        if retry is not None:
            retry.handle.cancel()


async def clone_node(namespace: str, snapshot: str) -> tuple[str | None, str]:
    """The node of a Ready forClone VMSnapshot, or why a clone of it cannot be placed."""
    obj = await asyncio.to_thread(resources.get, resources.SNAPSHOTS, namespace, snapshot)
    if obj is None:
        return None, f"VMSnapshot {namespace}/{snapshot} (spec.cloneFrom) does not exist"
    if not obj["spec"].get("forClone"):
        return None, f"VMSnapshot {namespace}/{snapshot} is not a forClone snapshot"
    status = obj.get("status") or {}
    node = (obj["metadata"].get("labels") or {}).get(meta.NODE_LABEL)
    if status.get("phase") != "Ready" or not node:
        return None, f"VMSnapshot {namespace}/{snapshot} is not Ready ({status.get('phase') or 'Pending'})"
    return node, ""


def slim(vm: Mapping) -> dict:
    """What placement and the controller's status need of a VM (a backlog of thousands stays small):
    identity and version, labels, spec's placement fields, status' conditions, and only the
    managedFields entries that own status.phase."""
    md, spec, status = vm.get("metadata") or {}, vm.get("spec") or {}, vm.get("status") or {}
    keep_md = ("name", "namespace", "uid", "resourceVersion", "generation", "labels", "creationTimestamp",
               "deletionTimestamp")
    owners = [{"manager": e.get("manager"), "fieldsV1": {"f:status": {"f:phase": {}}}}
              for e in md.get("managedFields") or []
              if "f:phase" in ((e.get("fieldsV1") or {}).get("f:status") or {})]
    return {
        "apiVersion": vm.get("apiVersion", meta.API_VERSION), "kind": vm.get("kind", "VirtualMachine"),
        "metadata": {**{k: md[k] for k in keep_md if k in md}, "managedFields": owners},
        "spec": {k: spec[k] for k in ("memory", "disks", "interfaces", "nodeName", "cloneFrom") if k in spec},
        "status": {k: status[k] for k in ("conditions", "nodeName", "phase", "disks") if k in status},
    }


async def apply_status(vm: Mapping, build: Callable[[bool], dict]) -> None:
    """Apply the controller's status; with `phase` only if nobody else owns it, and never by force.

    build(with_phase) returns the status to apply. If the agent sets phase between our read of
    the VM and this apply, the non-forced apply conflicts (409) and we apply again without phase.
    """
    md = vm["metadata"]
    args = (resources.VMS, md["namespace"], md["name"])
    if not schedule_status.phase_owned_by_others(vm):
        try:
            await asyncio.to_thread(resources.apply_status, *args, build(True), meta.CONTROLLER_MANAGER,
                                    force=False)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    await asyncio.to_thread(resources.apply_status, *args, build(False), meta.CONTROLLER_MANAGER)


def register(registry: kopf.OperatorRegistry, scheduler: Scheduler) -> None:
    @kopf.on.startup(id="placement-threads", registry=registry)
    async def threads(**_) -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube"))
        # The client library imports an API module on its first use (CoreV1Api alone takes seconds
        # on a busy machine): pay that now, not in the first burst of placements.
        await asyncio.to_thread(cluster.warm_up)

    @kopf.on.event(meta.GROUP, meta.VERSION, resources.VMS, id="placement", registry=registry)
    async def vm_event(event: Mapping, body: kopf.Body, **_) -> None:
        metrics.vm_event(event)
        await scheduler.on_event(event.get("type"), event.get("object") or body)

    @kopf.on.cleanup(id="placement-retries", registry=registry)
    async def stop_retries(**_) -> None:
        scheduler.close()
