"""QoS verbs: domiftune, schedinfo, memtune, blkdeviotune (spec.qos).

Without values each prints the effective values the controller resolved (status.qos, with the source of
each: `spec` or `policy/<name>`) beside what the node agent applied (status.qosApplied, read back from
libvirt and tc). With values it edits the VM's own spec.qos (which overrides every policy), guarded by
the generation; `--wait` follows QosApplied for the new generation. A value of 0 (or -1 where virsh
takes it for "unlimited") removes the VM's own setting, so a policy's value applies again.
"""

from __future__ import annotations

import argparse
import copy

from libvirt_operator.cli.output import table
from libvirt_operator.cli.plan import (
    Check,
    PatchVM,
    Plan,
    Refused,
    Result,
    arg,
    generation,
    guard,
    set_in_spec,
    verb,
)
from libvirt_operator.cli.vmread import condition, find_disk, interfaces, node_of, power_state, size_arg, spec, to_bytes

KIB_BITS = 8192  # 1 KiB/s in bit/s (tc reports bit/s)
PERIOD_US = 100_000  # the operator's CFS period: quota us / 1000 = percent of one host CPU


# -- reading -------------------------------------------------------------------------------------

def _own(vm: dict) -> dict:
    return copy.deepcopy(dict(spec(vm).get("qos") or {}))


def _status(vm: dict) -> dict:
    return (vm.get("status") or {}).get("qos") or {}


def _applied(vm: dict) -> dict:
    return (vm.get("status") or {}).get("qosApplied") or {}


def _effective(entry: dict | None, render=str) -> tuple[str, str]:
    if not entry:
        return "-", "-"
    return render(entry["value"]), entry["source"]


def _footer(vm: dict) -> str:
    st, applied, cond = _status(vm), _applied(vm), condition(vm, "QosApplied")
    lines = []
    if st and not st.get("valid", True):
        lines.append(f"status.qos is invalid: {st.get('reason')}: {st.get('message', '')}")
    if cond:
        lines.append(f"QosApplied: {cond.get('status')} ({cond.get('reason')})"
                     + (f" - {cond['message']}" if cond.get("message") else ""))
    else:
        lines.append("QosApplied: not reported yet")
    if applied:
        lines.append(f"node {node_of(vm) or '?'}: network mechanism {applied.get('networkMechanism', '?')}, "
                     f"cgroup {applied.get('cgroup', '?')}, applied for generation {applied.get('generation', '?')}")
    return "\n".join(lines)


def _show(vm: dict, rows: list[list[str]]) -> Plan:
    return Plan(output=table(["SETTING", "EFFECTIVE", "SOURCE", "APPLIED"], rows) + "\n" + _footer(vm))


def _rate(r: dict) -> str:
    text = f"{r['averageKibPerSecond']}"
    if r.get("peakKibPerSecond") or r.get("burstKib"):
        text += f",{r.get('peakKibPerSecond') or ''}"
    if r.get("burstKib"):
        text += f",{r['burstKib']}"
    return text + " KiB/s"


def _bits(n: int | None) -> str:
    return "-" if not n else f"{n / KIB_BITS:g} KiB/s"


# -- --wait --------------------------------------------------------------------------------------

def qos_applied(what: str):
    """The controller resolved the new generation and the agent applied it (QosApplied True for it), or the
    resolution is invalid / the agent refused it (QosApplied False for it: its reason). A stopped VM: resolved."""

    def for_update(updated: dict) -> Check:
        gen = generation(updated)
        stopped = power_state(updated) == "Stopped"

        def check(vm: dict) -> Result | None:
            st = _status(vm)
            if (st.get("observedGeneration") or 0) < gen:
                return None
            if not st.get("valid", True):
                return Result(False, f"{st.get('reason')}: {st.get('message', '')}")
            if stopped:
                return Result(True, f"{what} resolved (generation {gen}); the agent applies it when the VM starts")
            cond, applied = condition(vm, "QosApplied"), _applied(vm)
            if (cond.get("observedGeneration") or 0) < gen:
                return None
            if cond.get("status") == "False":
                return Result(False, f"QosApplied: {cond.get('reason')}: {cond.get('message', '')}")
            if cond.get("status") == "True" and (applied.get("generation") or 0) >= gen:
                return Result(True, f"{what} applied (generation {gen}, on {node_of(vm) or '?'})")
            return None

        return check

    return for_update


def _edit(vm: dict, qos: dict, summary: str, what: str) -> Plan:
    qos = {k: v for k, v in qos.items() if v not in (None, {}, [])}
    return Plan(summary, actions=[PatchVM(set_in_spec(vm, ["qos"], qos) if qos else _drop_qos(vm))],
                check=qos_applied(what))


