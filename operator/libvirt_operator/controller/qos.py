"""Effective QoS of VMs: their own spec.qos over the VMQosPolicies that select them. Pure functions.

Rules (documented for users in api/vmqospolicy.py):
- A policy applies to the VMs of its namespace whose labels its selector matches (an empty selector
  matches all of them). A VM being deleted still resolves (its status is simply not written).
- Values are resolved one setting at a time. The settings are: cpu.shares, cpu.limitPercent,
  cpu.minPercent, cpu.reservationPercent, memory.hardLimit, memory.softLimit, memory.guarantee; per NIC
  inbound, outbound (each a whole Rate), queues (the whole list), priority, vlan, portGroup; per disk the
  whole I/O tune (total and read/write exclude each other, so halves are never mixed).
- For each setting the VM's spec.qos wins; else the strongest policy that sets it: higher priority, then
  the name that sorts first. When the winner ties on priority with another policy that sets a different
  value, that is a conflict: the tie-break still decides (deterministically), and the conflict is reported.
- Then the combination is checked (limits below reservations, reservations beyond the VM's vCPUs,
  a guarantee above the VM's memory, settings for interfaces or disks the VM does not have, queues on a
  NIC without a rate). A VM that fails gets `valid: false` with one reason and message, and the agent
  keeps what it had applied: nothing is half-applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from libvirt_operator.api import quantity
from libvirt_operator.api.qos import PortGroupRef, QosSpec
from libvirt_operator.api.vmqospolicy import VMQosPolicySpec

SPEC = "spec"

# Reasons of an invalid status.qos
LIMIT_BELOW_RESERVATION = "LimitBelowReservation"
EXCEEDS_VM = "ExceedsVM"
UNKNOWN_DEVICE = "UnknownDevice"
QUEUES_WITHOUT_RATE = "QueuesWithoutRate"
INVALID_SPEC = "InvalidQosSpec"
# Policy phases / reasons
ACTIVE, IDLE, DEGRADED = "Active", "Idle", "Degraded"
NO_MATCH = "NoMatchingVMs"
POLICY_CONFLICT = "PolicyConflict"


def policy_source(name: str) -> str:
    return f"policy/{name}"


# -- selectors ------------------------------------------------------------------------------------

def selector_matches(selector: Mapping | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions; empty matches all)."""
    selector, labels = selector or {}, labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req.get("key"), req.get("operator"), req.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


# -- policies -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    priority: int
    spec: VMQosPolicySpec
    raw_selector: dict

    @property
    def source(self) -> str:
        return policy_source(self.name)

    @property
    def rank(self) -> tuple[int, str]:
        return (-self.priority, self.name)


def policy_of(body: Mapping) -> Policy | None:
    """A parsed policy; None if its spec does not parse (the API server's schema normally prevents that)."""
    md = body.get("metadata") or {}
    try:
        spec = VMQosPolicySpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
    return Policy(md.get("namespace", ""), md.get("name", ""), spec.priority, spec,
                  dict((body.get("spec") or {}).get("selector") or {}))


def ranked(policies: Iterable[Policy]) -> list[Policy]:
    return sorted(policies, key=lambda p: p.rank)


# -- resolution -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    source: str
    priority: int | None  # None for the VM's own spec
    value: Any


@dataclass
class Resolution:
    """One VM's result: `status` is the wire form of status.qos (api.qos.QosStatus)."""

    status: dict[str, Any]
    matched: list[str]  # policy names, strongest first
    conflicts: list[dict] = field(default_factory=list)  # wire form of QosConflict

    @property
    def valid(self) -> bool:
        return bool(self.status.get("valid"))


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _choose(setting: str, candidates: list[Candidate], conflicts: list[dict]) -> dict | None:
    """{value, source} of the winning candidate (first = strongest); records a tie it had to break."""
    present = [c for c in candidates if c.value is not None]
    if not present:
        return None
    win = present[0]
    if win.priority is not None:
        rivals = [c for c in present[1:] if c.priority == win.priority and _dump(c.value) != _dump(win.value)]
        if rivals:
            losers = [c.source for c in rivals]
            conflicts.append({
                "field": setting, "winner": win.source, "losers": losers,
                "message": f"{setting}: {', '.join([win.source, *losers])} have priority {win.priority} and "
                           f"disagree; {win.source} wins (equal priority: the name that sorts first)",
            })
    return {"value": _dump(win.value), "source": win.source}


def _vm_spec_qos(spec: Mapping) -> QosSpec:
    return QosSpec.model_validate(spec.get("qos") or {})


