"""VMMigrations: the controller's pure decisions (controller/migrations.py reads and writes).

- `validate`: a new (or queued) VMMigration against its VM, the VM's snapshots, the other migrations,
  the nodes and live agents and what the VMs hold on them: Failed with a reason, Pending (queued behind
  the parallel limits) or started (PreChecking on the target; a Storage move goes Running on its node).
- `advance`: PreChecking → Running once the target agent passed its pre-check (label back to the source).
- `handover`: the VM side, level-triggered on the VM's status.migration (the durable fact the agents
  write): the node label to the target once the domain landed there, the source agent's status field
  managers retired, and the VMMigration's HandingOver and Succeeded.
- the status each step applies (the whole status as last read, merged with the step's changes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from libvirt_operator.api import meta
from libvirt_operator.api.vmmigration import TERMINAL_PHASES
from libvirt_operator.controller import placement
from libvirt_operator.controller.placement import Node, View, VMRef
from libvirt_operator.kube import conditions
from libvirt_operator.kube.conditions import Cond

ACTIVE_PHASES = ("PreChecking", "Running", "HandingOver")
MOVING_TYPES = ("Live", "WholeMachine")  # to another node (Storage stays on the VM's node)

# Bad-input reasons (phase Failed, condition Ready=False).
VM_NOT_FOUND = "VMNotFound"
VM_NOT_PLACED = "VMNotPlaced"
VM_NOT_RUNNING = "VMNotRunning"
SAME_NODE = "SameNode"
TARGET_NOT_FOUND = "TargetNotFound"
TARGET_UNAVAILABLE = "TargetUnavailable"
INSUFFICIENT_MEMORY = placement.INSUFFICIENT_MEMORY
MIGRATION_IN_PROGRESS = "MigrationInProgress"
OPERATION_IN_PROGRESS = "OperationInProgress"
QUEUED = "Queued"  # phase Pending, condition Ready=False
SUCCEEDED = "Succeeded"

READY = "Ready"
PRECHECKED = "PreChecked"


@dataclass(frozen=True)
class Limits:
    per_node: int = 2  # active migrations a node takes part in, as source or target
    per_cluster: int = 5


@dataclass(frozen=True)
class MigrationRef:
    """What limits and conflicts need of one VMMigration."""

    uid: str
    namespace: str
    name: str
    vm_name: str
    type: str
    phase: str | None
    created: str  # metadata.creationTimestamp (RFC 3339, UTC: sorts as text)
    source: str | None
    target: str | None
    vm_uid: str | None = None
    deleting: bool = False

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def key(self) -> tuple[str, str]:
        return (self.created, self.name)

    def nodes(self) -> set[str]:
        return {n for n in (self.source, self.target) if n}


def migration_ref(obj: Mapping) -> MigrationRef:
    md, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    return MigrationRef(
        uid=md.get("uid", ""), namespace=md.get("namespace", ""), name=md.get("name", ""),
        vm_name=spec.get("vmName", ""), type=spec.get("type") or "Live", phase=status.get("phase"),
        created=md.get("creationTimestamp") or "", source=status.get("sourceNode"),
        target=status.get("targetNode"), vm_uid=status.get("vmUid"), deleting=bool(md.get("deletionTimestamp")))


def queued(obj: Mapping) -> bool:
    """A VMMigration waiting behind the limits (looked at again when another one ends)."""
    status = obj.get("status") or {}
    ready = conditions.find(status, READY)
    return status.get("phase") == "Pending" and ready is not None and ready.get("reason") == QUEUED


# -- validation and the start ------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    action: str  # "fail" | "queue" | "start"
    reason: str
    message: str
    phase: str | None = None  # start: PreChecking (Live, WholeMachine) or Running (Storage)
    source: str | None = None
    target: str | None = None
    label: str | None = None  # start: the node whose agent acts on the VMMigration now

    @property
    def failed(self) -> bool:
        return self.action == "fail"


def _fail(reason: str, message: str) -> Verdict:
    return Verdict("fail", reason, message)


def node_label(obj: Mapping) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(meta.NODE_LABEL) or None


def validate(migration: Mapping, vm: Mapping | None, snapshots: Iterable[Mapping],
             migrations: Iterable[MigrationRef], nodes: Iterable[Node], alive: set[str], view: View,
             limits: Limits) -> Verdict:
    """What to do with a VMMigration in phase Pending (or none yet).

    `snapshots`: the VMSnapshots of the migration's namespace; `migrations`: every VMMigration of the
    cluster (this one may be among them); `nodes`: the libvirt nodes (or just the requested target);
    `view`: the VMs as placement sees them (memory, CPU and disks held per node)."""
    me = migration_ref(migration)
    vm_id = f"{me.namespace}/{me.vm_name}"
    if vm is None:
        return _fail(VM_NOT_FOUND, f"VirtualMachine {vm_id} does not exist")
    source = node_label(vm)
    if source is None:
        return _fail(VM_NOT_PLACED, f"VirtualMachine {vm_id} is not placed on a node yet")
    vm_status = vm.get("status") or {}
    phase = vm_status.get("phase")
    if phase != "Running":
        return _fail(VM_NOT_RUNNING, f"VirtualMachine {vm_id} is {phase or 'not running yet'}: only a running VM "
                     "is migrated (a stopped one has no live state to move); start it first")
    others = [m for m in migrations if m.uid != me.uid and m.namespace == me.namespace and m.vm_name == me.vm_name
              and not m.finished]
    busy = _migration_in_progress(me, others, vm_status.get("migration"))
    if busy:
        return _fail(MIGRATION_IN_PROGRESS, busy)
    for snap in snapshots:
        if (snap.get("spec") or {}).get("vmName") == me.vm_name and (snap.get("status") or {}).get(
                "phase") == "InProgress":
            return _fail(OPERATION_IN_PROGRESS, f"VMSnapshot {me.namespace}/{snap['metadata']['name']} of the VM "
                         "is in progress; migrate after it finished")
    active = [m for m in migrations if m.uid != me.uid and m.active]
    if me.type not in MOVING_TYPES:  # Storage: on the VM's own node
        full = _over_limits(source, source, active, limits)
        if full:
            return Verdict("queue", QUEUED, full, source=source, target=source)
        return Verdict("start", "Running", f"the agent of node {source} moves the disks", phase="Running",
                       source=source, target=source, label=source)
    target, problem = _target(migration, vm, source, nodes, alive, _Inbound(view, active, vm))
    if problem is not None:
        return problem
    full = _over_limits(source, target, active, limits)
    if full:
        return Verdict("queue", QUEUED, full, source=source, target=target)
    return Verdict("start", "PreChecking", f"the agent of node {target} checks that it can take the VM from node "
                   f"{source}", phase="PreChecking", source=source, target=target, label=target)


def undecided_elders(migration: Mapping, migrations: Iterable[MigrationRef]) -> list[MigrationRef]:
    """The older VMMigrations of the same VM not validated yet (no phase), oldest first: the older one
    wins, so they are decided first (one may fail, and then no longer stands in the way)."""
    me = migration_ref(migration)
    return sorted((m for m in migrations if m.uid != me.uid and m.namespace == me.namespace
                   and m.vm_name == me.vm_name and m.phase is None and not m.deleting and m.key < me.key),
                  key=lambda m: m.key)


def _migration_in_progress(me: MigrationRef, others: list[MigrationRef], vm_migration: Mapping | None) -> str | None:
    for other in sorted(others, key=lambda m: m.key):
        if other.active or other.key < me.key:  # the older one wins
            return (f"VMMigration {other.namespace}/{other.name} of the VM is {other.phase or 'Pending'}; "
                    "one migration of a VM at a time")
    if vm_migration and vm_migration.get("state") in ("Migrating", "Landed") and vm_migration.get("uid") != me.uid:
        return (f"the VM's status.migration says {vm_migration.get('name')} is {vm_migration.get('state')}; "
                "one migration of a VM at a time")
    return None


def _over_limits(source: str, target: str, active: list[MigrationRef], limits: Limits) -> str | None:
    if len(active) >= limits.per_cluster:
        return (f"{len(active)} migrations are active in the cluster (limit {limits.per_cluster}, "
                "LVO_MIGRATIONS_PER_CLUSTER); queued until one ends")
    for node in dict.fromkeys((source, target)):
        count = sum(1 for m in active if node in m.nodes())
        if count >= limits.per_node:
            return (f"node {node} takes part in {count} active migrations (limit {limits.per_node}, "
                    "LVO_MIGRATIONS_PER_NODE); queued until one ends")
    return None


class _Inbound:
    """A placement View that also counts, on each target, the memory of the VMs migrating to it
    (they still count on their source until the hand-over)."""

    def __init__(self, view: View, active: list[MigrationRef], vm: Mapping):
        self._view = view
        self._extra: dict[str, int] = {}
        me = (vm.get("metadata") or {}).get("uid")
        for m in active:
            if m.type in MOVING_TYPES and m.target and m.vm_uid and m.vm_uid != me:
                ref = view.get(m.vm_uid)
                if ref is not None and ref.node != m.target:
                    self._extra[m.target] = self._extra.get(m.target, 0) + ref.memory_bytes

    def used(self, node: str) -> int:
        return self._view.used(node) + self._extra.get(node, 0)

    def on(self, node: str) -> Iterable[VMRef]:
        return self._view.on(node)

    def holders(self, macs: Iterable[str]) -> list[VMRef]:
        return self._view.holders(macs)

    def get(self, uid: str) -> VMRef | None:
        return self._view.get(uid)


def _target(migration: Mapping, vm: Mapping, source: str, nodes: Iterable[Node], alive: set[str],
            view: View) -> tuple[str | None, Verdict | None]:
    """The target node (spec.targetNode, or placement's choice among the other nodes), or why not."""
    wanted = (migration.get("spec") or {}).get("targetNode")
    # The VM as it would be placed afresh: unpinned (the migration chooses), MACs already its own.
    ref = dataclasses.replace(placement.vm_ref(vm), pinned_node=None, macs=())
    nodes = list(nodes)
    if wanted:
        if wanted == source:
            return None, _fail(SAME_NODE, f"the VM already runs on node {source}; a {migration['spec'].get('type')} "
                               "migration goes to another node (a Storage migration moves disks on the same node)")
        node = next((n for n in nodes if n.name == wanted), None)
        if node is None:
            return None, _fail(TARGET_NOT_FOUND, f"node {wanted} (spec.targetNode) does not exist")
        if not node.libvirt:
            return None, _fail(TARGET_UNAVAILABLE, f"node {wanted} is not labelled {meta.LIBVIRT_NODE_LABEL}=true")
        if wanted not in alive:
            return None, _fail(TARGET_UNAVAILABLE, f"node {wanted} has no live agent (its Lease is not renewed)")
        if node.cordoned:
            return None, _fail(TARGET_UNAVAILABLE, f"node {wanted} is cordoned")
        candidates = [node]
    else:
        candidates = [n for n in nodes if n.name != source]
    decision = placement.decide_in(ref, candidates, alive, view)
    if decision.node is not None:
        return decision.node, None
    if decision.reason == placement.NO_NODE_AVAILABLE:
        return None, _fail(TARGET_UNAVAILABLE, f"no other node can take the VM: {decision.message}")
    return None, _fail(decision.reason, decision.message)


# -- PreChecking → Running --------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    label: str | None = None  # the node label to set first
    phase: str | None = None  # then this phase (Running; or Failed, with reason and message)
    reason: str = ""
    message: str = ""


def _passed(status: Mapping) -> bool:
    checked = conditions.find(status, PRECHECKED)
    return bool(status.get("target")) and checked is not None and checked.get("status") == "True"


def awaits_target(migration: Mapping) -> bool:
    """PreChecking with the target's agent (labelled for it), its answer not written yet: whether that
    agent still lives is worth asking (a node gone for good must not hold the VM's migrations)."""
    status = migration.get("status") or {}
    return (status.get("phase") == "PreChecking" and bool(status.get("targetNode"))
            and node_label(migration) == status.get("targetNode") and not _passed(status)
            and not (migration.get("metadata") or {}).get("deletionTimestamp"))


def advance(migration: Mapping, target_alive: bool = True) -> Step | None:
    """A started VMMigration's next controller step: its label where its phase wants it, Running once
    the target agent wrote status.target and PreChecked=True, Failed if that agent's Lease ran out
    before it answered (`target_alive`). None: the agents' turn."""
    status = migration.get("status") or {}
    phase, label = status.get("phase"), node_label(migration)
    source, target = status.get("sourceNode"), status.get("targetNode")
    if (migration.get("metadata") or {}).get("deletionTimestamp") or not source or not target:
        return None
    if phase == "PreChecking":
        if _passed(status):
            return Step(label=None if label == source else source, phase="Running")
        if label != target:
            return Step(label=target)
        if not target_alive:
            return Step(phase="Failed", reason=TARGET_UNAVAILABLE,
                        message=f"the agent of node {target} stopped renewing its Lease before its pre-check "
                        "answered; the VM stays on node " + source)
        return None
    if phase == "Running" and label != source:
        return Step(label=source)
    return None


# -- the hand-over ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HandOver:
    flip_to: str | None = None  # set the VM's node label to this node (conditional on its resourceVersion)
    retire: str | None = None  # the source node whose agent's status field managers go
    # before the retire: this node's agent managers co-own what must outlive the source's (`kept_fields`)
    keep_as: str | None = None
    phase: str | None = None  # the VMMigration's next phase: HandingOver | Succeeded

    def __bool__(self) -> bool:
        return any((self.flip_to, self.retire, self.phase))


def retired_managers(node: str) -> tuple[str, str]:
    return meta.agent_manager(node), meta.agent_jobs_manager(node)


def kept_fields(vm: Mapping, source: str, target: str) -> list[tuple[str, Any, str]]:
    """(field, value, target's manager) of the VM's status that the source's retired managers own and that
    must not go with them: status.phase (the domain runs, on the target now) under the target's
    reconciler manager, and status.migration (the durable fact; the agents write it under their migration
    manager, which is not retired, so only if a retired one holds it) under the target's migration manager."""
    status = vm.get("status") or {}
    retired = set(retired_managers(source))
    owned: set[str] = set()
    for entry in (vm.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") in retired:
            owned.update(((entry.get("fieldsV1") or {}).get("f:status") or {}).keys())
    return [(field, status[field], manager) for field, manager in (
        ("phase", meta.agent_manager(target)), ("migration", meta.agent_migration_manager(target)))
        if f"f:{field}" in owned and status.get(field) is not None]


def owns_status(vm: Mapping, managers: Iterable[str]) -> bool:
    """Whether one of `managers` still owns a field of the VM's status (per metadata.managedFields)."""
    managers = set(managers)
    for entry in (vm.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") in managers and ((entry.get("fieldsV1") or {}).get("f:status")):
            return True
    return False


SOURCE_LAST_STEP = "HandOver"  # the source agent's last write: phase HandingOver, step HandOver


def source_done(migration: Mapping | None) -> bool:
    """Whether the source agent wrote its last VMMigration status (after that it only drops its finalizer)."""
    status = (migration or {}).get("status") or {}
    return status.get("phase") == "HandingOver" and status.get("step") == SOURCE_LAST_STEP


def waits_for_source(vm: Mapping, migration: Mapping | None) -> bool:
    """Whether Succeeded would wait for the source agent's last write (then ask whether that agent lives:
    a source node gone for good must not hold the VMMigration forever)."""
    fact = (vm.get("status") or {}).get("migration") or {}
    return (fact.get("state") == "Succeeded" and fact.get("sourceNode") != fact.get("targetNode")
            and migration is not None and not source_done(migration))


def handover(vm: Mapping, migration: Mapping | None, source_alive: bool = True,
             retiring: bool = False) -> HandOver:
    """The next hand-over step for a VM, from its status.migration (and its VMMigration, if it still
    exists and is the one status.migration names). One kind of step at a time: the caller does it and
    asks again on what the write returned.

    The flip; the source's retire (what only the source agent said goes, not to be shown as the
    target's meanwhile); HandingOver while the target adopts; Succeeded. Succeeded comes before a retire
    still pending once it is due (the adoption landed while the retire was not done yet).

    Succeeded waits for the source agent's last status write (`source_done`) while that agent lives
    (`source_alive`): the agent applies its whole status by force, and a write of it after Succeeded
    would take the phase back.

    `retiring`: the retire runs already (beside the other steps, which write the VMMigration only)."""
    fact = (vm.get("status") or {}).get("migration") or {}
    state, source, target = fact.get("state"), fact.get("sourceNode"), fact.get("targetNode")
    if state not in ("Landed", "Succeeded") or not source or not target:
        return HandOver()
    label = node_label(vm)
    moving = source != target
    if moving:
        if state == "Landed" and label == source:
            return HandOver(flip_to=target)
        if label != target:
            return HandOver()  # on neither node of this migration: a later placement; nothing of ours
    mig_status = (migration or {}).get("status") or {}
    ours = (migration is not None and (migration.get("metadata") or {}).get("uid") == fact.get("uid")
            and mig_status.get("phase") not in TERMINAL_PHASES)
    # Succeeded as soon as it is due, even before a retire still pending (that one follows)
    if ours and state == "Succeeded" and not (moving and source_alive and not source_done(migration)):
        return HandOver(phase="Succeeded")
    if moving and not retiring and owns_status(vm, retired_managers(source)):
        return HandOver(retire=source, keep_as=target)
    if ours and moving and state == "Landed" and mig_status.get("phase") != "HandingOver":
        return HandOver(phase="HandingOver")
    return HandOver()  # the target's adoption, or the source's last write, comes first (their events bring us back)


def vm_needs_handover(vm: Mapping, migration_phase: str | None) -> bool:
    """The cheap check on every VM event (no API call): whether `handover` has a step.
    `migration_phase`: the phase the watch last showed for the VMMigration status.migration names
    (None: not known)."""
    fact = (vm.get("status") or {}).get("migration") or {}
    if fact.get("state") not in ("Landed", "Succeeded"):
        return False
    known = None if migration_phase is None else {"metadata": {"uid": fact.get("uid")},
                                                  "status": {"phase": migration_phase, "step": SOURCE_LAST_STEP}}
    return bool(handover(vm, known))


# -- status -----------------------------------------------------------------------------------------

def merged_status(migration: Mapping, changes: Mapping[str, Any], ready: Cond | None = None) -> dict:
    """The VMMigration's whole status as read, with `changes` and the Ready condition (others kept)."""
    old = dict(migration.get("status") or {})
    status = {**old, **changes}
    generation = (migration.get("metadata") or {}).get("generation")
    if generation is not None:
        status["observedGeneration"] = generation
    if ready is not None:
        existing = old.get("conditions") or []
        rendered = conditions.render([ready], existing, generation)
        status["conditions"] = [c for c in existing if c.get("type") != ready.type] + rendered
    return {k: v for k, v in status.items() if v is not None}


def failed_status(migration: Mapping, reason: str, message: str) -> dict:
    return merged_status(migration, {"phase": "Failed"}, Cond(READY, False, reason, message))


def queued_status(migration: Mapping, message: str) -> dict:
    return merged_status(migration, {"phase": "Pending"}, Cond(READY, False, QUEUED, message))


def started_status(migration: Mapping, verdict: Verdict, vm_uid: str, now: str) -> dict:
    return merged_status(migration, {"phase": verdict.phase, "sourceNode": verdict.source,
                                     "targetNode": verdict.target, "vmUid": vm_uid, "startTime": now},
                         Cond(READY, False, verdict.phase, verdict.message))


def running_status(migration: Mapping) -> dict:
    status = migration.get("status") or {}
    return merged_status(migration, {"phase": "Running"}, Cond(
        READY, False, "Running", f"the agent of node {status.get('sourceNode')} migrates the VM to node "
        f"{status.get('targetNode')}"))


def handing_over_status(migration: Mapping) -> dict:
    status = migration.get("status") or {}
    return merged_status(migration, {"phase": "HandingOver"}, Cond(
        READY, False, "HandingOver", f"the VM runs on node {status.get('targetNode')}; its agent takes it over"))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def stamp(at: datetime) -> str:
    """RFC 3339 in UTC with milliseconds (startTime, completionTime: durations to the millisecond)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def succeeded_status(migration: Mapping, now: datetime) -> dict:
    """Succeeded, completed now; or when it was recorded before (written again: the phase was taken back)."""
    status = migration.get("status") or {}
    started = parse_time(status.get("startTime"))
    if status.get("completionTime") and status.get("durationMilliseconds") is not None:
        completion, duration = status["completionTime"], status["durationMilliseconds"]
    else:
        completion = stamp(now)
        duration = max(0, round((now - started).total_seconds() * 1000)) if started else None
    return merged_status(migration, {"phase": "Succeeded", "completionTime": completion,
                                     "durationMilliseconds": duration},
                         Cond(READY, True, SUCCEEDED, migrated_message(migration, duration)))


def migrated_message(migration: Mapping, duration_ms: int | None) -> str:
    status = migration.get("status") or {}
    kind = (migration.get("spec") or {}).get("type") or "Live"
    took = f" in {duration_ms / 1000:.1f} s" if duration_ms is not None else ""
    if kind not in MOVING_TYPES:
        return f"the disks moved on node {status.get('sourceNode')}{took}"
    return f"{kind} migration from node {status.get('sourceNode')} to node {status.get('targetNode')}{took}"


def now_utc() -> datetime:
    return datetime.now(UTC)
