"""CPU and memory verbs: setvcpus, setmem, vcpupin, emulatorpin (spec.cpu, spec.memory)."""

from __future__ import annotations

import argparse

from libvirt_operator.cli.outcomes import spec_applied
from libvirt_operator.cli.output import table
from libvirt_operator.cli.plan import PatchVM, Plan, Refused, arg, set_in_spec, verb
from libvirt_operator.cli.vmread import cpulist, human, power_state, size_arg, spec, to_bytes

MAX_VCPUS = 256
MIN_MEMORY = 16 * 2**20
RESTART_HINT = "it applies at the next restart ('kubectl virsh restart {name}')"


def _cpu(vm: dict) -> dict:
    return dict(spec(vm).get("cpu") or {})


def _vcpu_ceiling(vm: dict) -> int:
    cpu = _cpu(vm)
    return int(cpu.get("maxVcpus") or cpu.get("vcpus") or 1)


def _pinning(vm: dict) -> dict:
    pinning = dict(_cpu(vm).get("pinning") or {})
    pinning["vcpus"] = [dict(p) for p in pinning.get("vcpus") or []]
    return pinning


@verb("setvcpus", "set the number of vCPUs (spec.cpu.vcpus; live up to spec.cpu.maxVcpus)",
      arg("count", metavar="COUNT", type=int, help="vCPUs"))
def setvcpus(vm: dict, args: argparse.Namespace) -> Plan:
    name, cpu = vm["metadata"]["name"], _cpu(vm)
    count, current, ceiling = args.count, int(cpu.get("vcpus") or 1), cpu.get("maxVcpus")
    if not 1 <= count <= MAX_VCPUS:
        raise Refused(f"{name}: {count} vCPUs is out of range (1..{MAX_VCPUS})")
    if ceiling is not None and count > int(ceiling):
        raise Refused(f"{name}: {count} vCPUs is above cpu.maxVcpus ({ceiling}); raise spec.cpu.maxVcpus first "
                      "(a change of the ceiling needs a restart)")
    pinned = [p["vcpu"] for p in _pinning(vm)["vcpus"] if p["vcpu"] >= (ceiling or count)]
    if pinned:
        raise Refused(f"{name}: cpu.pinning.vcpus pins vCPU {', '.join(map(str, pinned))}, which would not exist "
                      f"with {count} vCPUs; unpin it first ('kubectl virsh vcpupin {name} {pinned[0]} --clear')")
    if count == current:
        return Plan(f"{name}: cpu.vcpus is already {count}", check=spec_applied(f"{count} vCPUs"))
    note = ""
    if ceiling is None and count > current and power_state(vm) != "Stopped":
        note = (f"{name} has no cpu.maxVcpus (no vCPU hot-add): " + RESTART_HINT).format(name=name)
    return Plan(f"{name}: vCPUs {current} -> {count} requested",
                actions=[PatchVM(set_in_spec(vm, ["cpu", "vcpus"], count))],
                check=spec_applied(f"{count} vCPUs"), note=note)


@verb("setmem", "set the guest memory (spec.memory.size; live up to spec.memory.maxSize)",
      arg("size", metavar="SIZE", help="a number of KiB (as virsh takes it) or a quantity, e.g. 256Mi"))
def setmem(vm: dict, args: argparse.Namespace) -> Plan:
    name = vm["metadata"]["name"]
    memory = dict(spec(vm).get("memory") or {})
    size = size_arg(args.size)
    new, current = to_bytes(size), to_bytes(memory.get("size") or "0")
    if new < MIN_MEMORY:
        raise Refused(f"{name}: memory {size} is below the minimum of 16Mi")
    if memory.get("maxSize") and new > to_bytes(memory["maxSize"]):
        raise Refused(f"{name}: memory {size} is above memory.maxSize ({memory['maxSize']}); raise "
                      "spec.memory.maxSize first (a change of the ceiling needs a restart)")
    if new == current:
        return Plan(f"{name}: memory.size is already {memory.get('size')}", check=spec_applied(f"memory {size}"))
    note = ""
    if not memory.get("maxSize") and new > current and power_state(vm) != "Stopped":
        note = (f"{name} has no memory.maxSize (no memory hot-add): " + RESTART_HINT).format(name=name)
    return Plan(f"{name}: memory {memory.get('size')} -> {size} requested",
                actions=[PatchVM(set_in_spec(vm, ["memory", "size"], size))],
                check=spec_applied(f"memory {size} ({human(new)})"), note=note)


