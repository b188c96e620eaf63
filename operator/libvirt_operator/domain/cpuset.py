"""libvirt's cpuset syntax ("0-3,^2,6") <-> sets of CPU numbers <-> cpumap tuples."""

from __future__ import annotations

from collections.abc import Iterable


def parse(cpuset: str) -> frozenset[int]:
    """The CPUs a cpuset names: comma-separated numbers and ranges, ``^N`` excludes N.
    ValueError for bad syntax or an empty result."""
    chosen: set[int] = set()
    excluded: set[int] = set()
    for part in cpuset.replace(" ", "").split(","):
        target = chosen
        if part.startswith("^"):
            target, part = excluded, part[1:]
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"bad cpuset {cpuset!r}: {part!r} is not a CPU number or range")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"bad cpuset {cpuset!r}: range {part!r} runs backwards")
        target.update(range(low, high + 1))
    cpus = frozenset(chosen - excluded)
    if not cpus:
        raise ValueError(f"cpuset {cpuset!r} names no CPU")
    return cpus


def format_cpus(cpus: Iterable[int]) -> str:
    """The canonical cpuset of a set of CPUs: ascending, ranges of 2+ as a-b ("0-1,3")."""
    ordered = sorted(set(cpus))
    if not ordered or ordered[0] < 0:
        raise ValueError(f"not a set of CPUs: {ordered}")
    parts = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def canonical(cpuset: str) -> str:
    """``cpuset`` rewritten canonically ("3,0-1,^1" -> "0,3")."""
    return format_cpus(parse(cpuset))


def to_cpumap(cpuset: str, host_cpus: int) -> tuple[bool, ...]:
    """The cpumap libvirt's pin calls take: one bool per host CPU. ValueError if the
    cpuset names a CPU the host does not have."""
    cpus = parse(cpuset)
    if max(cpus) >= host_cpus:
        raise ValueError(f"cpuset {cpuset!r} names CPU {max(cpus)}, the host has CPUs 0-{host_cpus - 1}")
    return tuple(cpu in cpus for cpu in range(host_cpus))


def from_cpumap(cpumap: Iterable[bool]) -> str:
    """The canonical cpuset of a cpumap as libvirt returns it."""
    return format_cpus(cpu for cpu, on in enumerate(cpumap) if on)