def _drop_qos(vm: dict) -> list[dict]:
    if "qos" not in spec(vm):
        return [guard(vm)]
    return [guard(vm), {"op": "remove", "path": "/spec/qos"}]


def _unchanged(vm: dict, what: str) -> Plan:
    return Plan(f"{vm['metadata']['name']}: {what} unchanged", check=qos_applied(what))


# -- domiftune -----------------------------------------------------------------------------------

def _rate_arg(text: str, flag: str) -> dict | None:
    """virsh's `average[,peak[,burst]]` (KiB/s, KiB/s, KiB); 0 removes the direction."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) if p else None for p in parts]
    except ValueError:
        raise Refused(f"{flag} {text!r}: expected average[,peak[,burst]] in KiB/s (integers)") from None
    if len(values) > 3 or values[0] is None or any(v is not None and v < 0 for v in values):
        raise Refused(f"{flag} {text!r}: expected average[,peak[,burst]] in KiB/s (integers)")
    if values[0] == 0:
        return None
    out = {"averageKibPerSecond": values[0]}
    if len(values) > 1 and values[1]:
        if values[1] < values[0]:
            raise Refused(f"{flag} {text!r}: the peak cannot be below the average")
        out["peakKibPerSecond"] = values[1]
    if len(values) > 2 and values[2]:
        out["burstKib"] = values[2]
    return out


def _find_nic(vm: dict, key: str) -> str:
    for nic in interfaces(vm):
        if key in (nic.get("name"), (nic.get("mac") or "").lower()):
            return nic["name"]
    for nic in (vm.get("status") or {}).get("interfaces") or []:
        if key in (nic.get("target"), (nic.get("mac") or "").lower()) and nic.get("name"):
            return nic["name"]
    known = ", ".join(n["name"] for n in interfaces(vm)) or "none"
    raise Refused(f"{vm['metadata']['name']} has no interface {key!r} (interfaces: {known})")


@verb("domiftune", "show or set a NIC's bandwidth (spec.qos.network[]: inbound/outbound average,peak,burst)",
      arg("interface", metavar="IFACE", help="interface name (spec.interfaces[].name), MAC or tap"),
      arg("--inbound", metavar="AVG[,PEAK[,BURST]]", help="to the guest: KiB/s, KiB/s, KiB (0 removes)"),
      arg("--outbound", metavar="AVG[,PEAK[,BURST]]", help="from the guest: KiB/s, KiB/s, KiB (0 removes)"))
def domiftune(vm: dict, args: argparse.Namespace) -> Plan:
    name, nic = vm["metadata"]["name"], _find_nic(vm, args.interface.lower())
    if args.inbound is None and args.outbound is None:
        eff = next((n for n in _status(vm).get("network") or [] if n.get("name") == nic), {})
        rates = (_applied(vm).get("interfaces") or {}).get(nic) or {}
        group = eff.get("portGroup")
        rows = [["inbound", *_effective(eff.get("inbound"), _rate),
                 f"rate {_bits(rates.get('inboundRateBits'))}, ceil {_bits(rates.get('inboundCeilBits'))}"],
                ["outbound", *_effective(eff.get("outbound"), _rate),
                 f"rate {_bits(rates.get('outboundRateBits'))}, ceil {_bits(rates.get('outboundCeilBits'))}"],
                ["priority", *_effective(eff.get("priority")), "-"],
                ["queues", *_effective(eff.get("queues"), lambda qs: f"{len(qs)} queue(s)"), "-"],
                ["vlan", *_effective(eff.get("vlan")), "-"],
                ["portGroup", *_effective(group, lambda g: g["name"]), "-"]]
        return _show(vm, rows)
    qos = _own(vm)
    before = qos.get("network") or []
    network = copy.deepcopy(before)
    entry = next((n for n in network if n.get("name") == nic), None)
    if entry is None:
        entry = {"name": nic}
        network.append(entry)
    for key, text, flag in (("inbound", args.inbound, "--inbound"), ("outbound", args.outbound, "--outbound")):
        if text is not None:
            rate = _rate_arg(text, flag)
            if rate is None:
                entry.pop(key, None)
            else:
                entry[key] = rate
    network = [n for n in network if set(n) != {"name"}]
    if network == before:
        return _unchanged(vm, f"bandwidth of {nic}")
    qos["network"] = network
    shown = ", ".join(f"{k} {_rate(entry[k])}" for k in ("inbound", "outbound") if k in entry) or "no own limits"
    return _edit(vm, qos, f"{name}: {nic}: {shown} requested", f"bandwidth of {nic}")


# -- schedinfo -----------------------------------------------------------------------------------

_CPU_KEYS = {"cpu_shares": "shares", "limit_percent": "limitPercent", "min_percent": "minPercent",
             "reservation_percent": "reservationPercent"}
_QUOTA_KEYS = ("vcpu_quota", "global_quota")


def _cpu_setting(text: str) -> tuple[str, int | None]:
    """`key=value` of schedinfo --set as (spec.qos.cpu field, value or None to remove)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in (*_CPU_KEYS, *_QUOTA_KEYS):
        raise Refused(f"--set {text!r}: expected KEY=VALUE with KEY one of "
                      f"{', '.join((*_CPU_KEYS, *_QUOTA_KEYS))}")
    value = value.strip()
    percent = value.endswith("%")
    try:
        n = int(value.removesuffix("%"))
    except ValueError:
        raise Refused(f"--set {text!r}: the value must be an integer") from None
    if key in _QUOTA_KEYS:
        # The operator limits the whole VM (global_period 100000 us): a quota in us is percent x 1000.
        if n in (-1, 0):
            return "limitPercent", None
        if n < 0:
            raise Refused(f"--set {text!r}: a quota is a positive number of microseconds per 100 ms, or -1")
        if not percent and n % 1000:
            raise Refused(f"--set {text!r}: the operator's period is 100000 us; give the quota in whole "
                          f"percent of a host CPU (a multiple of 1000 us, or e.g. {key}=25%)")
        return "limitPercent", n if percent else n // 1000
    if n < 0:
        raise Refused(f"--set {text!r}: the value cannot be negative")
    return _CPU_KEYS[key], n or None


