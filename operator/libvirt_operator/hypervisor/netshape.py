"""NIC shaping with tc, for nodes where libvirt's `<bandwidth>` cannot work (it needs the sfq qdisc, the
fw classifier and the police action; this machine's kernel has HTB, TBF, the ingress qdisc, u32, mirred
and IFB devices, which is what the Kubernetes CNI `bandwidth` plugin shapes with too).

Directions are seen from the guest, as in libvirt: *inbound* is traffic to the guest, which leaves the host
through the tap (the tap's egress); *outbound* is traffic from the guest, which enters the host on the tap
(the tap's ingress, which tc cannot queue: it is redirected to an IFB device and shaped on that one's egress).

One NIC (Q1), per direction, a tree on the tap (inbound) or on the NIC's own IFB `lvo<hash>` (outbound):

    root 1: htb default <leaf>
      class 1:1  rate=average ceil=peak (or average) burst=burst      the NIC
        class 1:10+i rate=ratePercent_i x average, ceil=peak, prio i   Q3 queue i (only with queues)
        class 1:1f   rate=the rest (at least 1 %), prio n              unmatched traffic (only with queues)
      u32 filters: IPv4 DSCP (TOS & 0xfc) / IPv6 traffic class -> queue class

Units: libvirt's, KiB/s for average/peak (x 8192 = bit/s for tc), KiB for burst. libvirt ignores an outbound
peak (it polices); here an outbound peak is an HTB ceil like inbound.

A port group (Q2) shares one ceiling among several NICs of one node, per direction, on one IFB per direction
(`lvg<hash>i` to the guests, `lvg<hash>o` from the guests): each member tap redirects into it (outbound from
its ingress qdisc; inbound from its egress: an HTB root whose u32 filter redirects everything to the IFB,
which sends it back out of the tap unclassified, into the tap's unlimited default class). On the IFB:

    root 1: htb default ffff
      class 1:1 rate=ceiling average ceil=ceiling peak                     the shared ceiling
        class 1:<k>00 rate=member's average (else ceiling / members)        member k (u32 on its MAC:
                      ceil=min(member peak, ceiling peak), prio=7-priority   ether src outbound, dst inbound)
          class 1:<k>10+i ...                                               its Q3 queues, as above
        class 1:ffff rate=1 % of the ceiling                                 frames of no member (stray)

Q3, priority queues, precisely: per NIC and direction, up to four queues selected by the DSCP of IP
packets (IPv4 TOS >> 2, IPv6 traffic class >> 2); queue i is guaranteed `ratePercent_i` of the NIC's
average and has HTB priority i, so spare bandwidth (up to the NIC's peak) goes to the lowest-numbered
queue that has traffic; packets of no listed DSCP share the rest in a last queue. Without a rate in a
direction there is nothing to divide (resolution refuses queues without a rate).

Q4, network priority, precisely: a number 0-7 (default 0), higher is served first. Within a port group,
each member is guaranteed its own average (or an equal part of the ceiling); the spare part of the
ceiling goes first to the member with the highest priority that has traffic (HTB prio = 7 - priority).
A NIC outside a port group competes with nobody at this level: its priority has no effect there.

Everything is idempotent: `apply_*` reads what is on the devices and rebuilds only what differs;
`read` returns what is applied; `remove_*` takes it away (missing pieces are fine). Our IFB devices
carry an alias `lvo:<role>:<owner>` so that stale ones can be found and removed (`prune`).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

KIB_BITS = 8192  # 1 KiB/s in bit/s
MTU_BYTES = 1514
ALIAS_PREFIX = "lvo:"
_UNITS = {"bit": 1, "Kbit": 1000, "Mbit": 1000**2, "Gbit": 1000**3, "Tbit": 1000**4}


class ShapeError(Exception):
    """A tc or ip command failed; `command` and the tool's own message say which and why."""

    def __init__(self, command: Sequence[str], message: str):
        super().__init__(f"{' '.join(command)}: {message}")
        self.command = list(command)
        self.message = message


# -- what to apply ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Queue:
    dscp: tuple[int, ...]
    rate_percent: int