def resolve(vm: Mapping, policies: Iterable[Policy]) -> Resolution:
    """The effective QoS of one VM given the policies of its namespace."""
    md, spec = vm.get("metadata") or {}, vm.get("spec") or {}
    generation = md.get("generation")
    namespace = md.get("namespace")
    matching = ranked(p for p in policies
                      if p.namespace == namespace and selector_matches(p.raw_selector, md.get("labels")))
    names = [p.name for p in matching]
    try:
        own = _vm_spec_qos(spec)
    except ValidationError as exc:
        return Resolution(_invalid(INVALID_SPEC, f"spec.qos does not parse: {exc.errors()[0]['msg']}",
                                   names, generation), names)
    conflicts: list[dict] = []
    status: dict[str, Any] = {"valid": True, "policies": names}
    if generation is not None:
        status["observedGeneration"] = generation

    def block(kind: str, keys: tuple[str, ...]) -> dict | None:
        mine = getattr(own, kind)
        out = {}
        for key in keys:
            cands = [Candidate(SPEC, None, getattr(mine, key) if mine else None)]
            cands += [Candidate(p.source, p.priority, getattr(getattr(p.spec, kind), key, None)
                                if getattr(p.spec, kind) else None) for p in matching]
            chosen = _choose(f"{kind}.{_camel(key)}", cands, conflicts)
            if chosen is not None:
                out[_camel(key)] = chosen
        return out or None

    cpu = block("cpu", ("shares", "limit_percent", "min_percent", "reservation_percent"))
    memory = block("memory", ("hard_limit", "soft_limit", "guarantee"))
    if cpu:
        status["cpu"] = cpu
    if memory:
        status["memory"] = memory

    interfaces = [i.get("name") for i in spec.get("interfaces") or []]
    own_nics = {n.name: n for n in own.network}
    nics = []
    for nic in interfaces:
        mine = own_nics.get(nic)
        applicable = [p for p in matching if p.spec.network is not None
                      and (not p.spec.network.interfaces or nic in p.spec.network.interfaces)]
        entry: dict[str, Any] = {"name": nic}
        for key in ("inbound", "outbound", "queues", "priority", "vlan"):
            cands = [Candidate(SPEC, None, getattr(mine, key) if mine else None)]
            cands += [Candidate(p.source, p.priority, getattr(p.spec.network, key)) for p in applicable]
            chosen = _choose(f"network[{nic}].{key}", cands, conflicts)
            if chosen is not None:
                entry[key] = chosen
        groups = [Candidate(p.source, p.priority, _port_group(p)) for p in applicable]
        chosen = _choose(f"network[{nic}].portGroup", groups, conflicts)
        if chosen is not None:
            entry["portGroup"] = chosen
        if len(entry) > 1:
            nics.append(entry)
    if nics:
        status["network"] = nics

    disks = [d.get("name") for d in spec.get("disks") or [] if d.get("device", "disk") == "disk"]
    own_disks = {d.name: d for d in own.disks}
    tuned = []
    for disk in disks:
        cands = [Candidate(SPEC, None, _io_tune(own_disks.get(disk)))]
        cands += [Candidate(p.source, p.priority, _io_tune(p.spec.disk_io)) for p in matching
                  if p.spec.disk_io is not None and (not p.spec.disk_io.disks or disk in p.spec.disk_io.disks)]
        chosen = _choose(f"disks[{disk}].ioTune", cands, conflicts)
        if chosen is not None:
            tuned.append({"name": disk, "ioTune": chosen})
    if tuned:
        status["disks"] = tuned
    if conflicts:
        status["conflicts"] = conflicts

    problem = _check(spec, own, status, interfaces, [d.get("name") for d in spec.get("disks") or []])
    if problem is not None:
        invalid = _invalid(*problem, names, generation)
        invalid["conflicts"] = conflicts
        if not conflicts:
            invalid.pop("conflicts")
        return Resolution(invalid, names, conflicts)
    return Resolution(status, names, conflicts)


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w.title() for w in rest)


def _port_group(p: Policy) -> PortGroupRef | None:
    pg = p.spec.network.port_group if p.spec.network else None
    if pg is None:
        return None
    return PortGroupRef(name=f"{p.namespace}/{p.name}", inbound=pg.inbound, outbound=pg.outbound)


def _io_tune(tune) -> dict | None:
    if tune is None:
        return None
    values = tune.model_dump(by_alias=True, exclude_none=True, exclude={"name", "disks"})
    return values or None


def _invalid(reason: str, message: str, names: list[str], generation: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"valid": False, "reason": reason, "message": message, "policies": names}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _value(status: Mapping, kind: str, key: str) -> tuple[Any, str] | None:
    entry = (status.get(kind) or {}).get(key)
    return (entry["value"], entry["source"]) if entry else None


