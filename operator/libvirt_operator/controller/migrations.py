"""VMMigrations, the controller's side: validation, queueing behind the parallel limits, the node label
that names the agent acting on a VMMigration now, and the VM's hand-over from the source node to the
target. The decisions are controller/migration_plan.py's; this module reads, writes and posts Events.

Level-triggered: every VMMigration event and every VM event whose status.migration says Landed or
Succeeded is checked in memory (no API call on the watch path: the placement handler of the same VM
events is not slowed) and, if there is work, its key goes to one worker, which reads the objects afresh.
One worker: the decisions that count active migrations against the limits run one at a time.
After a restart the initial listing brings every object again, so a hand-over interrupted anywhere
(e.g. between the domain's landing and the label flip) converges.

Every status write is a server-side apply (manager MANAGER, force) of the whole status as read, merged
with the step's changes, and conditional on the resourceVersion read (a newer write of an agent makes it
read again, never overwritten by a stale copy)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import kopf
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.api.vmmigration import TERMINAL_PHASES
from libvirt_operator.controller import cluster, placement
from libvirt_operator.controller import migration_plan as plan
from libvirt_operator.controller.config import ControllerConfig
from libvirt_operator.controller.index import VMIndex
from libvirt_operator.kube import conditions, events, leases, resources
from libvirt_operator.kube.client import custom_objects
from libvirt_operator.metrics import controller as metrics

log = logging.getLogger(__name__)

MANAGER = meta.CONTROLLER_MANAGER + "-migrations"
ATTEMPTS = 4  # conditional writes retried on a fresh read this often before the key is retried later
HANDOVER_STEPS = 8


@dataclass(frozen=True)
class Key:
    kind: str  # "migration" | "vm"
    namespace: str
    name: str


class Seen:
    """The newest copy known of the objects a decision is pending on: from the watch, or what a write
    returned. The first read of a decision is this copy, not a GET: every write is conditional on its
    resourceVersion, so a stale copy costs a 409 and a fresh read, never a wrong write."""

    def __init__(self) -> None:
        self._objs: dict[tuple[str, str, str], Mapping] = {}

    def put(self, plural: str, obj: Mapping) -> None:
        md = obj["metadata"]
        key = (plural, md["namespace"], md["name"])
        old = self._objs.get(key)
        if old is None or _newer(md.get("resourceVersion"), old["metadata"].get("resourceVersion")):
            self._objs[key] = obj

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        obj = self._objs.get((plural, namespace, name))
        return dict(obj) if obj is not None else None

    def drop(self, plural: str, namespace: str, name: str) -> None:
        self._objs.pop((plural, namespace, name), None)


def _newer(rv: str | None, than: str | None) -> bool:
    if rv and than and rv.isdigit() and than.isdigit():  # etcd's revisions (opaque to clients, else)
        return int(rv) >= int(than)
    return True


class Conflict(Exception):
    """A conditional write kept conflicting: the key is tried again later."""


class _ReadAgain(Exception):
    """Decide on a fresh read (other objects changed first)."""


class Migrations:
    def __init__(self, operator_namespace: str, limits: plan.Limits, retry_seconds: float = 5.0,
                 index: VMIndex | None = None):
        self.operator_namespace = operator_namespace
        self.limits = limits
        self.retry_seconds = retry_seconds
        self.index = index  # placement's watch-fed index of the VMs (None: list them per decision)
        self.phases: dict[str, str] = {}  # VMMigration uid -> phase, as the watch shows it
        self._names: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._queued: dict[str, tuple[str, str, str]] = {}  # uid -> (created, namespace, name)
        self._vm_of: dict[str, tuple[str, str]] = {}  # VMMigration uid -> the VM whose status.migration names it
        self._keys: dict[Key, None] = {}
        self.seen = Seen()  # VMMigrations not finished, VMs whose hand-over is pending
        self._retiring: dict[tuple[str, str], asyncio.Task] = {}  # VMs whose source retire runs beside the worker
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()
        metrics.track_migrations(self.counts)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for phase in list(self.phases.values()):
            out[phase] = out.get(phase, 0) + 1
        return out

    # -- watch events (in memory only)

    def on_migration_event(self, event_type: str | None, obj: Mapping) -> None:
        self._start()  # the timer too: a queued VMMigration listed at startup has nothing else to wake it
        md = obj["metadata"]
        uid = md["uid"]
        if event_type == "DELETED" or (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
            self.seen.drop(resources.MIGRATIONS, md["namespace"], md["name"])
        else:
            self.seen.put(resources.MIGRATIONS, obj)
        if event_type == "DELETED":
            was = self.phases.pop(uid, None)
            self._names.pop(uid, None)
            self._queued.pop(uid, None)
            self._vm_of.pop(uid, None)
            if was in plan.ACTIVE_PHASES:
                self._kick()  # a slot is free
            return
        status = obj.get("status") or {}
        phase = status.get("phase")
        before = self.phases.get(uid)
        self.phases[uid] = phase or "Pending"
        self._names[uid] = (md["namespace"], md["name"])
        if plan.queued(obj) and not md.get("deletionTimestamp"):
            self._queued[uid] = (md.get("creationTimestamp") or "", md["namespace"], md["name"])
        else:
            self._queued.pop(uid, None)
        if phase in TERMINAL_PHASES:
            if before not in TERMINAL_PHASES:
                self._kick()
            return
        if md.get("deletionTimestamp"):
            return  # being aborted: the agents' work
        if (phase in (None, "Pending") and not plan.queued(obj)) or plan.advance(obj) is not None:
            self._enqueue(Key("migration", md["namespace"], md["name"]))
        if uid in self._vm_of:
            self._enqueue(Key("vm", *self._vm_of[uid]))

    def on_vm_event(self, event_type: str | None, vm: Mapping) -> None:
        fact = (vm.get("status") or {}).get("migration")
        md = vm["metadata"]
        if event_type == "DELETED":
            self.seen.drop(resources.VMS, md["namespace"], md["name"])
            return
        if not fact or fact.get("state") not in ("Landed", "Succeeded"):
            return
        if fact.get("uid"):
            self._vm_of[fact["uid"]] = (md["namespace"], md["name"])
        if plan.vm_needs_handover(vm, self.phases.get(fact.get("uid") or "")):
            self.seen.put(resources.VMS, vm)
            self._enqueue(Key("vm", md["namespace"], md["name"]))

    # -- the worker

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._tasks = [asyncio.create_task(self._work(), name="migrations-worker"),
                           asyncio.create_task(self._timer(), name="migrations-queue-timer")]

    def _enqueue(self, key: Key) -> None:
        self._start()
        self._keys[key] = None
        self._wake.set()

    def _kick(self) -> None:
        """Look at the queued VMMigrations again, oldest first."""
        for _created, ns, name in sorted(self._queued.values()):
            self._enqueue(Key("migration", ns, name))

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            while self._keys:
                key = next(iter(self._keys))
                del self._keys[key]
                try:
                    await self.process(key)
                except Exception as exc:
                    if isinstance(exc, Conflict):
                        log.info("%s %s/%s: %s; again in %ss", key.kind, key.namespace, key.name, exc,
                                 self.retry_seconds)
                    else:
                        log.exception("%s %s/%s failed; again in %ss", key.kind, key.namespace, key.name,
                                      self.retry_seconds)
                    asyncio.get_running_loop().call_later(self.retry_seconds, self._enqueue, key)
            self._wake.clear()

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.retry_seconds)
            self._kick()
            for uid, (ns, name) in list(self._vm_of.items()):  # e.g. a source agent gone for good
                if self.phases.get(uid) in plan.ACTIVE_PHASES:
                    self._enqueue(Key("vm", ns, name))
            for uid, phase in list(self.phases.items()):  # e.g. a target agent gone before its pre-check answered
                if phase == "PreChecking" and uid in self._names:
                    self._enqueue(Key("migration", *self._names[uid]))

    def close(self) -> None:
        for task in [*self._tasks, *self._retiring.values()]:
            task.cancel()

    async def process(self, key: Key) -> None:
        if key.kind == "vm":
            await self.hand_over(key.namespace, key.name)
        else:
            await self.reconcile(key.namespace, key.name)

    # -- a VMMigration

    async def reconcile(self, namespace: str, name: str, depth: int = 0) -> None:
        for attempt in range(ATTEMPTS):
            obj = self.seen.get(resources.MIGRATIONS, namespace, name) if attempt == 0 else None
            obj = obj or await asyncio.to_thread(resources.get, resources.MIGRATIONS, namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return
            try:
                if (obj.get("status") or {}).get("phase") in (None, "Pending"):
                    await self._validate(obj, depth)
                else:
                    await self._advance(obj)
                return
            except _ReadAgain:
                continue
            except ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise
        raise Conflict("the VMMigration kept changing under the controller's writes")

    async def _validate(self, obj: dict, depth: int = 0) -> None:
        md, spec = obj["metadata"], obj["spec"]
        ns = md["namespace"]
        moving = (spec.get("type") or "Live") in plan.MOVING_TYPES
        # the reads side by side (one round trip's time, not four)
        vm, listed, snapshots, snap = await asyncio.gather(
            asyncio.to_thread(resources.get, resources.VMS, ns, spec["vmName"]),
            asyncio.to_thread(resources.list_all, resources.MIGRATIONS),
            asyncio.to_thread(_snapshots, ns),
            asyncio.to_thread(cluster.read, spec.get("targetNode"), self.operator_namespace) if moving
            else asyncio.sleep(0, cluster.Snapshot([], set())))
        migrations: list[plan.MigrationRef] = []
        view: placement.View = placement.ListView([])
        if vm is not None:
            migrations = [plan.migration_ref(m) for m in listed]
            elders = plan.undecided_elders(obj, migrations)
            if elders and depth < ATTEMPTS:  # the older one wins: decide it first, then this one afresh
                for elder in elders:
                    await self.reconcile(elder.namespace, elder.name, depth + 1)
                raise _ReadAgain
            if moving:
                view = await self._view()
        verdict = plan.validate(obj, vm, snapshots, migrations, snap.nodes, snap.alive, view, self.limits)
        rv = md["resourceVersion"]
        if verdict.action == "fail":
            await self._fail(obj, verdict.reason, verdict.message, vm)
        elif verdict.action == "queue":
            ready = conditions.find(obj.get("status"), plan.READY) or {}
            if plan.queued(obj) and ready.get("message") == verdict.message:
                return
            await self._apply(obj, plan.queued_status(obj, verdict.message), rv)
            self._queued[md["uid"]] = (md.get("creationTimestamp") or "", ns, md["name"])
            if not plan.queued(obj):
                log.info("VMMigration %s/%s queued: %s", ns, md["name"], verdict.message)
                self._post(obj, "MigrationQueued", verdict.message)
        else:
            started = await self._apply(obj, plan.started_status(obj, verdict, vm["metadata"]["uid"],
                                                                 plan.stamp(plan.now_utc())), rv)
            self._queued.pop(md["uid"], None)
            self.phases[md["uid"]] = verdict.phase
            log.info("VMMigration %s/%s: %s (%s)", ns, md["name"], verdict.phase, verdict.message)
            labelled = await self._label(started, verdict.label)
            if verdict.phase == "Running" and labelled is not None:
                self._started(labelled, vm)

    async def _advance(self, obj: dict) -> None:
        alive = True
        if plan.awaits_target(obj):
            alive = obj["status"]["targetNode"] in await asyncio.to_thread(leases.alive_nodes,
                                                                           self.operator_namespace)
        step = plan.advance(obj, alive)
        if step is None:
            return
        if step.phase == "Failed":
            await self._fail(obj, step.reason, step.message, None)
            return
        if step.label:
            obj = await self._label(obj, step.label)
            if obj is None:
                return
        if step.phase == "Running":
            running = await self._apply(obj, plan.running_status(obj), obj["metadata"]["resourceVersion"])
            self.phases[obj["metadata"]["uid"]] = "Running"
            log.info("VMMigration %s/%s: Running (pre-check passed on node %s)", obj["metadata"]["namespace"],
                     obj["metadata"]["name"], obj["status"].get("targetNode"))
            vm = await asyncio.to_thread(resources.get, resources.VMS, obj["metadata"]["namespace"],
                                         obj["spec"]["vmName"])
            self._started(running, vm)

    async def _fail(self, obj: dict, reason: str, message: str, vm: Mapping | None) -> None:
        md = obj["metadata"]
        await self._apply(obj, plan.failed_status(obj, reason, message), md["resourceVersion"])
        self.phases[md["uid"]] = "Failed"
        log.info("VMMigration %s/%s failed: %s: %s", md["namespace"], md["name"], reason, message)
        metrics.migration_finished(obj["spec"].get("type") or "Live", reason)
        self._post(obj, "MigrationFailed", f"{reason}: {message}", warning=True)
        if vm is None and reason != plan.VM_NOT_FOUND:
            vm = await asyncio.to_thread(resources.get, resources.VMS, md["namespace"], obj["spec"]["vmName"])
        if vm is not None:
            self._post(vm, "MigrationFailed", f"VMMigration {md['name']}: {reason}: {message}", warning=True)
        self._kick()

    async def _label(self, obj: dict, node: str) -> dict | None:
        """Set the VMMigration's node label (conditional on the version read); returns the new object, or
        None when it is gone. A conflict (409) propagates: `reconcile` reads afresh and decides again."""
        md = obj["metadata"]
        if plan.node_label(obj) == node:
            return obj
        try:
            return await asyncio.to_thread(resources.merge_patch, resources.MIGRATIONS, md["namespace"], md["name"], {
                "metadata": {"labels": {meta.NODE_LABEL: node}, "resourceVersion": md["resourceVersion"]}})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _started(self, migration: Mapping, vm: Mapping | None) -> None:
        status = migration.get("status") or {}
        kind = migration["spec"].get("type") or "Live"
        where = (f"on node {status.get('sourceNode')}" if kind not in plan.MOVING_TYPES
                 else f"from node {status.get('sourceNode')} to node {status.get('targetNode')}")
        message = f"{kind} migration {where}"
        self._post(migration, "MigrationStarted", message)
        if vm is not None:
            self._post(vm, "MigrationStarted", f"VMMigration {migration['metadata']['name']}: {message}")

    async def _view(self) -> placement.View:
        if self.index is None:
            refs, _ = await asyncio.to_thread(cluster.list_vms)
            return placement.ListView(refs)
        if self.index.seeded_at is None:
            refs, listed_at = await asyncio.to_thread(cluster.list_vms)
            self.index.seed(refs, listed_at)
        return self.index

    async def _apply(self, obj: Mapping, status: dict, resource_version: str) -> dict:
        md = obj["metadata"]
        out = await asyncio.to_thread(resources.apply_status, resources.MIGRATIONS, md["namespace"], md["name"],
                                      status, MANAGER, True, resource_version)
        if (out.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            self.seen.put(resources.MIGRATIONS, out)
        return out

    # -- a VM's hand-over

    async def hand_over(self, namespace: str, name: str) -> None:
        """Take the hand-over of a VM as far as its status allows, one step at a time: each decided on the
        objects the previous step's write returned (a fresh read only at the start and after a conflict)."""
        vm = migration = None
        fresh, first = True, True
        for _ in range(HANDOVER_STEPS):
            if fresh:
                vm, migration = await self._read_handover(namespace, name, first)
                fresh, first = False, False
            fact = ((vm or {}).get("status") or {}).get("migration") or {}
            if not fact:
                self.seen.drop(resources.VMS, namespace, name)
                return
            alive = True
            if plan.waits_for_source(vm, migration):
                alive = fact.get("sourceNode") in await asyncio.to_thread(leases.alive_nodes, self.operator_namespace)
            step = plan.handover(vm, migration, alive, retiring=(namespace, name) in self._retiring)
            if not step:
                self.seen.drop(resources.VMS, namespace, name)
                return
            try:
                vm, migration = await self._hand_over_step(vm, fact, migration, step)
            except ApiException as exc:
                if exc.status == 404:
                    self.seen.drop(resources.VMS, namespace, name)
                    return
                if exc.status != 409:
                    raise
                fresh = True
        raise Conflict("the hand-over did not settle")

    async def _read_handover(self, namespace: str, name: str, known: bool) -> tuple[dict | None, dict | None]:
        """The VM and the VMMigration its status.migration names (None unless it is that very one);
        `known`: the newest copies seen, where there are, else (and after a conflict) a GET."""
        vm = self.seen.get(resources.VMS, namespace, name) if known else None
        vm = vm or await asyncio.to_thread(resources.get, resources.VMS, namespace, name)
        fact = ((vm or {}).get("status") or {}).get("migration") or {}
        migration = None
        if fact.get("name"):
            migration = self.seen.get(resources.MIGRATIONS, namespace, fact["name"]) if known else None
            migration = migration or await asyncio.to_thread(resources.get, resources.MIGRATIONS, namespace,
                                                             fact["name"])
            if migration is not None and migration["metadata"]["uid"] != fact.get("uid"):
                migration = None
        return vm, migration

    async def _hand_over_step(self, vm: dict, fact: dict, migration: dict | None,
                              step: plan.HandOver) -> tuple[dict, dict | None]:
        """One step; the VM and the VMMigration as it left them."""
        md = vm["metadata"]
        ns, name, rv = md["namespace"], md["name"], md["resourceVersion"]
        if step.flip_to:
            vm = await asyncio.to_thread(cluster.label_node, ns, name, step.flip_to, rv)
            log.info("VM %s/%s landed on node %s (VMMigration %s): node label moved from %s", ns, name,
                     step.flip_to, fact.get("name"), fact.get("sourceNode"))
            return vm, migration
        if step.retire:  # beside the worker: the VMMigration's steps (Succeeded) never wait for it
            task = asyncio.create_task(self._retire(vm, step.retire, step.keep_as))
            self._retiring[(ns, name)] = task
            return vm, migration
        if step.phase == "HandingOver":
            migration = await self._apply(migration, plan.handing_over_status(migration),
                                          migration["metadata"]["resourceVersion"])
            self.phases[migration["metadata"]["uid"]] = "HandingOver"
            log.info("VMMigration %s/%s: HandingOver (the agent of node %s takes the VM over)", ns,
                     migration["metadata"]["name"], fact.get("targetNode"))
            return vm, migration
        # Succeeded
        again = bool((migration.get("status") or {}).get("completionTime"))  # recorded before: no new Events
        done = await self._apply(migration, plan.succeeded_status(migration, plan.now_utc()),
                                 migration["metadata"]["resourceVersion"])
        self.phases[migration["metadata"]["uid"]] = "Succeeded"
        status = done.get("status") or {}
        kind = migration["spec"].get("type") or "Live"
        ms = status.get("durationMilliseconds")
        self._kick()
        if again:
            log.info("VMMigration %s/%s: Succeeded again", ns, migration["metadata"]["name"])
            return vm, done
        metrics.migration_finished(kind, "Succeeded", ms / 1000 if isinstance(ms, int) else None)
        message = plan.migrated_message(done, ms)
        log.info("VMMigration %s/%s succeeded: %s", ns, migration["metadata"]["name"], message)
        self._post(done, "Migrated", message)
        self._post(vm, "Migrated", f"VMMigration {migration['metadata']['name']}: {message}")
        return vm, done

    async def _retire(self, vm: dict, source: str, target: str) -> None:
        """The source agent's status field managers go. What must outlive them (status.phase: the domain
        runs, on the target now) the target's co-own first, with the very value read (not forced, and
        conditional on the version read: never over a newer write). Then the hand-over is looked at again."""
        md = vm["metadata"]
        ns, name = md["namespace"], md["name"]
        try:
            for field, value, manager in plan.kept_fields(vm, source, target):
                vm = await asyncio.to_thread(resources.apply_status, resources.VMS, ns, name, {field: value},
                                             manager, False, vm["metadata"]["resourceVersion"])
            retired = await asyncio.gather(*(
                asyncio.to_thread(resources.apply_status, resources.VMS, ns, name, {}, manager)
                for manager in plan.retired_managers(source)))
            for out in retired:
                self.seen.put(resources.VMS, out)
            log.info("VM %s/%s: the status field managers of node %s's agent retired", ns, name, source)
        except ApiException as exc:  # a newer write (409) or the VM gone (404): the hand-over decides again
            self.seen.drop(resources.VMS, ns, name)  # on a fresh read
            log.info("VM %s/%s: retiring node %s's status managers: API %s; again", ns, name, source, exc.status)
        except Exception:  # as the worker does: again later, not in a tight loop
            log.exception("VM %s/%s: retiring node %s's status managers failed; again in %ss", ns, name, source,
                          self.retry_seconds)
            self._retiring.pop((ns, name), None)
            asyncio.get_running_loop().call_later(self.retry_seconds, self._enqueue, Key("vm", ns, name))
            return
        self._retiring.pop((ns, name), None)
        self._enqueue(Key("vm", ns, name))

    # -- Events

    def _post(self, obj: Mapping, reason: str, message: str, warning: bool = False) -> None:
        """In the background: an Event never delays a status write."""
        md = obj["metadata"]
        kind = obj.get("kind") or ("VMMigration" if "vmName" in (obj.get("spec") or {}) else "VirtualMachine")
        about = {"apiVersion": obj.get("apiVersion", meta.API_VERSION), "kind": kind,
                 "metadata": {k: md.get(k) for k in ("name", "namespace", "uid", "resourceVersion")}}
        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(
            events.post, about, reason, message, warning=warning, component=meta.CONTROLLER_MANAGER))
        self._background.add(future)
        future.add_done_callback(self._background.discard)