@verb("vcpupin", "pin a vCPU to host CPUs (spec.cpu.pinning.vcpus); without CPULIST, show the pinning",
      arg("vcpu", metavar="VCPU", type=int, nargs="?", help="vCPU number (0-based)"),
      arg("cpulist", metavar="CPULIST", nargs="?", help="host CPUs, e.g. 0-3,6 or 0-3,^2"),
      arg("--clear", action="store_true", help="remove VCPU's pinning (it may run on any host CPU)"))
def vcpupin(vm: dict, args: argparse.Namespace) -> Plan:
    name, pinning = vm["metadata"]["name"], _pinning(vm)
    pins = {p["vcpu"]: p["cpuset"] for p in pinning["vcpus"]}
    ceiling = _vcpu_ceiling(vm)
    if args.vcpu is not None and not 0 <= args.vcpu < ceiling:
        raise Refused(f"{name} has no vCPU {args.vcpu} (vCPUs 0..{ceiling - 1}, up to cpu.maxVcpus)")
    if args.clear:
        if args.vcpu is None or args.cpulist is not None:
            raise Refused("--clear takes a VCPU and no CPULIST")
        if args.vcpu not in pins:
            return Plan(f"{name}: vCPU {args.vcpu} is not pinned", check=spec_applied("pinning"))
        pinning["vcpus"] = [p for p in pinning["vcpus"] if p["vcpu"] != args.vcpu]
        return Plan(f"{name}: vCPU {args.vcpu} unpinned", actions=[PatchVM(set_in_spec(vm, ["cpu", "pinning"],
                                                                                           pinning))],
                    check=spec_applied(f"vCPU {args.vcpu} unpinned"))
    if args.cpulist is None:
        shown = range(ceiling) if args.vcpu is None else [args.vcpu]
        return Plan(output=table(["VCPU", "CPU AFFINITY"], [[str(v), pins.get(v, "*")] for v in shown]))
    cpuset = cpulist(args.cpulist)
    if pins.get(args.vcpu) == cpuset:
        return Plan(f"{name}: vCPU {args.vcpu} is already pinned to {cpuset}", check=spec_applied("pinning"))
    pins[args.vcpu] = cpuset
    pinning["vcpus"] = [{"vcpu": v, "cpuset": c} for v, c in sorted(pins.items())]
    return Plan(f"{name}: vCPU {args.vcpu} pinned to host CPUs {cpuset}",
                actions=[PatchVM(set_in_spec(vm, ["cpu", "pinning"], pinning))],
                check=spec_applied(f"vCPU {args.vcpu} on {cpuset}"))


@verb("emulatorpin", "pin QEMU's emulator threads to host CPUs (spec.cpu.pinning.emulator); without CPULIST, "
      "show it", arg("cpulist", metavar="CPULIST", nargs="?", help="host CPUs, e.g. 0-1"),
      arg("--clear", action="store_true", help="remove the emulator pinning"))
def emulatorpin(vm: dict, args: argparse.Namespace) -> Plan:
    name, pinning = vm["metadata"]["name"], _pinning(vm)
    current = pinning.get("emulator")
    if args.clear:
        if args.cpulist is not None:
            raise Refused("--clear takes no CPULIST")
        if current is None:
            return Plan(f"{name}: the emulator is not pinned", check=spec_applied("pinning"))
        pinning.pop("emulator")
        return Plan(f"{name}: emulator unpinned", actions=[PatchVM(set_in_spec(vm, ["cpu", "pinning"], pinning))],
                    check=spec_applied("emulator unpinned"))
    if args.cpulist is None:
        return Plan(output=table(["EMULATOR CPU AFFINITY"], [[current or "*"]]))
    cpuset = cpulist(args.cpulist)
    if current == cpuset:
        return Plan(f"{name}: the emulator is already pinned to {cpuset}", check=spec_applied("pinning"))
    pinning["emulator"] = cpuset
    return Plan(f"{name}: emulator pinned to host CPUs {cpuset}",
                actions=[PatchVM(set_in_spec(vm, ["cpu", "pinning"], pinning))],
                check=spec_applied(f"emulator on {cpuset}"))
