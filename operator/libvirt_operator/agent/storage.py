"""Confine every host path a spec names to the admin-configured storage roots."""

from __future__ import annotations

import os
from pathlib import Path

from libvirt_operator.api.virtualmachine import VirtualMachineSpec


def spec_paths(spec: VirtualMachineSpec) -> list[tuple[str, str]]:
    """(field, path) for each host path in the spec."""
    out = []
    if spec.boot.kernel:
        out.append(("boot.kernel.kernel", spec.boot.kernel.kernel))
        if spec.boot.kernel.initrd:
            out.append(("boot.kernel.initrd", spec.boot.kernel.initrd))
    out += [(f"disks[{d.name}].path", d.path) for d in spec.disks if d.path]
    return out


def outside_roots(spec: VirtualMachineSpec, roots: tuple[Path, ...]) -> list[str]:
    """Problems, one per path that does not resolve (symlinks included) under a root."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    problems = []
    for field, path in spec_paths(spec):
        real = Path(os.path.realpath(path))
        if not any(real == r or r in real.parents for r in real_roots):
            problems.append(f"{field} {path!r} is outside the storage roots ({', '.join(map(str, roots))})")
    return problems


def missing_files(spec: VirtualMachineSpec) -> list[str]:
    return [f"{field} {path!r} does not exist" for field, path in spec_paths(spec) if not os.path.exists(path)]
