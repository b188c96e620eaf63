"""Where a VirtualMachine runs: pure decisions over a snapshot of nodes, agents and placed VMs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from libvirt_operator.api import meta, quantity
from libvirt_operator.controller.qos import reserved_cpu_percent

# Condition reasons of `Scheduled` (also the Event reasons' vocabulary).
SCHEDULED = "Scheduled"
NODE_NOT_FOUND = "NodeNotFound"
NO_NODE_AVAILABLE = "NoNodeAvailable"
INSUFFICIENT_MEMORY = "InsufficientMemory"
DISK_CONFLICT = "DiskConflict"
MAC_IN_USE = "MacAddressInUse"
INSUFFICIENT_CPU = "InsufficientCPU"


@dataclass(frozen=True)
class Node:
    name: str
    allocatable_bytes: int
    libvirt: bool = True  # labelled LIBVIRT_NODE_LABEL=true
    cordoned: bool = False  # spec.unschedulable (kubectl cordon)
    cpu_percent: int | None = None  # CPUs x 100 (allocatable, else capacity) for QoS reservations; None: unknown


@dataclass(frozen=True, slots=True)
class DiskUse:
    path: str
    writable: bool


@dataclass(frozen=True, slots=True)
class VMRef:
    """What placement needs to know about one VM (placed or to be placed)."""

    uid: str
    name: str  # namespace/name, for messages
    memory_bytes: int  # what it reserves on its node: memory.maxSize if set, else memory.size
    disks: tuple[DiskUse, ...] = ()
    pinned_node: str | None = None  # spec.nodeName
    node: str | None = None  # the placement label, None while unplaced
    macs: tuple[str, ...] = ()  # the MACs its spec sets (generated ones are unique per domain)
    created: str = ""  # metadata.creationTimestamp (RFC 3339, UTC: sorts as text)
    cpu_reserved: int = 0  # QoS reservation in percent of one host CPU (Q12)


@dataclass(frozen=True)
class Decision:
    node: str | None  # None: cannot be placed now
    reason: str
    message: str


def vm_ref(vm: Mapping) -> VMRef:
    md, spec = vm.get("metadata") or {}, vm.get("spec") or {}
    return VMRef(
        uid=md.get("uid", ""),
        name=f"{md.get('namespace')}/{md.get('name')}",
        memory_bytes=reserved_memory(spec.get("memory") or {}),
        disks=disk_uses(spec, vm.get("status") or {}),
        pinned_node=spec.get("nodeName") or None,
        node=(md.get("labels") or {}).get(meta.NODE_LABEL) or None,
        macs=tuple(i["mac"].lower() for i in spec.get("interfaces") or [] if i.get("mac")),
        created=md.get("creationTimestamp") or "",
        cpu_reserved=reserved_cpu(vm),
    )


def disk_uses(spec: Mapping, status: Mapping) -> tuple[DiskUse, ...]:
    """The files a VM uses and whether it writes them: its spec paths, and the recorded chains in
    status.disks (after a snapshot a disk runs on a leaf: the active file is written, the backing
    chain, the spec path included, is only read)."""
    writes: dict[str, bool] = {}
    read_only = {d.get("name") for d in spec.get("disks") or [] if d.get("readOnly")}
    backing = {p for d in status.get("disks") or [] for p in d.get("backingChain") or []}
    for d in spec.get("disks") or []:
        if d.get("path"):
            writable = d.get("device", "disk") == "disk" and not d.get("readOnly", False) and d["path"] not in backing
            writes[d["path"]] = writes.get(d["path"], False) or writable
    for d in status.get("disks") or []:
        if d.get("path"):
            writable = d.get("device", "disk") == "disk" and d.get("name") not in read_only
            writes[d["path"]] = writes.get(d["path"], False) or writable
        for path in d.get("backingChain") or []:
            writes.setdefault(path, False)
    return tuple(DiskUse(path, writable) for path, writable in writes.items())


def reserved_cpu(vm: Mapping) -> int:
    """The CPU a VM reserves (Q12, percent of one host CPU): its resolved status.qos, else (not resolved
    yet, e.g. just created) its own spec.qos, which resolution puts first anyway. A VM whose QoS resolved
    invalid reserves nothing (the agent applies none of it)."""
    status_qos = (vm.get("status") or {}).get("qos")
    if status_qos:
        return reserved_cpu_percent(status_qos)
    value = ((((vm.get("spec") or {}).get("qos") or {}).get("cpu") or {}).get("reservationPercent"))
    return value if isinstance(value, int) and value > 0 else 0


def cpu_shortage(vm: VMRef, node: Node, view: View) -> str | None:
    """A message if the reservations of the VMs on `node` leave too little CPU for `vm`'s reservation."""
    if not vm.cpu_reserved or node.cpu_percent is None:
        return None
    held = [o.cpu_reserved for o in view.on(node.name) if o.uid != vm.uid]
    room = node.cpu_percent - sum(held)
    if room >= vm.cpu_reserved:
        return None
    return (f"node {node.name} has {node.cpu_percent}% CPU, {sum(held)}% reserved by {len(held)} VM(s); "
            f"the VM reserves {vm.cpu_reserved}%")