@verb("schedinfo", "show or set CPU QoS (spec.qos.cpu: cpu_shares, vcpu_quota/global_quota or limit_percent, "
      "min_percent, reservation_percent)",
      arg("--set", dest="settings", metavar="KEY=VALUE", action="append", default=[],
          help="cpu_shares=N; vcpu_quota=US (per 100000 us, whole VM) or =N%%; limit_percent=N; min_percent=N; "
               "reservation_percent=N (0 or -1 removes)"))
def schedinfo(vm: dict, args: argparse.Namespace) -> Plan:
    name = vm["metadata"]["name"]
    if not args.settings:
        cpu, applied = _status(vm).get("cpu") or {}, _applied(vm).get("cpu") or {}
        quota = applied.get("quotaMicroseconds")
        rows = [["cpu_shares", *_effective(cpu.get("shares")), str(applied.get("shares", "-"))],
                ["limit_percent (global_quota)", *_effective(cpu.get("limitPercent"), lambda v: f"{v}%"),
                 f"{quota} us / {applied.get('periodMicroseconds', PERIOD_US)} us" if quota else "unlimited"],
                ["min_percent", *_effective(cpu.get("minPercent"), lambda v: f"{v}%"), "(in cpu_shares)"],
                ["reservation_percent", *_effective(cpu.get("reservationPercent"), lambda v: f"{v}%"),
                 "(in cpu_shares)"]]
        return _show(vm, rows)
    qos = _own(vm)
    cpu = dict(qos.get("cpu") or {})
    before = dict(cpu)
    for text in args.settings:
        field, value = _cpu_setting(text)
        if value is None:
            cpu.pop(field, None)
        else:
            cpu[field] = value
    limit = cpu.get("limitPercent")
    for floor in ("minPercent", "reservationPercent"):
        if limit is not None and cpu.get(floor) is not None and cpu[floor] > limit:
            raise Refused(f"{name}: cpu.{floor} ({cpu[floor]}%) cannot exceed cpu.limitPercent ({limit}%)")
    if cpu == before:
        return _unchanged(vm, "CPU QoS")
    qos["cpu"] = cpu
    shown = ", ".join(f"{k}={v}" for k, v in sorted(cpu.items())) or "no own CPU QoS"
    return _edit(vm, qos, f"{name}: cpu {shown} requested", "CPU QoS")


# -- memtune -------------------------------------------------------------------------------------

_MEM_FLAGS = (("hard_limit", "hardLimit", "hardLimitKib"), ("soft_limit", "softLimit", "softLimitKib"),
              ("min_guarantee", "guarantee", None))


def _kib(n: int | None) -> str:
    return "-" if not n else f"{n} KiB"


@verb("memtune", "show or set memory QoS (spec.qos.memory: hard limit, soft limit, guarantee)",
      arg("--hard-limit", dest="hard_limit", metavar="SIZE", help="KiB (as virsh) or a quantity; -1 or 0 removes"),
      arg("--soft-limit", dest="soft_limit", metavar="SIZE", help="KiB or a quantity; -1 or 0 removes"),
      arg("--min-guarantee", dest="min_guarantee", metavar="SIZE",
          help="KiB or a quantity: never reclaimed or ballooned below; -1 or 0 removes"))