@dataclass(frozen=True)
class Direction:
    """One direction's shape, in libvirt units."""

    average_kib: int
    peak_kib: int | None = None
    burst_kib: int | None = None
    queues: tuple[Queue, ...] = ()

    @property
    def rate_bits(self) -> int:
        return self.average_kib * KIB_BITS

    @property
    def ceil_bits(self) -> int:
        return max(self.peak_kib or self.average_kib, self.average_kib) * KIB_BITS

    @classmethod
    def from_api(cls, rate, queues=None) -> Direction | None:
        """From api.qos.Rate and PriorityQueue list (None when there is no rate)."""
        if rate is None:
            return None
        qs = tuple(Queue(tuple(q.dscp), q.rate_percent) for q in queues or [])
        return cls(rate.average_kib_per_second, rate.peak_kib_per_second, rate.burst_kib, qs)


@dataclass(frozen=True)
class NicShape:
    device: str  # the tap on the host (libvirt's <target dev>, e.g. vnet3)
    mac: str  # the guest's MAC (classifies port-group traffic)
    inbound: Direction | None = None  # to the guest
    outbound: Direction | None = None  # from the guest
    priority: int = 0  # Q4, 0-7, higher first


@dataclass(frozen=True)
class PortGroupShape:
    name: str  # e.g. namespace/policy
    inbound: Direction | None = None  # shared ceiling to the guests
    outbound: Direction | None = None  # shared ceiling from the guests


@dataclass(frozen=True)
class ClassInfo:
    classid: str
    parent: str | None
    prio: int | None
    rate_bits: int
    ceil_bits: int


@dataclass
class DeviceState:
    """What is applied on one device (read back from the kernel)."""

    device: str
    root: str | None = None  # root qdisc kind (htb, ...), None for the default
    ingress: bool = False
    redirect_to: str | None = None  # mirred target of the ingress filter (outbound)
    egress_redirect_to: str | None = None  # mirred target of the root filter (inbound, port groups)
    classes: list[ClassInfo] = field(default_factory=list)


def ifb_name(role: str, owner: str) -> str:
    """Our IFB device of a NIC (role 'nic', owner: tap) or a port group direction (role 'pgi'/'pgo')."""
    digest = hashlib.sha1(f"{role}:{owner}".encode()).hexdigest()[:8]
    prefix, suffix = {"nic": ("lvo", ""), "pgi": ("lvg", "i"), "pgo": ("lvg", "o")}[role]
    return f"{prefix}{digest}{suffix}"


# -- the commands -----------------------------------------------------------------------------------

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _default_runner(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _quantum(rate_bits: int) -> int:
    return max(MTU_BYTES + 86, min(rate_bits // 8 // 10, 200_000))


def _htb_class(dev: str, parent: str, classid: str, rate: int, ceil: int, prio: int,
               burst_kib: int | None = None) -> list[str]:
    args = ["class", "add", "dev", dev, "parent", parent, "classid", classid, "htb", "rate", f"{rate}bit",
            "ceil", f"{max(ceil, rate)}bit", "prio", str(prio), "quantum", str(_quantum(rate))]
    if burst_kib:
        args += ["burst", f"{burst_kib * 1024}b", "cburst", f"{burst_kib * 1024}b"]
    return args


def _dscp_filters(dev: str, classid: str, dscps: Iterable[int], pref: int) -> list[list[str]]:
    out = []
    for d in dscps:
        out.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", str(pref), "u32",
                    "match", "ip", "tos", hex(d << 2), "0xfc", "flowid", classid])
        out.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ipv6", "prio", str(pref + 1), "u32",
                    "match", "u32", hex(d << 22), "0x0fc00000", "at", "0", "flowid", classid])
    return out


