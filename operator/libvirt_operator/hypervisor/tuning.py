"""CPU, memory and disk I/O tuning of one domain (TuningMixin, inherited by Guest), the node's QoS
capabilities, and the pure rules that turn resolved QoS (api.qos.EffectiveQos) into libvirt values.

Every setter applies LIVE (when the domain runs) and CONFIG (when it is persistent), so a value holds
now and survives a restart; QEMU keeps running (same PID, same domain id).

Mechanisms (see api/qos.py for the user-facing meaning):
- Q9 shares -> `cpu_shares` (v1 cpu.shares, [2, 262144], default 1024; v2 cpu.weight, [1, 10000], default 100).
- Q10 limitPercent -> `global_period` = 100000 us, `global_quota` = percent x 1000 us on the domain's cgroup
  (vCPUs and emulator together): the whole VM gets at most percent/100 host CPUs. No limit: quota -1.
- Q11/Q12 floors -> `floor_shares`: each VM's shares become weight + k x floor, with k large enough that
  under full contention every VM's proportional part of the node is at least its floor (see there).
- Q6 hardLimit -> `hard_limit`; Q8 softLimit and Q7 guarantee -> `soft_limit` = max(softLimit, guarantee);
  a value absent is "unlimited" (VIR_DOMAIN_MEMORY_PARAM_UNLIMITED).
- disk I/O -> `setBlockIoTune` with all six values (0 = none), so values not given are removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from libvirt_operator.api import quantity
from libvirt_operator.api.qos import CpuQos, DiskIoTune, EffectiveQos, MemoryQos, Rate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

UNLIMITED_KIB = 9007199254740991  # VIR_DOMAIN_MEMORY_PARAM_UNLIMITED: "no limit" for memtune
CFS_PERIOD_US = 100_000
PERIOD_RANGE_US = (1000, 1_000_000)
QUOTA_RANGE_US = (1000, 17_592_186_044_415)  # libvirt's maximum quota
SHARES = {1: (2, 262144, 1024), 2: (1, 10000, 100)}  # cgroup version -> (min, max, default)

HOST_UNSUPPORTED = "HostUnsupported"

_IOTUNE_KEYS = {  # api field -> libvirt typed parameter
    "total_bytes_per_second": "total_bytes_sec", "read_bytes_per_second": "read_bytes_sec",
    "write_bytes_per_second": "write_bytes_sec", "total_iops": "total_iops_sec",
    "read_iops": "read_iops_sec", "write_iops": "write_iops_sec",
}


# -- what libvirt reports ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheduler:
    cpu_shares: int | None
    global_period: int | None
    global_quota: int | None
    vcpu_period: int | None
    vcpu_quota: int | None
    emulator_period: int | None = None
    emulator_quota: int | None = None

    @classmethod
    def of(cls, params: Mapping[str, int]) -> Scheduler:
        return cls(**{k: params.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class MemoryParameters:
    hard_limit_kib: int | None  # None: unlimited
    soft_limit_kib: int | None
    swap_hard_limit_kib: int | None

    @classmethod
    def of(cls, params: Mapping[str, int]) -> MemoryParameters:
        def limit(key: str) -> int | None:
            value = params.get(key)
            return None if value is None or value >= UNLIMITED_KIB else value
        return cls(limit("hard_limit"), limit("soft_limit"), limit("swap_hard_limit"))


@dataclass(frozen=True)
class BlockIoTune:
    total_bytes_sec: int = 0
    read_bytes_sec: int = 0
    write_bytes_sec: int = 0
    total_iops_sec: int = 0
    read_iops_sec: int = 0
    write_iops_sec: int = 0

    @classmethod
    def of(cls, params: Mapping[str, int]) -> BlockIoTune:
        return cls(**{k: int(params.get(k) or 0) for k in cls.__dataclass_fields__})

    @classmethod
    def from_api(cls, tune: DiskIoTune | None) -> BlockIoTune:
        if tune is None:
            return cls()
        return cls(**{lv: getattr(tune, api) or 0 for api, lv in _IOTUNE_KEYS.items()})

    def params(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- the mixin --------------------------------------------------------------------------------------

def _affect(dom: libvirt.virDomain) -> list[int]:
    """LIVE if the domain runs, CONFIG if it is persistent (CURRENT if neither applies), one call each:
    libvirt-python's setters first read the parameters' types with the same flags, and that read
    refuses LIVE|CONFIG together."""
    flags = []
    if dom.isActive():
        flags.append(libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if dom.isPersistent():
        flags.append(libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    return flags or [libvirt.VIR_DOMAIN_AFFECT_CURRENT]


def _set(setter: Callable[[int], Any], dom: libvirt.virDomain) -> None:
    for flags in _affect(dom):
        setter(flags)


def _read_flags(dom: libvirt.virDomain, live: bool) -> int:
    if live and dom.isActive():
        return libvirt.VIR_DOMAIN_AFFECT_LIVE
    return libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else libvirt.VIR_DOMAIN_AFFECT_CURRENT


class TuningMixin:
    """Tuning calls of a Guest; expects `call(fn, fallback)` running fn(virDomain) in a thread."""

    call: Callable[..., Any]

    # CPU (Q9-Q12)
    async def set_scheduler(self, *, cpu_shares: int | None = None, global_period: int | None = None,
                            global_quota: int | None = None, vcpu_period: int | None = None,
                            vcpu_quota: int | None = None) -> None:
        """setSchedulerParametersFlags with the given values only (None: left as it is)."""
        params = {k: v for k, v in {"cpu_shares": cpu_shares, "global_period": global_period,
                                    "global_quota": global_quota, "vcpu_period": vcpu_period,
                                    "vcpu_quota": vcpu_quota}.items() if v is not None}
        if params:
            await self.call(lambda d: _set(lambda f: d.setSchedulerParametersFlags(params, f), d),
                            fallback="TuningFailed")

    async def scheduler(self, live: bool = True) -> Scheduler:
        return Scheduler.of(await self.call(lambda d: d.schedulerParametersFlags(_read_flags(d, live))))

    async def apply_cpu(self, cpu: CpuQos, shares: int | None, default_shares: int) -> None:
        """Q9/Q10 in one call: shares (already floor-adjusted, see floor_shares) and the limit."""
        period, quota = cpu_limit(cpu.limit_percent)
        await self.set_scheduler(cpu_shares=shares if shares is not None else default_shares,
                                 global_period=period, global_quota=quota)

    async def cpu_time_ns(self) -> int:
        """CPU time the whole domain used so far (cgroup cpuacct.usage / cpu.stat usage_usec)."""
        stats = await self.call(lambda d: d.getCPUStats(True, 0))
        return int(stats[0]["cpu_time"])

    # memory (Q6-Q8)
    async def set_memory_parameters(self, *, hard_limit_kib: int | None, soft_limit_kib: int | None,
                                    swap_hard_limit_kib: int | None = None) -> None:
        """setMemoryParameters; None means unlimited. swap_hard_limit is left alone unless given."""
        params = {"hard_limit": hard_limit_kib or UNLIMITED_KIB, "soft_limit": soft_limit_kib or UNLIMITED_KIB}
        if swap_hard_limit_kib is not None:
            params["swap_hard_limit"] = swap_hard_limit_kib
        await self.call(lambda d: _set(lambda f: d.setMemoryParameters(params, f), d), fallback="TuningFailed")

    async def memory_parameters(self, live: bool = True) -> MemoryParameters:
        return MemoryParameters.of(await self.call(lambda d: d.memoryParameters(_read_flags(d, live))))

    async def apply_memory(self, memory: MemoryQos) -> None:
        hard, soft = memory_limits_kib(memory)
        await self.set_memory_parameters(hard_limit_kib=hard, soft_limit_kib=soft)

    # network, libvirt's own mechanism (nodes where Capabilities.libvirt_bandwidth holds)
    async def set_interface_bandwidth(self, device: str, inbound: Rate | None, outbound: Rate | None) -> None:
        """setInterfaceParameters (virsh domiftune) on the NIC whose target dev or MAC is `device`;
        a direction left None is removed (0). Needs sfq, fw and police in the kernel: check first."""
        params = _bandwidth_params("inbound", inbound) | _bandwidth_params("outbound", outbound)
        await self.call(lambda d: _set(lambda f: d.setInterfaceParameters(device, params, f), d),
                        fallback="TuningFailed")

    async def interface_bandwidth(self, device: str, live: bool = True) -> dict[str, int]:
        return dict(await self.call(lambda d: d.interfaceParameters(device, _read_flags(d, live))))

    async def nic_devices(self) -> list[NicDevice]:
        """The running domain's NICs: MAC, host device (tap) and alias, from the live XML."""
        return nic_devices(await self.call(lambda d: d.XMLDesc(0)))

    # disk I/O
    async def set_block_io_tune(self, target: str, tune: BlockIoTune) -> None:
        """setBlockIoTune on the disk with this target (vda, sdb); zeros remove limits."""
        params = tune.params()
        await self.call(lambda d: _set(lambda f: d.setBlockIoTune(target, params, f), d), fallback="TuningFailed")

    async def block_io_tune(self, target: str, live: bool = True) -> BlockIoTune:
        return BlockIoTune.of(await self.call(lambda d: d.blockIoTune(target, _read_flags(d, live))))


