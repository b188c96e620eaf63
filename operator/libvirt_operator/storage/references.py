"""Which image files something still needs (pure).

Owners are named by the caller ("vm/default/web", "snapshot/default/s1", "clone/default/web-2"...).
A VM's and a clone's chains reference every layer (the active file and all its backing files); a
snapshot references the files it consists of (its backing nodes and its memory image). A file is
deletable only when no owner other than the ones being removed references it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from libvirt_operator.storage.chain import Chain


@dataclass(frozen=True)
class Verdict:
    delete: tuple[str, ...]  # nobody else references these
    keep: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> the other owners holding it


class References:
    def __init__(self) -> None:
        self._owners: dict[str, set[str]] = {}

    def add_chain(self, owner: str, chain: Chain) -> References:
        return self.add_files(owner, chain.paths)

    def add_chains(self, owner: str, chains: Iterable[Chain]) -> References:
        for chain in chains:
            self.add_chain(owner, chain)
        return self

    def add_files(self, owner: str, paths: Iterable[str]) -> References:
        for path in paths:
            self._owners.setdefault(_norm(path), set()).add(owner)
        return self

    def owners(self, path: str) -> frozenset[str]:
        return frozenset(self._owners.get(_norm(path), ()))

    def referenced(self) -> frozenset[str]:
        return frozenset(self._owners)

    def verdict(self, files: Iterable[str], removing: Iterable[str]) -> Verdict:
        """Of `files` (those of the owners being removed), which may go once `removing` are gone,
        and which stay, held by whom."""
        gone = set(removing)
        delete, keep = [], {}
        for path in dict.fromkeys(_norm(p) for p in files):
            others = sorted(self._owners.get(path, set()) - gone)
            if others:
                keep[path] = tuple(others)
            else:
                delete.append(path)
        return Verdict(tuple(delete), keep)

    def orphans(self, existing: Iterable[str]) -> tuple[str, ...]:
        """Of the files that exist (e.g. those the operator made under a root), the ones nobody references."""
        return tuple(sorted({_norm(p) for p in existing} - set(self._owners)))


def _norm(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"reference paths must be absolute, not {path!r}")
    return os.path.normpath(path)