def _tree(dev: str, parent: str, base: int, shape: Direction, prio: int, filters_pref: int,
          rate_bits: int | None = None, ceil_bits: int | None = None) -> tuple[list[list[str]], str]:
    """Commands for one NIC's class (minor `base`) and its queues under `parent`; returns (commands, leaf
    class that takes unmatched traffic)."""
    rate = rate_bits if rate_bits is not None else shape.rate_bits
    ceil = ceil_bits if ceil_bits is not None else shape.ceil_bits
    me = f"1:{base:x}"
    cmds = [_htb_class(dev, parent, me, rate, ceil, prio, shape.burst_kib)]
    if not shape.queues:
        return cmds, me
    used, qbase = 0, base & ~0xFF  # queues of 1:1 are 1:10.., of a member 1:k00 are 1:k10..
    for i, q in enumerate(shape.queues):
        qid = f"1:{qbase + 0x10 + i:x}"
        cmds.append(_htb_class(dev, me, qid, max(rate * q.rate_percent // 100, 8), ceil, i))
        cmds += _dscp_filters(dev, qid, q.dscp, filters_pref + 2 * i)
        used += q.rate_percent
    rest = f"1:{qbase + 0x1f:x}"
    cmds.append(_htb_class(dev, me, rest, max(rate * max(100 - used, 1) // 100, 8), ceil, len(shape.queues)))
    return cmds, rest


class Shaper:
    """tc shaping on this host, or inside a network namespace (`netns`, for tests)."""

    def __init__(self, netns: str | None = None, runner: Runner | None = None):
        self.netns = netns
        self._run = runner or _default_runner

    # -- low level

    def _cmd(self, tool: str, args: list[str]) -> list[str]:
        return [tool, *(["-n", self.netns] if self.netns else []), *args]

    def tc(self, *args: str, check: bool = True) -> str:
        return self._exec(self._cmd("tc", list(args)), check)

    def ip(self, *args: str, check: bool = True) -> str:
        return self._exec(self._cmd("ip", list(args)), check)

    def _exec(self, command: list[str], check: bool) -> str:
        done = self._run(command)
        if check and done.returncode != 0:
            raise ShapeError(command, (done.stderr or done.stdout or "").strip())
        return done.stdout or ""

    def _batch(self, commands: list[list[str]]) -> None:
        for c in commands:
            self.tc(*c)

    def links(self) -> dict[str, dict]:
        return {link["ifname"]: link for link in json.loads(self.ip("-j", "link", "show") or "[]")}

    def _ensure_ifb(self, name: str, alias: str) -> None:
        links = self.links()
        if name not in links:
            self.ip("link", "add", "name", name, "type", "ifb")
        if links.get(name, {}).get("ifalias") != alias:
            self.ip("link", "set", "dev", name, "alias", alias)
        self.ip("link", "set", "dev", name, "up")

    def _delete_link(self, name: str) -> None:
        self.ip("link", "delete", "dev", name, check=False)

    def _clear(self, dev: str, root: bool = True, ingress: bool = True) -> None:
        if root:
            self.tc("qdisc", "del", "dev", dev, "root", check=False)
        if ingress:
            self.tc("qdisc", "del", "dev", dev, "ingress", check=False)

    # -- reading back

    def read(self, dev: str) -> DeviceState:
        state = DeviceState(dev)
        for q in json.loads(self.tc("-j", "qdisc", "show", "dev", dev) or "[]"):
            if q.get("root"):
                state.root = q["kind"] if q["kind"] not in ("noqueue", "pfifo_fast", "mq", "fq_codel") else None
            if q.get("kind") == "ingress":
                state.ingress = True
        if state.ingress:
            state.redirect_to = _mirred_target(self.tc("-j", "filter", "show", "dev", dev, "parent", "ffff:"))
        if state.root == "htb":
            state.egress_redirect_to = _mirred_target(self.tc("-j", "filter", "show", "dev", dev, "parent", "1:"))
            state.classes = parse_classes(self.tc("class", "show", "dev", dev))
        return state

    # -- one NIC (Q1, Q3)

    def nic_plan(self, nic: NicShape) -> dict[str, list[list[str]]]:
        """Device -> tc commands (after clearing it) for a NIC outside any port group."""
        plan: dict[str, list[list[str]]] = {}
        if nic.inbound:
            cmds, leaf = _tree(nic.device, "1:", 1, nic.inbound, 0, 10)
            plan[nic.device] = [["qdisc", "add", "dev", nic.device, "root", "handle", "1:", "htb", "default",
                                 leaf.split(":")[1]], *cmds]
        if nic.outbound:
            ifb = ifb_name("nic", nic.device)
            cmds, leaf = _tree(ifb, "1:", 1, nic.outbound, 0, 10)
            plan[ifb] = [["qdisc", "add", "dev", ifb, "root", "handle", "1:", "htb", "default",
                          leaf.split(":")[1]], *cmds]
        return plan

    def apply_nic(self, nic: NicShape) -> bool:
        """Shapes one NIC (no port group); returns whether anything changed."""
        tap = self.read(nic.device)
        inbound = self._nic_inbound(nic, tap)
        return self._nic_outbound(nic, tap) or inbound

    def _nic_inbound(self, nic: NicShape, tap: DeviceState) -> bool:
        """The NIC's own tree on the tap's egress (or none)."""
        commands = self.nic_plan(nic).get(nic.device, [])
        if _same(tap.classes, _expected_classes(commands)) and tap.egress_redirect_to is None \
                and (nic.inbound is not None or tap.root is None):
            return False
        self._clear(nic.device, ingress=False)
        self._batch(commands)
        return True

    def _nic_outbound(self, nic: NicShape, tap: DeviceState) -> bool:
        """The NIC's own IFB and the redirect to it (or neither)."""
        ifb, changed = ifb_name("nic", nic.device), False
        if nic.outbound is None:
            if tap.ingress:
                self._clear(nic.device, root=False)
                changed = True
            if ifb in self.links():
                self._delete_link(ifb)
                changed = True
            return changed
        commands = self.nic_plan(nic)[ifb]
        self._ensure_ifb(ifb, f"{ALIAS_PREFIX}nic:{nic.device}")
        if not _same(self.read(ifb).classes, _expected_classes(commands)):
            self._clear(ifb, ingress=False)
            self._batch(commands)
            changed = True
        if tap.redirect_to != ifb:
            self._clear(nic.device, root=False)
            self._redirect_ingress(nic.device, ifb)
            changed = True
        return changed

    def remove_nic(self, device: str) -> None:
        if device in self.links():
            self._clear(device)
        self._delete_link(ifb_name("nic", device))

    def _redirect_ingress(self, dev: str, ifb: str) -> None:
        self.tc("qdisc", "add", "dev", dev, "ingress")
        self.tc("filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)

    def _redirect_egress(self, dev: str, ifb: str) -> None:
        # An unlimited default class takes the packets the IFB sends back (they skip classification).
        self.tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        self.tc(*_htb_class(dev, "1:", "1:1", 10**10, 10**10, 0))
        self.tc("filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)

    # -- a port group (Q2, Q4, Q3 inside)

    def group_plan(self, group: PortGroupShape, members: Sequence[NicShape]) -> dict[str, list[list[str]]]:
        plan: dict[str, list[list[str]]] = {}
        members = sorted(members, key=lambda m: m.device)
        for direction, role, mac_at in (("inbound", "pgi", "dst"), ("outbound", "pgo", "src")):
            ceiling: Direction | None = getattr(group, direction)
            if ceiling is None:
                continue
            ifb = ifb_name(role, group.name)
            cmds = [["qdisc", "add", "dev", ifb, "root", "handle", "1:", "htb", "default", "ffff"],
                    _htb_class(ifb, "1:", "1:1", ceiling.rate_bits, ceiling.ceil_bits, 0, ceiling.burst_kib),
                    _htb_class(ifb, "1:1", "1:ffff", max(ceiling.rate_bits // 100, 8), ceiling.ceil_bits, 7)]
            fair = max(ceiling.rate_bits // max(len(members), 1), 8)
            for k, m in enumerate(members):
                own: Direction | None = getattr(m, direction)
                base = 0x100 * (k + 1)
                shape = own or Direction(max(fair // KIB_BITS, 1))
                rate = min(shape.rate_bits if own else fair, ceiling.rate_bits)
                ceil = min(shape.ceil_bits if own else ceiling.ceil_bits, ceiling.ceil_bits)
                tree, leaf = _tree(ifb, "1:1", base, shape, 7 - m.priority, 0x100 + 0x10 * k,
                                   rate_bits=rate, ceil_bits=ceil)
                cmds += tree
                cmds.append(["filter", "add", "dev", ifb, "parent", "1:", "protocol", "all", "prio",
                             str(0x80 + k), "u32", "match", "ether", mac_at, m.mac, "flowid", leaf])
            plan[ifb] = cmds
        return plan

    def apply_group(self, group: PortGroupShape, members: Sequence[NicShape]) -> bool:
        """Shapes a port group and its member NICs (replacing any per-NIC shaping of them)."""
        plan, changed = self.group_plan(group, members), False
        for direction, role in (("inbound", "pgi"), ("outbound", "pgo")):
            ifb = ifb_name(role, group.name)
            if getattr(group, direction) is None:
                if ifb in self.links():
                    self._delete_link(ifb)
                    changed = True
                continue
            self._ensure_ifb(ifb, f"{ALIAS_PREFIX}{role}:{group.name}")
            if not _same(self.read(ifb).classes, _expected_classes(plan[ifb])) \
                    or self._filters_text(ifb) != _filters_wanted(plan[ifb]):
                self._clear(ifb, ingress=False)
                self._batch(plan[ifb])
                changed = True
        in_ifb, out_ifb = ifb_name("pgi", group.name), ifb_name("pgo", group.name)
        for m in members:
            tap = self.read(m.device)
            # A direction the group has no ceiling for keeps the member's own shaping (if any).
            if group.inbound is None:
                changed = self._nic_inbound(m, tap) or changed
            elif tap.egress_redirect_to != in_ifb:
                self._clear(m.device, ingress=False)
                self._redirect_egress(m.device, in_ifb)
                changed = True
            if group.outbound is None:
                changed = self._nic_outbound(m, tap) or changed
            else:
                if tap.redirect_to != out_ifb:
                    self._clear(m.device, root=False)
                    self._redirect_ingress(m.device, out_ifb)
                    changed = True
                self._delete_link(ifb_name("nic", m.device))  # the group's IFB replaces the NIC's own
        return changed

    def _filters_text(self, dev: str) -> list[tuple[str, str]]:
        """(match value, flowid) of the MAC filters on a group IFB, to notice a membership change."""
        out = []
        for f in json.loads(self.tc("-j", "filter", "show", "dev", dev, "parent", "1:") or "[]"):
            opts = f.get("options") or {}
            if f.get("protocol") == "all" and "flowid" in opts:
                out.append((f"{f.get('pref')}", opts["flowid"]))
        return sorted(set(out))

    def remove_group(self, name: str, members: Iterable[str] = ()) -> None:
        for dev in members:
            if dev in self.links():
                self._clear(dev)
        for role in ("pgi", "pgo"):
            self._delete_link(ifb_name(role, name))

    # -- the whole node

    def prune(self, nic_devices: Iterable[str], groups: Iterable[str]) -> list[str]:
        """Deletes our IFBs whose NIC or group is not in the given sets; returns their names."""
        keep = {ifb_name("nic", d) for d in nic_devices}
        keep |= {ifb_name(r, g) for g in groups for r in ("pgi", "pgo")}
        gone = []
        for name, link in self.links().items():
            if (link.get("ifalias") or "").startswith(ALIAS_PREFIX) and name not in keep:
                self._delete_link(name)
                gone.append(name)
        return gone


def _mirred_target(filters_json: str) -> str | None:
    for f in json.loads(filters_json or "[]"):
        for action in (f.get("options") or {}).get("actions") or []:
            if action.get("kind") == "mirred":
                return action.get("to_dev")
    return None


_CLASS = re.compile(r"class htb (?P<id>\S+) (?:parent (?P<parent>\S+)|root)(?: leaf \S+)?(?: prio (?P<prio>\d+))? "
                    r"rate (?P<rate>\S+) ceil (?P<ceil>\S+)")


def parse_rate(text: str) -> int:
    """tc's printed rate ('8192Kbit', '5Mbit', '800bit') in bit/s."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a tc rate: {text!r}")
    return round(float(m.group(1)) * _UNITS[m.group(2)])


def parse_classes(text: str) -> list[ClassInfo]:
    out = []
    for line in text.splitlines():
        m = _CLASS.match(line.strip())
        if m:
            prio = int(m["prio"]) if m["prio"] is not None else None  # tc prints no prio for inner classes
            out.append(ClassInfo(m["id"], m["parent"], prio, parse_rate(m["rate"]), parse_rate(m["ceil"])))
    return sorted(out, key=lambda c: c.classid)


def _expected_classes(commands: list[list[str]]) -> list[ClassInfo]:
    out = []
    for c in commands:
        if c[:2] != ["class", "add"]:
            continue
        opts = {key: c[i + 1] for i, key in enumerate(c[:-1]) if key in ("parent", "classid", "rate", "ceil", "prio")}
        out.append(ClassInfo(opts["classid"], None if opts["parent"] == "1:" else opts["parent"],
                             int(opts["prio"]), int(opts["rate"].removesuffix("bit")),
                             int(opts["ceil"].removesuffix("bit"))))
    return sorted(out, key=lambda c: c.classid)


def _filters_wanted(commands: list[list[str]]) -> list[tuple[str, str]]:
    out = []
    for c in commands:
        if c[:2] == ["filter", "add"] and "ether" in c:
            out.append((c[c.index("prio") + 1], c[c.index("flowid") + 1]))
    return sorted(set(out))


def _same(have: list[ClassInfo], want: list[ClassInfo]) -> bool:
    """The same classes, rates equal up to tc's printing (3 significant digits)."""
    inner = {c.parent for c in want}  # tc shows no prio for classes with children

    def key(c: ClassInfo) -> tuple:
        return (c.classid, c.parent, None if c.classid in inner else c.prio)

    if [key(c) for c in have] != [key(c) for c in want]:
        return False
    return all(_close(h.rate_bits, w.rate_bits) and _close(h.ceil_bits, w.ceil_bits)
               for h, w in zip(have, want, strict=True))


def _close(a: int, b: int) -> bool:
    return abs(a - b) <= max(0.002 * max(a, b), 8)


# -- from resolved QoS to shapes --------------------------------------------------------------------

@dataclass(frozen=True)
class NodePlan:
    nics: list[NicShape]  # NICs shaped on their own
    groups: list[tuple[PortGroupShape, list[NicShape]]]  # port groups and their members on this node


def plan_node(nics: Iterable[tuple[object, str, str]]) -> NodePlan:
    """(api.qos.NicEffective, tap device, MAC) of every running NIC on the node -> what to apply.

    A NIC in a port group is shaped inside the group's trees (its own rates become its guaranteed
    part and its ceiling there); NICs of the same group on this node share the group's ceiling.
    """
    alone: list[NicShape] = []
    groups: dict[str, tuple[PortGroupShape, list[NicShape]]] = {}
    for eff, tap, mac in nics:
        shape = NicShape(tap, mac,
                         inbound=Direction.from_api(eff.inbound, eff.queues),
                         outbound=Direction.from_api(eff.outbound, eff.queues),
                         priority=eff.priority or 0)
        pg = eff.port_group
        if pg is None:
            alone.append(shape)
            continue
        group = PortGroupShape(pg.name, Direction.from_api(pg.inbound), Direction.from_api(pg.outbound))
        groups.setdefault(pg.name, (group, []))[1].append(shape)
    return NodePlan(alone, list(groups.values()))


def apply_node(shaper: Shaper, plan: NodePlan) -> list[str]:
    """Applies a node's whole plan and prunes our IFBs that nothing needs any more; returns the devices
    (taps) whose shaping changed. A NIC without any rate gets its shaping removed."""
    changed = []
    for nic in plan.nics:
        if nic.inbound is None and nic.outbound is None:
            state = shaper.read(nic.device)
            if state.root is not None or state.ingress:
                shaper.remove_nic(nic.device)
                changed.append(nic.device)
            continue
        if shaper.apply_nic(nic):
            changed.append(nic.device)
    for group, members in plan.groups:
        if shaper.apply_group(group, members):
            changed += [m.device for m in members]
    own_ifbs = [n.device for n in plan.nics if n.outbound is not None]
    own_ifbs += [m.device for g, members in plan.groups if g.outbound is None for m in members if m.outbound]
    shaper.prune(own_ifbs, [g.name for g, _ in plan.groups])
    return changed