def _bandwidth_params(direction: str, rate: Rate | None) -> dict[str, int]:
    keys = {"average": "average_kib_per_second", "peak": "peak_kib_per_second", "burst": "burst_kib"}
    return {f"{direction}.{k}": (getattr(rate, attr) or 0) if rate else 0 for k, attr in keys.items()}


@dataclass(frozen=True)
class NicDevice:
    mac: str
    target: str | None  # the host's tap (vnetN), None while not running
    alias: str | None
    type: str


def nic_devices(xml: str) -> list[NicDevice]:
    out = []
    for iface in ET.fromstring(xml).findall("./devices/interface"):
        mac, target, alias = iface.find("mac"), iface.find("target"), iface.find("alias")
        out.append(NicDevice(mac.get("address", "") if mac is not None else "",
                             target.get("dev") if target is not None else None,
                             alias.get("name") if alias is not None else None, iface.get("type", "")))
    return out


# -- pure rules -------------------------------------------------------------------------------------

def cpu_limit(limit_percent: int | None) -> tuple[int, int]:
    """(global_period, global_quota) for a limit in percent of one host CPU; no limit = quota -1."""
    if limit_percent is None:
        return CFS_PERIOD_US, -1
    return CFS_PERIOD_US, max(limit_percent * CFS_PERIOD_US // 100, QUOTA_RANGE_US[0])


def memory_limits_kib(memory: MemoryQos) -> tuple[int | None, int | None]:
    """(hard_limit, soft_limit) in KiB, None = unlimited; the soft limit never below the guarantee (Q7)."""
    hard = quantity.to_kib(memory.hard_limit) if memory.hard_limit else None
    soft = quantity.to_kib(memory.soft_limit) if memory.soft_limit else None
    if memory.guarantee:
        floor = quantity.to_kib(memory.guarantee)
        soft = max(soft or 0, floor)
    return hard, soft


def balloon_floor_kib(memory: MemoryQos) -> int:
    """Q7: the balloon target (setMemoryFlags) is never set below this (0: no floor)."""
    return quantity.to_kib(memory.guarantee) if memory.guarantee else 0


def floor_percent(cpu: CpuQos) -> int:
    """The CPU floor of a VM (Q11 minPercent, Q12 reservationPercent: the larger)."""
    return max(cpu.min_percent or 0, cpu.reservation_percent or 0)


@dataclass(frozen=True)
class SharesPlan:
    shares: dict[str, int]  # VM key -> cpu_shares to set
    overcommitted: bool  # the floors add up to more than the node; they were scaled down
    floors_percent: int


def floor_shares(vms: Mapping[str, CpuQos], node_cpus: int, cgroup_version: int = 1) -> SharesPlan:
    """cpu_shares of every VM on a node such that each floor (percent of one host CPU) holds under contention.

    With weights w (each VM's shares, or the default) and floors f over a node of C = 100 x CPUs:
    s_i = w_i + k * f_i with k = W / (C - F) (W: all weights, F: all floors). Under full contention VM i gets
    s_i / S of the node, and S = W + kF = kC, so it gets at least k f_i / (k C) = f_i / C: its floor.
    Weights keep their proportions among the rest. Floors beyond the node (F >= C) are first scaled to
    C - 1 percent in total (overcommitted). All shares are then scaled into the cgroup version's range.
    VMs without a floor keep their own shares exactly when no VM on the node has a floor.
    """
    low, high, default = SHARES[cgroup_version]
    capacity = max(node_cpus, 1) * 100
    weights = {k: (c.shares if c.shares is not None else default) for k, c in vms.items()}
    floors = {k: floor_percent(c) for k, c in vms.items()}
    total_floor = sum(floors.values())
    if total_floor == 0:
        return SharesPlan({k: min(max(w, low), high) for k, w in weights.items()}, False, 0)
    overcommitted = total_floor >= capacity
    if overcommitted:
        scale = (capacity - 1) / total_floor
        floors = {k: f * scale for k, f in floors.items()}
    total = sum(floors.values())
    k = sum(weights.values()) / (capacity - total)
    raw = {key: weights[key] + k * floors[key] for key in vms}
    top = max(raw.values())
    factor = min(1.0, high / top)
    shares = {key: min(max(math.ceil(v * factor), low), high) for key, v in raw.items()}
    return SharesPlan(shares, overcommitted, total_floor)


# -- node capabilities ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Capabilities:
    """What this node can honour; the agent reports the rest as HostUnsupported."""

    cgroup_version: int  # 1 or 2 (of the cpu and memory controllers)
    tc: frozenset[str] = frozenset()  # kernel tc pieces that work: htb, tbf, ingress, sfq, u32, fw, police, ...
    ifb: bool = False
    vlan: bool = False  # 802.1Q (8021q) links or Open vSwitch
    cpus: int = 1
    missing: tuple[str, ...] = field(default=())

    @property
    def shares_range(self) -> tuple[int, int]:
        low, high, _ = SHARES[self.cgroup_version]
        return low, high

    @property
    def default_shares(self) -> int:
        return SHARES[self.cgroup_version][2]

    @property
    def libvirt_bandwidth(self) -> bool:
        """libvirt's <bandwidth> builds HTB + sfq leaves + fw and police filters: all must exist."""
        return {"htb", "sfq", "fw", "police", "ingress", "u32"} <= self.tc

    @property
    def tc_shaping(self) -> bool:
        """netshape's way: HTB on taps, ingress + u32 + mirred to IFB devices."""
        return {"htb", "ingress", "u32", "mirred"} <= self.tc and self.ifb

    @property
    def network_mechanism(self) -> str | None:
        """Which mechanism NIC QoS uses on this node: 'libvirt', 'tc', or None (cannot shape)."""
        if self.libvirt_bandwidth:
            return "libvirt"
        return "tc" if self.tc_shaping else None


@dataclass(frozen=True)
class Problem:
    reason: str
    field: str
    message: str


def judge(qos: EffectiveQos, caps: Capabilities) -> list[Problem]:
    """What of `qos` this node cannot honour (empty: all of it). Nothing is applied while any remains."""
    problems: list[Problem] = []
    low, high = caps.shares_range
    if qos.cpu.shares is not None and not low <= qos.cpu.shares <= high:
        problems.append(Problem(HOST_UNSUPPORTED, "cpu.shares",
                                f"cpu.shares {qos.cpu.shares} is outside [{low}, {high}], the range of "
                                f"cgroup v{caps.cgroup_version} on this node"))
    if qos.cpu.limit_percent is not None and qos.cpu.limit_percent > caps.cpus * 100:
        problems.append(Problem(HOST_UNSUPPORTED, "cpu.limitPercent",
                                f"cpu.limitPercent {qos.cpu.limit_percent} exceeds this node's {caps.cpus} CPUs"))
    floor = floor_percent(qos.cpu)
    if floor > caps.cpus * 100:
        problems.append(Problem(HOST_UNSUPPORTED, "cpu.reservationPercent",
                                f"a CPU floor of {floor}% exceeds this node's {caps.cpus} CPUs"))
    shaped = [n for n in qos.network if n.inbound or n.outbound or n.queues or n.port_group]
    if shaped and caps.network_mechanism is None:
        problems.append(Problem(HOST_UNSUPPORTED, f"network[{shaped[0].name}]",
                                "this node can shape NICs neither with libvirt <bandwidth> nor with tc "
                                f"(missing: {', '.join(caps.missing) or 'htb/ingress/u32/mirred/ifb'})"))
    for nic in qos.network:
        if nic.vlan is not None and not caps.vlan:
            problems.append(Problem(HOST_UNSUPPORTED, f"network[{nic.name}].vlan",
                                    f"VLAN {nic.vlan}: this node has no 802.1Q support and no Open vSwitch; "
                                    "the tag is kept and applies on a node that can tag"))
    return problems


def cgroup_version(mounts: str | None = None) -> int:
    """1 if the cpu controller is on a cgroup v1 hierarchy (also in hybrid setups), else 2."""
    mounts = Path("/proc/self/mounts").read_text() if mounts is None else mounts
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and "cpu" in parts[3].split(","):
            return 1
    return 2


_PROBES: dict[str, list[list[str]]] = {  # kind -> tc commands that need it (run on a fresh veth pair)
    "htb": [["qdisc", "add", "dev", "{a}", "root", "handle", "1:", "htb"]],
    "tbf": [["qdisc", "add", "dev", "{b}", "root", "tbf", "rate", "1mbit", "burst", "10k", "latency", "50ms"]],
    "sfq": [["qdisc", "add", "dev", "{a}", "parent", "1:", "handle", "2:", "sfq"]],
    "ingress": [["qdisc", "add", "dev", "{a}", "ingress"]],
    "u32": [["filter", "add", "dev", "{a}", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "u32", "0", "0", "flowid", "1:1"]],
    "fw": [["filter", "add", "dev", "{a}", "parent", "1:", "protocol", "ip", "prio", "2", "handle", "1", "fw",
            "flowid", "1:1"]],
    "police": [["filter", "add", "dev", "{a}", "parent", "ffff:", "protocol", "all", "prio", "3", "u32",
                "match", "u32", "0", "0", "police", "rate", "1mbit", "burst", "10k", "drop", "flowid", ":1"]],
    "mirred": [["filter", "add", "dev", "{a}", "parent", "ffff:", "protocol", "all", "prio", "4", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "{b}"]],
}


def probe_tc(run: Callable[[list[str]], int] | None = None) -> tuple[frozenset[str], bool, bool]:
    """(tc kinds that work, IFB devices can be made, 802.1Q links can be made), tried for real in a
    throwaway network namespace (needs root, as the agent has)."""
    ns = f"lvo-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def sh(args: list[str]) -> int:
        if run is not None:
            return run(args)
        return subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode

    if sh(["ip", "netns", "add", ns]) != 0:
        return frozenset(), False, False
    try:
        ip = ["ip", "-n", ns]
        if sh([*ip, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"]) != 0:
            return frozenset(), False, False
        works = set()
        for kind, commands in _PROBES.items():
            if all(sh(["tc", "-n", ns, *[w.format(a="pa", b="pb") for w in c]]) == 0 for c in commands):
                works.add(kind)
        ifb = sh([*ip, "link", "add", "name", "pifb", "type", "ifb"]) == 0
        vlan = sh([*ip, "link", "add", "link", "pa", "name", "pa.42", "type", "vlan", "id", "42"]) == 0
        return frozenset(works), ifb, vlan
    finally:
        sh(["ip", "netns", "delete", ns])


def detect(node_cpus: int, *, mounts: str | None = None, probe: Callable[[], tuple] | None = None) -> Capabilities:
    """The node's capabilities: cgroup version from the mounts, tc/IFB/VLAN by trying them."""
    tc, ifb, vlan = (probe or probe_tc)()
    ovs = _has_ovs()
    wanted = ("htb", "tbf", "ingress", "u32", "mirred", "sfq", "fw", "police")
    missing = tuple(k for k in wanted if k not in tc) + (() if ifb else ("ifb",)) + (
        () if vlan or ovs else ("8021q",))
    return Capabilities(cgroup_version=cgroup_version(mounts), tc=tc, ifb=ifb, vlan=vlan or ovs,
                        cpus=node_cpus, missing=missing)


def _has_ovs() -> bool:
    with contextlib.suppress(OSError):
        return any(os.access(os.path.join(p, "ovs-vsctl"), os.X_OK)
                   for p in os.environ.get("PATH", "/usr/bin").split(":")) and Path("/run/openvswitch").exists()
    return False


def domain_cgroup_dirs(cgroup_root: str | Path, domain_name: str) -> dict[str, Path]:
    """The domain's cgroup directory per v1 controller (cpu, memory, blkio, ...) or {'unified': dir} on v2,
    under `cgroup_root` (the node's /sys/fs/cgroup as the agent sees it). libvirt names them
    machine/qemu-<id>-<name>.libvirt-qemu (v1) or machine.slice/machine-qemu...scope (systemd)."""
    root = Path(cgroup_root)
    pattern = re.compile(r"^qemu-\d+-" + re.escape(domain_name[:20]) + r"[^/]*\.libvirt-qemu$|"
                         r"^machine-qemu.+" + re.escape(domain_name[:20].replace("-", "\\x2d")) + r".*\.scope$")
    found: dict[str, Path] = {}
    controllers = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    v2 = (root / "cgroup.controllers").exists()
    for top in ([root] if v2 else controllers):
        for machine in ("machine", "machine.slice"):
            base = top / machine
            if not base.is_dir():
                continue
            for child in base.iterdir():
                if child.is_dir() and pattern.match(child.name):
                    found["unified" if v2 else top.name] = child
    return found



# -- memory limit outcomes (Q6) -----------------------------------------------------------------------
# A hard limit below the current usage is refused by cgroup v1 (EBUSY, "Device or resource busy"): report
# it, e.g. MemoryLimitBelowUsage. A guest that grows past its hard limit is killed by the kernel's memcg
# OOM killer: libvirt then reports SHUTOFF with reason CRASHED, and only the kernel log names the cause.

_OOM_MEMCG = re.compile(r"oom-kill:.*?oom_memcg=(?P<memcg>[^,\s]+).*?task=(?P<task>[^,\s]+),pid=(?P<pid>\d+)")


@dataclass(frozen=True)
class OomKill:
    pid: int
    memcg: str  # the cgroup whose limit was hit, e.g. .../machine/qemu-1-web.libvirt-qemu
    task: str

    def is_domain(self, domain_name: str) -> bool:
        leaf = self.memcg.rsplit("/", 1)[-1]
        return bool(re.match(r"^qemu-\d+-" + re.escape(domain_name[:20]), leaf)) or \
            domain_name[:20].replace("-", "\\x2d") in leaf


def oom_kills(kernel_log: str) -> list[OomKill]:
    """The memcg OOM kills in kernel log text (dmesg or /dev/kmsg records)."""
    return [OomKill(int(m["pid"]), m["memcg"], m["task"]) for m in _OOM_MEMCG.finditer(kernel_log)]


def read_kernel_log() -> str:
    """The kernel's ring buffer as text (needs CAP_SYSLOG, as the agent has); empty if unreadable."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        try:
            while True:
                try:
                    record = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: a record was overwritten while reading; go on
                    continue
                if not record:
                    break
                lines.append(record.decode(errors="replace").split(";", 1)[-1].rstrip("\n"))
        finally:
            os.close(fd)
    return "\n".join(lines)


# -- one VM at once (what agent/qos.py calls) ---------------------------------------------------------

class QosUnsupported(Exception):
    """The node cannot honour part of a VM's QoS; nothing of it was applied."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems
        self.reason = HOST_UNSUPPORTED


async def apply_qos(guest: TuningMixin, qos: EffectiveQos, caps: Capabilities, *, shares: int | None,
                    disk_targets: Mapping[str, str], tuned_before: Iterable[str] = ()) -> dict[str, Any]:
    """Applies CPU, memory and disk I/O of one running VM (network is node-wide: netshape.apply_node).

    `shares`: this VM's entry of floor_shares (None: its own or the default); `disk_targets`: disk name ->
    target (vda); `tuned_before`: disk names that had limits, to clear those no longer listed.
    Raises QosUnsupported (judge) before touching anything; returns what it applied (read back).
    """
    problems = judge(qos, caps)
    if problems:
        raise QosUnsupported(problems)
    await guest.apply_cpu(qos.cpu, shares if shares is not None else qos.cpu.shares, caps.default_shares)
    await guest.apply_memory(qos.memory)
    listed = {d.name: d for d in qos.disks}
    for name in sorted(set(listed) | set(tuned_before)):
        target = disk_targets.get(name)
        if target is not None:
            await guest.set_block_io_tune(target, BlockIoTune.from_api(listed.get(name)))
    return await read_applied(guest, {n: disk_targets[n] for n in listed if n in disk_targets})


async def read_applied(guest: TuningMixin, disk_targets: Mapping[str, str]) -> dict[str, Any]:
    """What libvirt reports as applied, in the API's units (for status and kubectl virsh)."""
    sched, mem = await guest.scheduler(), await guest.memory_parameters()
    quota = sched.global_quota
    out: dict[str, Any] = {
        "cpu": {"shares": sched.cpu_shares, "periodMicroseconds": sched.global_period,
                "quotaMicroseconds": quota if quota and 0 < quota < QUOTA_RANGE_US[1] else None},
        "memory": {"hardLimitKib": mem.hard_limit_kib, "softLimitKib": mem.soft_limit_kib},
        "disks": {},
    }
    for name, target in disk_targets.items():
        tune = await guest.block_io_tune(target)
        out["disks"][name] = {k: v for k, v in tune.params().items() if v}
    return out