def reserved_memory(memory: Mapping) -> int:
    """What a VM holds on its node: its ceiling `maxSize` (it may grow to it live), else `size`."""
    size = quantity.to_bytes(memory.get("size", "0"))
    ceiling = memory.get("maxSize")
    return max(size, quantity.to_bytes(ceiling)) if ceiling else size


def human_bytes(n: int) -> str:
    """Compact binary units: 2Gi, 1.5Gi, 512Mi."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


class View(Protocol):
    """What a decision reads about the VMs already known (controller.index.VMIndex is one)."""

    def used(self, node: str) -> int: ...  # memory reserved on the node
    def on(self, node: str) -> Iterable[VMRef]: ...  # the VMs placed on it
    def holders(self, macs: Iterable[str]) -> list[VMRef]: ...  # VMs (placed or not) with one of these MACs
    def get(self, uid: str) -> VMRef | None: ...


class ListView:
    """A View over plain lists: `placed` VMs (with a node) and `others` (any VM, for MACs)."""

    def __init__(self, placed: Iterable[VMRef], others: Iterable[VMRef] = ()):
        self._by_uid: dict[str, VMRef] = {vm.uid: vm for vm in others}
        self._by_uid.update({vm.uid: vm for vm in placed if vm.node})
        self._used = used_memory(self._by_uid.values())
        self._on: dict[str, list[VMRef]] = {}
        for vm in self._by_uid.values():
            if vm.node:
                self._on.setdefault(vm.node, []).append(vm)

    def used(self, node: str) -> int:
        return self._used.get(node, 0)

    def on(self, node: str) -> Iterable[VMRef]:
        return self._on.get(node, ())

    def holders(self, macs: Iterable[str]) -> list[VMRef]:
        macs = set(macs)
        return [vm for vm in self._by_uid.values() if macs.intersection(vm.macs)]

    def get(self, uid: str) -> VMRef | None:
        return self._by_uid.get(uid)


def used_memory(placed: Iterable[VMRef]) -> dict[str, int]:
    used: dict[str, int] = {}
    for vm in placed:
        if vm.node:
            used[vm.node] = used.get(vm.node, 0) + vm.memory_bytes
    return used


def disk_conflict(vm: VMRef, node: str, placed: Iterable[VMRef]) -> str | None:
    """A message if another VM on `node` uses one of vm's disk paths and either side writes to it."""
    if not vm.disks:
        return None
    for other in placed:
        if other.node != node or other.uid == vm.uid:
            continue
        for mine in vm.disks:
            for theirs in other.disks:
                if mine.path == theirs.path and (mine.writable or theirs.writable):
                    return f"disk {mine.path} is already used by VM {other.name} on node {node}"
    return None


def precedes(a: VMRef, b: VMRef) -> bool:
    """Whether `a` was created before `b` (ties broken by UID, so every controller agrees)."""
    return (a.created, a.uid) < (b.created, b.uid)


def mac_conflict(vm: VMRef, holders: Iterable[VMRef]) -> str | None:
    """A message if another VM among `holders` (VMs with one of vm's MACs) already holds one:
    a placed one, or one created earlier. The later VM waits; the earlier one is placed as if
    the later did not exist.
    """
    if not vm.macs:
        return None
    mine = set(vm.macs)
    holders = sorted((o for o in holders if o.uid != vm.uid and mine.intersection(o.macs)
                      and (o.node is not None or precedes(o, vm))), key=lambda o: (o.created, o.uid))
    if not holders:
        return None
    other = holders[0]
    mac = next(m for m in vm.macs if m in other.macs)
    where = f"placed on node {other.node}" if other.node else "created earlier, not placed yet"
    return f"MAC {mac} is already used by VM {other.name} ({where})"


def decide(vm: VMRef, nodes: Iterable[Node], alive: set[str], placed: Iterable[VMRef],
           others: Iterable[VMRef] = ()) -> Decision:
    """Choose a node for an unplaced VM: its pinned node if valid, else the live node with most free memory.

    `placed`: the VMs on nodes (their memory and disks count); `others`: every other VM known,
    placed or not (for MACs, which are unique cluster-wide).
    """
    return decide_in(vm, nodes, alive, ListView([p for p in placed if p.uid != vm.uid],
                                                [o for o in others if o.uid != vm.uid]))