def _snapshots(namespace: str) -> list[dict]:
    res = custom_objects().list_namespaced_custom_object(meta.GROUP, meta.VERSION, namespace, resources.SNAPSHOTS)
    return res.get("items", [])


def register(registry: kopf.OperatorRegistry, cfg: ControllerConfig, index: VMIndex | None = None) -> Migrations:
    migrations = Migrations(cfg.namespace, plan.Limits(cfg.migrations_per_node, cfg.migrations_per_cluster),
                            cfg.retry_seconds, index)

    @kopf.on.event(meta.GROUP, meta.VERSION, resources.MIGRATIONS, id="migrations", registry=registry)
    async def migration_event(event: Mapping, body: kopf.Body, **_) -> None:
        try:
            migrations.on_migration_event(event.get("type"), event.get("object") or body)
        except Exception:  # never a kopf retry storm; the timer and the next event look again
            log.exception("VMMigration event of %s/%s", body["metadata"].get("namespace"), body["metadata"].get("name"))

    # A second handler of the VM events, beside placement's: in memory only, it costs placement nothing.
    @kopf.on.event(meta.GROUP, meta.VERSION, resources.VMS, id="migration-handover", registry=registry)
    async def vm_event(event: Mapping, body: kopf.Body, **_) -> None:
        try:
            migrations.on_vm_event(event.get("type"), event.get("object") or body)
        except Exception:
            log.exception("hand-over check of VM %s/%s", body["metadata"].get("namespace"),
                          body["metadata"].get("name"))

    @kopf.on.cleanup(id="migrations-worker", registry=registry)
    async def stop(**_) -> None:
        migrations.close()

    return migrations
