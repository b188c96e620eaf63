"""Guest device names of disks ('vda', 'sdb', 'hdc') per bus."""

from __future__ import annotations

import re
import string

from libvirt_operator.domain.errors import RenderError

BUS_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "usb": "sd", "ide": "hd"}


def target_name(prefix: str, index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa' (libvirt's scheme), with the prefix."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rest] + letters
    return prefix + letters


def target_index(name: str) -> tuple[str, int]:
    """'vdb' -> ('vd', 1); inverse of target_name."""
    match = re.fullmatch(r"(vd|sd|hd|xvd|ubd)([a-z]+)", name)
    if not match:
        raise ValueError(f"not a disk target name: {name!r}")
    index = 0
    for letter in match.group(2):
        index = index * 26 + string.ascii_lowercase.index(letter) + 1
    return match.group(1), index - 1


def assign_targets(disks: list[tuple[str, str | None]]) -> list[str]:
    """Targets for (bus, explicit target or None) pairs, in order: explicit ones
    are kept, the others get the lowest free name of their bus's prefix."""
    taken: set[str] = set()
    for bus, explicit in disks:
        if explicit is None:
            continue
        if target_index(explicit)[0] != BUS_PREFIX[bus]:
            raise RenderError(f"target {explicit!r} does not fit bus {bus!r} (expected {BUS_PREFIX[bus]}*)")
        if explicit in taken:
            raise RenderError(f"target {explicit!r} is used twice")
        taken.add(explicit)
    result = []
    next_index = dict.fromkeys(BUS_PREFIX.values(), 0)
    for bus, explicit in disks:
        if explicit is None:
            prefix = BUS_PREFIX[bus]
            while target_name(prefix, next_index[prefix]) in taken:
                next_index[prefix] += 1
            explicit = target_name(prefix, next_index[prefix])
            taken.add(explicit)
        result.append(explicit)
    return result
