"""The live-update planner (pure): from the desired, live and stored domain XML, the ordered
steps that bring the running domain to its spec, and what only a restart can change.

Every step changes the live domain only (VIR_DOMAIN_AFFECT_LIVE): the persistent definition
is rewritten from the desired render before the steps run, so it already holds them. Devices
are matched by their ``ua-`` alias; a device's XML for an attach comes from the stored
definition, which carries the PCI address libvirt gave it there.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from libvirt_operator.domain import naming
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.cpuset import canonical
from libvirt_operator.domain.devices import Disk, HostDev, Interface, MemoryDevice

# The balloon reports the guest's actual size, which may stay a little under the target.
BALLOON_SLACK_KIB = 8 * 1024
# The guest onlines hot-added memory in blocks of this size, at addresses aligned to it; QEMU
# places DIMMs back to back, so one DIMM of another size would strand every later one.
DIMM_ALIGN_KIB = 128 * 1024
# Buses whose disks QEMU can hot-plug (SATA/IDE devices exist only from boot).
HOTPLUG_BUSES = ("virtio", "scsi", "usb")


class Op(enum.Enum):
    DETACH = "detach"  # detach_device_alias(alias)
    ATTACH = "attach"  # attach_device(xml)
    UPDATE = "update"  # update_device(xml): CD-ROM media, NIC source
    SET_VCPUS = "set-vcpus"  # set_vcpus(value)
    PIN_VCPU = "pin-vcpu"  # pin_vcpu(vcpu, cpuset)
    PIN_EMULATOR = "pin-emulator"  # pin_emulator(cpuset)
    SET_MEMORY = "set-memory"  # set_memory(KiB): the balloon back to full size
    RESIZE = "resize"  # block_resize(target, bytes)


# Order of execution: free slots and memory first, then add, then tune.
_ORDER = [Op.DETACH, Op.ATTACH, Op.UPDATE, Op.SET_VCPUS, Op.SET_MEMORY, Op.PIN_VCPU, Op.PIN_EMULATOR, Op.RESIZE]


@dataclass(frozen=True)
class Step:
    op: Op
    field: str  # the spec field it serves, e.g. disks[data]
    alias: str | None = None
    xml: str | None = None
    value: int | str | None = None
    vcpu: int | None = None
    target: str | None = None  # disk target, for RESIZE

    def describe(self) -> str:
        what = self.alias or self.target or (f"vcpu {self.vcpu}" if self.vcpu is not None else "")
        return " ".join(str(p) for p in (self.op.value, what, self.value) if p not in (None, ""))


@dataclass(frozen=True)
class HostCaps:
    cpus: int  # host CPUs: an unpinned vCPU may run on all of them
    vcpu_unplug: bool = True
    dimm_unplug: bool = True


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)  # fields only a restart applies
    refused: list[tuple[str, str]] = field(default_factory=list)  # (field, why): never done, e.g. shrink
    drifted: list[str] = field(default_factory=list)  # live differences nothing can undo live

    @property
    def converged(self) -> bool:
        return not (self.steps or self.restart or self.refused or self.drifted)

    def ordered(self) -> list[Step]:
        return sorted(self.steps, key=lambda s: _ORDER.index(s.op))


def plan(desired: DomainConfig, live: DomainConfig, stored: DomainConfig | None = None, *,
         caps: HostCaps, sizes: dict[str, int] | None = None,
         capacities: dict[str, int] | None = None) -> Plan:
    """``sizes``: disk alias -> bytes the spec asks for; ``capacities``: disk alias -> the live size."""
    p = Plan()
    stored = stored or desired
    _boot_fields(desired, live, p)
    _vcpus(desired, live, p, caps)
    _pinning(desired, live, p, caps)
    _memory(desired, live, p, caps)
    _disks(desired, live, stored, p)
    _interfaces(desired, live, stored, p)
    _hostdevs(desired, live, stored, p)
    _sizes(live, sizes or {}, capacities or {}, p)
    p.steps = p.ordered()
    return p


# -- domain-level fields -------------------------------------------------------------------------

def _boot_fields(desired: DomainConfig, live: DomainConfig, p: Plan) -> None:
    want = desired.operator_metadata.boot_fields if desired.operator_metadata else {}
    have = live.operator_metadata.boot_fields if live.operator_metadata else {}
    if not have:
        return  # started before boot fields were recorded: nothing to compare
    p.restart += sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))


def _vcpus(desired: DomainConfig, live: DomainConfig, p: Plan, caps: HostCaps) -> None:
    want, have = desired.vcpus_online, live.vcpus_online
    if want == have:
        return
    if want > (live.vcpus_max or 0) or (want < have and not caps.vcpu_unplug):
        _restart(p, "cpu.vcpus")
    else:
        p.steps.append(Step(Op.SET_VCPUS, "cpu.vcpus", value=want))


def _pinning(desired: DomainConfig, live: DomainConfig, p: Plan, caps: HostCaps) -> None:
    every = f"0-{caps.cpus - 1}" if caps.cpus > 1 else "0"
    want = desired.cputune.pins() if desired.cputune else {}
    have = live.cputune.pins() if live.cputune else {}
    for vcpu in sorted(want.keys() | have.keys()):
        if vcpu >= (live.vcpus_max or 0):
            continue
        cpuset = canonical(want.get(vcpu, every))
        if cpuset != canonical(have.get(vcpu, every)):
            p.steps.append(Step(Op.PIN_VCPU, "cpu.pinning.vcpus", vcpu=vcpu, value=cpuset))
    want_emu = desired.cputune.emulator_cpuset if desired.cputune else None
    have_emu = live.cputune.emulator_cpuset if live.cputune else None
    if canonical(want_emu or every) != canonical(have_emu or every):
        p.steps.append(Step(Op.PIN_EMULATOR, "cpu.pinning.emulator", value=canonical(want_emu or every)))


def _memory(desired: DomainConfig, live: DomainConfig, p: Plan, caps: HostCaps) -> None:
    want, have = desired.memory_kib or 0, live.memory_kib or 0
    dimms = [m for m in live.devices.memories if m.model == "dimm"] if live.devices else []
    if want > have:
        if ((live.max_memory_kib or 0) < want or len(dimms) >= (live.max_memory_slots or 0)
                or (want - have) % DIMM_ALIGN_KIB):
            _restart(p, "memory.size")
        else:
            index = 1 + max((_dimm_index(m) for m in dimms), default=-1)
            dimm = MemoryDevice(model="dimm", size_kib=want - have, node=0, alias=naming.dimm_alias(index))
            p.steps.append(Step(Op.ATTACH, "memory.size", alias=dimm.alias, xml=dimm.to_xml()))
    elif want < have:
        removable = _dimms_summing_to(sorted(dimms, key=_dimm_index, reverse=True), have - want)
        if removable is None or not caps.dimm_unplug:
            _restart(p, "memory.size")
        else:
            p.steps += [Step(Op.DETACH, "memory.size", alias=m.alias) for m in removable]
    elif (live.current_memory_kib or have) < have - BALLOON_SLACK_KIB:
        # ballooned below its size (e.g. a hand `virsh setmem`): give the guest its memory back
        p.steps.append(Step(Op.SET_MEMORY, "memory.size", value=have))


def _dimm_index(m: MemoryDevice) -> int:
    alias = m.alias or ""
    tail = alias.removeprefix(naming.DIMM_ALIAS_PREFIX)
    return int(tail) if alias.startswith(naming.DIMM_ALIAS_PREFIX) and tail.isdigit() else -1


def _dimms_summing_to(dimms: list[MemoryDevice], total: int) -> list[MemoryDevice] | None:
    """The fewest of our DIMMs (newest first on a tie) whose sizes add up to exactly ``total`` KiB."""
    ours = [m for m in dimms if _dimm_index(m) >= 0]
    for n in range(1, len(ours) + 1):
        for combo in itertools.combinations(ours, n):
            if sum(m.size_kib or 0 for m in combo) == total:
                return list(combo)
    return None


# -- devices -------------------------------------------------------------------------------------

def _by_alias(items) -> dict[str, object]:
    return {d.user_alias: d for d in items if d.user_alias}


def _field(alias: str) -> str:
    for prefix, family in ((naming.DISK_ALIAS_PREFIX, "disks"), (naming.NIC_ALIAS_PREFIX, "interfaces"),
                           (naming.HOSTDEV_ALIAS_PREFIX, "hostDevices")):
        if alias.startswith(prefix):
            return f"{family}[{alias.removeprefix(prefix)}]"
    return alias


def _stored_xml(alias: str, stored: DomainConfig, desired_dev) -> str:
    dev = stored.devices.by_alias(alias) if stored.devices else None
    return (dev if dev is not None and dev.element.tag == desired_dev.element.tag else desired_dev).to_xml()


def _disk_identity(d: Disk) -> tuple:
    if d.is_cdrom:  # the format belongs to the media (libvirt drops it for an empty drive)
        return (d.device, d.target_bus, d.target_dev)
    return (d.device, d.target_bus, d.target_dev, d.driver_type, bool(d.readonly))


def _disks(desired: DomainConfig, live: DomainConfig, stored: DomainConfig, p: Plan) -> None:
    want, have = _by_alias(desired.devices.disks), _by_alias(live.devices.disks)
    for alias, d in want.items():
        cur = have.get(alias)
        hot = d.target_bus in HOTPLUG_BUSES
        if cur is None:
            if hot:
                p.steps.append(Step(Op.ATTACH, _field(alias), alias=alias, xml=_stored_xml(alias, stored, d)))
            else:
                _restart(p, _field(alias))
        elif _disk_identity(d) != _disk_identity(cur):
            _restart(p, _field(alias))
        elif d.source_file != cur.source_file:
            if d.is_cdrom:
                p.steps.append(Step(Op.UPDATE, _field(alias), alias=alias, xml=_stored_xml(alias, stored, d)))
            else:
                _restart(p, _field(alias))
    for alias, cur in have.items():
        if alias not in want:
            if cur.target_bus in HOTPLUG_BUSES:
                p.steps.append(Step(Op.DETACH, _field(alias), alias=alias))
            else:
                _restart(p, _field(alias))


def _nic_identity(n: Interface) -> tuple:
    return (n.type, n.mac_address, n.model_type if n.type != "hostdev" else None)


def _interfaces(desired: DomainConfig, live: DomainConfig, stored: DomainConfig, p: Plan) -> None:
    want, have = _by_alias(desired.devices.interfaces), _by_alias(live.devices.interfaces)
    for alias, n in want.items():
        cur = have.get(alias)
        if cur is None:
            p.steps.append(Step(Op.ATTACH, _field(alias), alias=alias, xml=_stored_xml(alias, stored, n)))
        elif _nic_identity(n) != _nic_identity(cur):
            _restart(p, _field(alias))
        elif n.source != cur.source:
            if n.type in ("network", "bridge"):
                p.steps.append(Step(Op.UPDATE, _field(alias), alias=alias, xml=_stored_xml(alias, stored, n)))
            else:
                _restart(p, _field(alias))
    p.steps += [Step(Op.DETACH, _field(a), alias=a) for a in have if a not in want]


def _hostdevs(desired: DomainConfig, live: DomainConfig, stored: DomainConfig, p: Plan) -> None:
    want, have = _by_alias(desired.devices.hostdevs), _by_alias(live.devices.hostdevs)
    for alias, h in want.items():
        cur = have.get(alias)
        if cur is None:
            p.steps.append(Step(Op.ATTACH, _field(alias), alias=alias, xml=_stored_xml(alias, stored, h)))
        elif _hostdev_identity(h) != _hostdev_identity(cur):
            _restart(p, _field(alias))
    p.steps += [Step(Op.DETACH, _field(a), alias=a) for a in have if a not in want]


def _hostdev_identity(h: HostDev) -> tuple:
    return (h.type, h.pci_address, h.usb_vendor, h.usb_product)


def _sizes(live: DomainConfig, sizes: dict[str, int], capacities: dict[str, int], p: Plan) -> None:
    live_disks = _by_alias(live.devices.disks)
    for alias, want in sorted(sizes.items()):
        disk, have = live_disks.get(alias), capacities.get(alias)
        if disk is None or have is None:
            continue  # attached by a step of this plan: sized on the next pass
        if want > have:
            p.steps.append(Step(Op.RESIZE, f"{_field(alias)}.size", alias=alias, target=disk.target_dev, value=want))
        elif want < have:
            p.refused.append((f"{_field(alias)}.size",
                              f"the disk is {have} bytes, the spec asks for {want}: disks are never shrunk"))


def _restart(p: Plan, field_: str) -> None:
    if field_ not in p.restart:
        p.restart.append(field_)