def memtune(vm: dict, args: argparse.Namespace) -> Plan:
    name = vm["metadata"]["name"]
    given = {flag: getattr(args, flag) for flag, _, _ in _MEM_FLAGS if getattr(args, flag) is not None}
    if not given:
        memory, applied = _status(vm).get("memory") or {}, _applied(vm).get("memory") or {}
        rows = [[flag, *_effective(memory.get(field)), _kib(applied.get(key)) if key else "(in soft_limit)"]
                for flag, field, key in _MEM_FLAGS]
        return _show(vm, rows)
    qos = _own(vm)
    memory = dict(qos.get("memory") or {})
    before = dict(memory)
    for flag, field, _ in _MEM_FLAGS:
        if flag not in given:
            continue
        text = given[flag].strip()
        if text in ("-1", "0"):
            memory.pop(field, None)
        else:
            memory[field] = size_arg(text)
    size = spec(vm).get("memory", {}).get("size")
    hard = memory.get("hardLimit")
    for field in ("softLimit", "guarantee"):
        if hard and memory.get(field) and to_bytes(memory[field]) > to_bytes(hard):
            raise Refused(f"{name}: memory.{field} ({memory[field]}) cannot exceed memory.hardLimit ({hard})")
    if size and memory.get("guarantee") and to_bytes(memory["guarantee"]) > to_bytes(size):
        raise Refused(f"{name}: memory.guarantee ({memory['guarantee']}) cannot exceed memory.size ({size})")
    if memory == before:
        return _unchanged(vm, "memory QoS")
    qos["memory"] = memory
    shown = ", ".join(f"{k}={v}" for k, v in sorted(memory.items())) or "no own memory QoS"
    return _edit(vm, qos, f"{name}: memory {shown} requested", "memory QoS")


# -- blkdeviotune --------------------------------------------------------------------------------

_IO_FLAGS = (("total_bytes_sec", "totalBytesPerSecond"), ("read_bytes_sec", "readBytesPerSecond"),
             ("write_bytes_sec", "writeBytesPerSecond"), ("total_iops_sec", "totalIops"),
             ("read_iops_sec", "readIops"), ("write_iops_sec", "writeIops"))


@verb("blkdeviotune", "show or set a disk's I/O limits (spec.qos.disks[]: bytes/s and IOPS)",
      arg("disk", metavar="DISK", help="disk name, target (vda) or path"),
      *[arg(f"--{flag.replace('_', '-')}", dest=flag, type=int, metavar="N", help=f"{field} (0 removes)")
        for flag, field in _IO_FLAGS])
def blkdeviotune(vm: dict, args: argparse.Namespace) -> Plan:
    name = vm["metadata"]["name"]
    _, disk = find_disk(vm, args.disk)
    given = {field: getattr(args, flag) for flag, field in _IO_FLAGS if getattr(args, flag) is not None}
    if not given:
        eff = next((d for d in _status(vm).get("disks") or [] if d.get("name") == disk["name"]), {})
        tune = (eff.get("ioTune") or {}).get("value") or {}
        source = (eff.get("ioTune") or {}).get("source", "-")
        applied = (_applied(vm).get("disks") or {}).get(disk["name"]) or {}
        rows = [[flag, str(tune.get(field, "-")), source if field in tune else "-", str(applied.get(flag, "-"))]
                for flag, field in _IO_FLAGS]
        return _show(vm, rows)
    if any(v < 0 for v in given.values()):
        raise Refused("I/O limits cannot be negative (0 removes one)")
    qos = _own(vm)
    disks = [dict(d) for d in qos.get("disks") or []]
    entry = next((d for d in disks if d.get("name") == disk["name"]), None)
    if entry is None:
        entry = {"name": disk["name"]}
        disks.append(entry)
    before = dict(entry)
    for field, value in given.items():
        if value == 0:
            entry.pop(field, None)
        else:
            entry[field] = value
    for kind, total, pair in (("bytes", "totalBytesPerSecond", ("readBytesPerSecond", "writeBytesPerSecond")),
                              ("IOPS", "totalIops", ("readIops", "writeIops"))):
        if total in entry and any(p in entry for p in pair):
            raise Refused(f"{name}: disk {disk['name']}: a total {kind} limit excludes the read/write ones; "
                          "set those to 0 in the same command")
    if entry == before:
        return _unchanged(vm, f"I/O limits of {disk['name']}")
    qos["disks"] = [d for d in disks if set(d) != {"name"}]
    shown = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "name") or "no own limits"
    return _edit(vm, qos, f"{name}: disk {disk['name']}: {shown} requested", f"I/O limits of {disk['name']}")