def _check(spec: Mapping, own: QosSpec, status: Mapping, interfaces: list[str],
           disks: list[str]) -> tuple[str, str] | None:
    """(reason, message) of the first contradiction in the resolved values, or None."""
    for nic in own.network:
        if nic.name not in interfaces:
            return UNKNOWN_DEVICE, f"spec.qos.network names interface {nic.name!r}, which the VM does not have"
    for disk in own.disks:
        if disk.name not in disks:
            return UNKNOWN_DEVICE, f"spec.qos.disks names disk {disk.name!r}, which the VM does not have"
    limit = _value(status, "cpu", "limitPercent")
    vcpus = max(int((spec.get("cpu") or {}).get("maxVcpus") or (spec.get("cpu") or {}).get("vcpus") or 1), 1)
    for key, what in (("reservationPercent", "reservation"), ("minPercent", "lower limit")):
        floor = _value(status, "cpu", key)
        if floor is None:
            continue
        if limit is not None and limit[0] < floor[0]:
            return LIMIT_BELOW_RESERVATION, (f"cpu.limitPercent {limit[0]} ({limit[1]}) is below the cpu {what} "
                                             f"{key} {floor[0]} ({floor[1]})")
        if floor[0] > vcpus * 100:
            return EXCEEDS_VM, (f"cpu.{key} {floor[0]} ({floor[1]}) exceeds what {vcpus} vCPU(s) can use "
                                f"({vcpus * 100})")
    hard = _value(status, "memory", "hardLimit")
    size = (spec.get("memory") or {}).get("size")
    for key in ("guarantee", "softLimit"):
        low = _value(status, "memory", key)
        if low is None:
            continue
        if hard is not None and quantity.to_bytes(hard[0]) < quantity.to_bytes(low[0]):
            return LIMIT_BELOW_RESERVATION, (f"memory.hardLimit {hard[0]} ({hard[1]}) is below memory.{key} "
                                             f"{low[0]} ({low[1]})")
    guarantee = _value(status, "memory", "guarantee")
    if guarantee is not None and size and quantity.to_bytes(guarantee[0]) > quantity.to_bytes(size):
        return EXCEEDS_VM, f"memory.guarantee {guarantee[0]} ({guarantee[1]}) exceeds the VM's memory.size {size}"
    for nic in status.get("network") or []:
        if "queues" in nic and "inbound" not in nic and "outbound" not in nic:
            return QUEUES_WITHOUT_RATE, (f"network[{nic['name']}].queues ({nic['queues']['source']}) need an "
                                         "inbound or outbound rate to divide")
    return None


# -- a namespace at once --------------------------------------------------------------------------

@dataclass
class PolicyReport:
    """What a policy's status says: how many VMs it selects, and the ties it was part of."""

    matched: int = 0
    conflicts: list[dict] = field(default_factory=list)  # wire form of vmqospolicy.PolicyConflict

    @property
    def phase(self) -> str:
        if self.conflicts:
            return DEGRADED
        return ACTIVE if self.matched else IDLE


def resolve_all(vms: Iterable[Mapping], policies: Iterable[Policy]) -> tuple[dict[str, Resolution],
                                                                              dict[tuple[str, str], PolicyReport]]:
    """Every VM's resolution (by namespace/name) and every policy's report (by (namespace, name))."""
    policies = list(policies)
    reports = {(p.namespace, p.name): PolicyReport() for p in policies}
    results: dict[str, Resolution] = {}
    for vm in vms:
        md = vm.get("metadata") or {}
        ns, name = md.get("namespace", ""), md.get("name", "")
        res = resolve(vm, policies)
        results[f"{ns}/{name}"] = res
        for pname in res.matched:
            reports[(ns, pname)].matched += 1
        for c in res.conflicts:
            for involved in [c["winner"], *c["losers"]]:
                if involved.startswith("policy/"):
                    report = reports.get((ns, involved.removeprefix("policy/")))
                    if report is not None:
                        report.conflicts.append({"vm": name, "field": c["field"], "winner": c["winner"],
                                                 "message": c["message"]})
    return results, reports


def policy_status(report: PolicyReport, generation: int | None) -> dict[str, Any]:
    """The wire form of the policy status fields the controller owns (conditions rendered by the caller)."""
    out: dict[str, Any] = {"phase": report.phase, "matchedVms": report.matched,
                           "conflicts": report.conflicts[:100]}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def policy_conditions(report: PolicyReport) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) of the policy's conditions."""
    if report.matched:
        matched = ("Matched", True, "MatchingVMs", f"selects {report.matched} VM(s)")
    else:
        matched = ("Matched", False, NO_MATCH, "the selector matches no VirtualMachine in this namespace")
    if report.conflicts:
        first = report.conflicts[0]
        conflict = ("Conflict", True, POLICY_CONFLICT,
                    f"{len(report.conflicts)} tie(s) with policies of equal priority; first: VM {first['vm']}: "
                    f"{first['message']}")
    else:
        conflict = ("Conflict", False, "NoConflict", "")
    return [matched, conflict]


# -- placement accounting (Q12) -------------------------------------------------------------------

def reserved_cpu_percent(status_qos: Mapping | None) -> int:
    """The CPU a VM reserves on its node (percent of one host CPU), from its resolved status.qos."""
    if not status_qos or not status_qos.get("valid"):
        return 0
    entry = (status_qos.get("cpu") or {}).get("reservationPercent")
    return int(entry["value"]) if entry else 0


def cpu_room(node_cpus: int, reserved: Iterable[int]) -> int:
    """Percent of one host CPU still free for reservations on a node with `node_cpus` CPUs."""
    return node_cpus * 100 - sum(reserved)
