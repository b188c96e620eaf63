"""Placement of VirtualMachines on nodes: kopf watch events in, node label + status + Events out.

Level-triggered and idempotent: every watch event (including the initial listing after a
restart) of a VM that `schedule_status.needs_work` re-runs `Scheduler.reconcile`. A VM that
cannot be placed yet is retried on a timer. Low-level event handlers keep kopf from writing
any state, annotation or finalizer onto the VMs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import kopf
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.controller import cluster, placement, schedule_status
from libvirt_operator.controller.placement import Decision, Reservations
from libvirt_operator.kube import events, resources
from libvirt_operator.metrics import controller as metrics

log = logging.getLogger(__name__)

CONFLICT_RETRY_SECONDS = 0.2
SNAPSHOT_REUSE_SECONDS = 1.0  # even within a burst, read afresh after this long


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
    def __init__(self, operator_namespace: str, retry_seconds: float = 5.0):
        self.operator_namespace = operator_namespace
        self.retry_seconds = retry_seconds
        self._lock = asyncio.Lock()  # one placement decision at a time
        self._reservations = Reservations()
        # A burst of VMs waiting for the lock is placed from one reading of nodes, leases and VMs
        # (our own placements since then count through the reservations); a burst ends when the
        # lock is released with nobody waiting, and the next decision reads afresh.
        self._snapshots: dict[str | None, cluster.Snapshot] = {}  # by pinned node, this burst only
        self._waiting = 0
        self._retries: dict[str, _Retry] = {}
        self._running: set[asyncio.Task] = set()
        self._again: dict[str, bool] = {}  # uid -> another attempt wanted, for VMs being reconciled
        # VMs whose spec sets a MAC, as the watch last showed them: a VM created after the snapshot
        # was read still counts for the MAC check (MACs are unique cluster-wide).
        self._with_macs: dict[str, placement.VMRef] = {}
        metrics.track_waiting(lambda: len(self._retries))

    # -- entry points

    async def on_event(self, event_type: str | None, vm: Mapping) -> None:
        md = vm["metadata"]
        key = VMKey(md["namespace"], md["name"], md["uid"])
        self._track_macs(event_type, vm)
        if event_type == "DELETED" or not schedule_status.needs_work(vm):
            self._cancel_retry(key.uid)
            return
        retry = self._retries.get(key.uid)
        if retry is not None and retry.generation == md.get("generation"):
            return  # same spec as the last attempt: the pending retry will look again
        self._cancel_retry(key.uid)
        await self._run(key)

    def _track_macs(self, event_type: str | None, vm: Mapping) -> None:
        uid = vm["metadata"]["uid"]
        if event_type == "DELETED":
            self._with_macs.pop(uid, None)
            return
        try:
            ref = placement.vm_ref(vm)
        except ValueError:  # an unreadable quantity: reconcile reports it
            return
        if ref.macs:
            old = self._with_macs.get(uid)
            if old is not None and old.node and not ref.node:  # never forget a placement (stale event)
                ref = dataclasses.replace(ref, node=old.node)
            self._with_macs[uid] = ref
        else:
            self._with_macs.pop(uid, None)

    def close(self) -> None:
        for uid in list(self._retries):
            self._cancel_retry(uid)
        for task in self._running:
            task.cancel()

    # -- one attempt

    @metrics.timed_reconcile
    async def reconcile(self, key: VMKey) -> tuple[float | None, int | None]:
        """Place the VM if needed and make its status say so; returns (retry delay or None, generation)."""
        decision: Decision | None = None
        vm = await asyncio.to_thread(resources.get, resources.VMS, key.namespace, key.name)
        if vm is None or vm["metadata"]["uid"] != key.uid or not schedule_status.needs_work(vm):
            return None, None
        generation = vm["metadata"].get("generation")
        node = vm["metadata"].get("labels", {}).get(meta.NODE_LABEL)
        self._waiting += 1
        async with self._lock:  # the label patch below is conditional on this VM's resourceVersion
            self._waiting -= 1
            try:
                if not node:
                    decision = await self._decide(vm)
                    metrics.placed(decision)
                    if decision.node is not None:
                        try:
                            vm = await asyncio.to_thread(cluster.label_node, key.namespace, key.name,
                                                         decision.node, vm["metadata"]["resourceVersion"])
                        except ApiException as exc:
                            if exc.status == 409:  # changed meanwhile: decide again on the new version
                                return CONFLICT_RETRY_SECONDS, generation
                            raise
                        self._reservations.add(placement.vm_ref(vm), time.monotonic())
                        node = decision.node
                        log.info("placed %s/%s on node %s: %s", key.namespace, key.name, node, decision.message)
            finally:
                if self._waiting == 0:
                    self._snapshots.clear()  # end of the burst
        if node:
            await self._report_scheduled(vm, node, decision)
            return None, generation
        await self._report_unscheduled(vm, decision)
        return self.retry_seconds, generation

    async def _decide(self, vm: dict) -> Decision:
        ref = placement.vm_ref(vm)
        snap = self._snapshots.get(ref.pinned_node)
        if snap is None or time.monotonic() - snap.read_at > SNAPSHOT_REUSE_SECONDS:
            snap = await asyncio.to_thread(cluster.read, ref.pinned_node, self.operator_namespace)
            self._snapshots[ref.pinned_node] = snap
        placed = self._reservations.combine(snap.vms, snap.read_at)
        others = [*snap.vms, *self._with_macs.values()] if ref.macs else ()
        return placement.decide(ref, snap.nodes, snap.alive, placed, others)

    # -- status and Events

    async def _report_scheduled(self, vm: dict, node: str, decision: Decision | None) -> None:
        old = schedule_status.find_condition(vm)
        if decision is None:  # placed earlier (e.g. before a restart): keep what was said then
            keep = old is not None and old.get("status") == "True"
            decision = Decision(node, placement.SCHEDULED, old["message"] if keep else f"placed on node {node}")
        new_event = old is None or old.get("status") != "True"
        await apply_status(vm, lambda with_phase: schedule_status.scheduled(vm, node, decision.message, with_phase))
        if new_event:
            await asyncio.to_thread(events.post, vm, placement.SCHEDULED, decision.message,
                                    component=meta.CONTROLLER_MANAGER)

    async def _report_unscheduled(self, vm: dict, decision: Decision) -> None:
        md = vm["metadata"]
        changed = schedule_status.condition_changed(vm, decision)
        await apply_status(vm, lambda with_phase: schedule_status.unscheduled(vm, decision, with_phase))
        if changed:
            log.info("cannot place %s/%s yet: %s: %s", md["namespace"], md["name"], decision.reason, decision.message)
            await asyncio.to_thread(events.post, vm, "FailedScheduling", f"{decision.reason}: {decision.message}",
                                    warning=True, component=meta.CONTROLLER_MANAGER)

    # -- retries

    async def _run(self, key: VMKey) -> None:
        """Reconcile one VM, never twice at once: a call during an attempt asks for one more."""
        if key.uid in self._again:
            self._again[key.uid] = True
            return
        self._again[key.uid] = False
        try:
            while True:
                delay, generation = await self._attempt(key)
                if not self._again[key.uid]:
                    break
                self._again[key.uid] = False
        finally:
            del self._again[key.uid]
        if delay is not None:
            self._schedule_retry(key, generation, delay)

    async def _attempt(self, key: VMKey) -> tuple[float | None, int | None]:
        try:
            return await self.reconcile(key)
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
        task = asyncio.create_task(self._run(key), name=f"place {key.namespace}/{key.name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _cancel_retry(self, uid: str) -> None:
        retry = self._retries.pop(uid, None)
        if retry is not None:
            retry.handle.cancel()


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
    @kopf.on.event(meta.GROUP, meta.VERSION, resources.VMS, id="placement", registry=registry)
    async def vm_event(event: Mapping, body: kopf.Body, **_) -> None:
        metrics.vm_event(event)
        await scheduler.on_event(event.get("type"), body)

    @kopf.on.cleanup(id="placement-retries", registry=registry)
    async def stop_retries(**_) -> None:
        scheduler.close()