def decide_in(vm: VMRef, nodes: Iterable[Node], alive: set[str], view: View) -> Decision:
    """`decide` over a View of the known VMs (which may include `vm` itself: it never counts)."""
    conflict = mac_conflict(vm, view.holders(vm.macs)) if vm.macs else None
    if conflict:
        return Decision(None, MAC_IN_USE, conflict)
    nodes = list(nodes)
    if vm.pinned_node:
        return _check_pinned(vm, {n.name: n for n in nodes}.get(vm.pinned_node), view)
    return _choose(vm, nodes, alive, view)


def _used_by_others(vm: VMRef, node: str, view: View) -> int:
    me = view.get(vm.uid)
    return view.used(node) - (me.memory_bytes if me is not None and me.node == node else 0)


def _check_pinned(vm: VMRef, node: Node | None, view: View) -> Decision:
    need = vm.memory_bytes
    if node is None:
        return Decision(None, NODE_NOT_FOUND, f"node {vm.pinned_node} (spec.nodeName) does not exist")
    if node.allocatable_bytes < need:
        return Decision(None, INSUFFICIENT_MEMORY,
                        f"node {node.name} has {human_bytes(node.allocatable_bytes)} allocatable memory, "
                        f"the VM needs {human_bytes(need)}")
    short = cpu_shortage(vm, node, view)
    if short:
        return Decision(None, INSUFFICIENT_CPU, short)
    conflict = disk_conflict(vm, node.name, view.on(node.name))
    if conflict:
        return Decision(None, DISK_CONFLICT, conflict)
    return Decision(node.name, SCHEDULED, f"placed on node {node.name} (spec.nodeName)")


def _choose(vm: VMRef, nodes: list[Node], alive: set[str], view: View) -> Decision:
    need = vm.memory_bytes
    libvirt = [n for n in nodes if n.libvirt]
    live = [n for n in libvirt if n.name in alive and not n.cordoned]
    if not live:
        return Decision(None, NO_NODE_AVAILABLE, _why_none_live(libvirt, alive))
    free = {n.name: n.allocatable_bytes - _used_by_others(vm, n.name, view) for n in live}
    roomy = [n for n in live if free[n.name] >= need]
    if not roomy:
        return Decision(None, INSUFFICIENT_MEMORY, _why_no_room(need, live, free))
    if vm.cpu_reserved:
        shortages = {n.name: cpu_shortage(vm, n, view) for n in roomy}
        if all(shortages.values()):
            return Decision(None, INSUFFICIENT_CPU, "; ".join(shortages[n.name] for n in roomy[:5]))
        roomy = [n for n in roomy if not shortages[n.name]]
    conflicts = {n.name: disk_conflict(vm, n.name, view.on(n.name)) for n in roomy}
    fitting = [n for n in roomy if not conflicts[n.name]]
    if not fitting:
        return Decision(None, DISK_CONFLICT, "; ".join(conflicts[n.name] for n in roomy))
    best = min(fitting, key=lambda n: (-free[n.name], n.name))
    return Decision(best.name, SCHEDULED,
                    f"placed on node {best.name} ({human_bytes(free[best.name])} of "
                    f"{human_bytes(best.allocatable_bytes)} memory was free, the VM needs {human_bytes(need)})")


def _why_none_live(libvirt: list[Node], alive: set[str]) -> str:
    if not libvirt:
        return f"no node is labelled {meta.LIBVIRT_NODE_LABEL}=true"
    no_agent = sorted(n.name for n in libvirt if n.name not in alive)
    cordoned = sorted(n.name for n in libvirt if n.name in alive and n.cordoned)
    parts = []
    if no_agent:
        parts.append(f"{len(no_agent)} without a live agent ({_names(no_agent)})")
    if cordoned:
        parts.append(f"{len(cordoned)} cordoned ({_names(cordoned)})")
    return f"no libvirt node can take the VM: of {len(libvirt)}, " + ", ".join(parts)


def _why_no_room(need: int, live: list[Node], free: dict[str, int]) -> str:
    ranked = sorted(live, key=lambda n: (-free[n.name], n.name))[:5]
    shown = ", ".join(
        f"{n.name} {human_bytes(max(free[n.name], 0))} free of {human_bytes(n.allocatable_bytes)}" for n in ranked
    )
    more = f" and {len(live) - len(ranked)} more" if len(live) > len(ranked) else ""
    return f"the VM needs {human_bytes(need)} of memory; no live node has room: {shown}{more}"


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", +{len(names) - limit}" if len(names) > limit else "")
