"""Reading a VirtualMachine object (a dict as the API server returns it): pure helpers."""

from __future__ import annotations

import re

from libvirt_operator.api import meta, quantity
from libvirt_operator.cli.plan import Refused, generation
from libvirt_operator.domain import cpuset
from libvirt_operator.domain.errors import RenderError
from libvirt_operator.domain.targets import assign_targets

__all__ = ["generation"]


def condition(vm: dict, type_: str) -> dict:
    for c in (vm.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def state_reason(vm: dict) -> tuple[str, str]:
    """Why the VM is in its state: the Failure condition when it is on, else Ready's reason and message."""
    failure = condition(vm, "Failure")
    if failure.get("status") == "True":
        return failure.get("reason", ""), failure.get("message", "")
    ready = condition(vm, "Ready")
    return ready.get("reason", ""), ready.get("message", "")


def halted(vm: dict) -> bool:
    """Stopped on its own at the current generation: the agent keeps it stopped until the spec changes."""
    return (vm.get("status") or {}).get("haltedGeneration") == generation(vm)


def node_of(vm: dict) -> str:
    return (vm.get("status") or {}).get("nodeName") or (vm["metadata"].get("labels") or {}).get(meta.NODE_LABEL, "")


def describe(vm: dict) -> str:
    """One line: phase, and why (reason: message)."""
    reason, message = state_reason(vm)
    line = (vm.get("status") or {}).get("phase") or "no status yet"
    if reason:
        line += f" ({reason}: {message})" if message else f" ({reason})"
    return line


def spec(vm: dict) -> dict:
    return vm.get("spec") or {}


def power_state(vm: dict) -> str:
    return spec(vm).get("powerState", "Running")


# -- devices -------------------------------------------------------------------------------------

def disks(vm: dict) -> list[dict]:
    return list(spec(vm).get("disks") or [])


def interfaces(vm: dict) -> list[dict]:
    return list(spec(vm).get("interfaces") or [])


def reported(vm: dict, kind: str) -> dict[str, dict]:
    """status.disks / status.interfaces by name."""
    return {d["name"]: d for d in (vm.get("status") or {}).get(kind) or [] if d.get("name")}


def default_bus(disk: dict) -> str:
    return disk.get("bus") or ("sata" if disk.get("device") == "cdrom" else "virtio")


def assigned_targets(vm: dict) -> dict[str, str]:
    """Each spec disk's target as the agent assigns it: explicit ones kept, the rest by bus order."""
    items = disks(vm)
    try:
        assigned = assign_targets([(default_bus(d), d.get("target")) for d in items])
    except (RenderError, ValueError, KeyError):  # the agent refuses such a spec; show what is explicit
        return {d["name"]: d["target"] for d in items if d.get("target")}
    return {d["name"]: t for d, t in zip(items, assigned, strict=True)}


def disk_target(vm: dict, disk: dict) -> str | None:
    """The disk's guest target: the spec's, else the one the node agent reports, else the one it will assign."""
    return disk.get("target") or (reported(vm, "disks").get(disk["name"]) or {}).get("target") \
        or assigned_targets(vm).get(disk["name"])


def find_disk(vm: dict, key: str) -> tuple[int, dict]:
    """The spec disk named `key`, or whose target or path is `key` (as virsh takes a target or a source)."""
    items = disks(vm)
    for by in (lambda d: d.get("name"), lambda d: disk_target(vm, d), lambda d: d.get("path")):
        found = [(i, d) for i, d in enumerate(items) if by(d) == key]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise Refused(f"{vm['metadata']['name']}: {len(found)} disks match {key!r}; name one by its name")
    known = ", ".join(f"{d['name']} ({disk_target(vm, d) or 'target not yet assigned'})" for d in items) or "none"
    raise Refused(f"{vm['metadata']['name']} has no disk {key!r} (disks: {known})")


# -- values --------------------------------------------------------------------------------------

_QUANTITY = re.compile(quantity.PATTERN)


def size_arg(text: str) -> str:
    """A size as virsh takes it (a plain number is KiB) or a Kubernetes quantity, as a quantity."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return f"{int(text)}Ki"
    if not _QUANTITY.fullmatch(text):
        raise Refused(f"not a size: {text!r} (a number of KiB, or a quantity such as 256Mi or 10Gi)")
    return text


def to_bytes(size: str) -> int:
    return quantity.to_bytes(size)


def human(n: int) -> str:
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B" if n < 1024 else f"{n / 2**20:.1f}Mi"


def cpulist(text: str) -> str:
    """A host CPU list as virsh takes it ('0-3,^2', '1,3') in the spec's form ('0-1,3')."""
    chosen: set[int] = set()
    excluded: set[int] = set()
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\^?)([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise Refused(f"not a CPU list: {text!r} (e.g. 0-3,6 or 0-3,^2)")
        lo, hi = int(m.group(2)), int(m.group(3) or m.group(2))
        if hi < lo:
            raise Refused(f"not a CPU list: {text!r} ({lo}-{hi} is backwards)")
        (excluded if m.group(1) else chosen).update(range(lo, hi + 1))
    cpus = sorted(chosen - excluded)
    if not cpus:
        raise Refused(f"CPU list {text!r} names no CPU")
    return cpuset.format_cpus(cpus)
