"""A disk's chain: the active file (the leaf the VM writes) and its backing files, nearest first.

Pure: read from `qemu-img info --backing-chain --output=json` (chain_from_qemu_img) or from a live
domain XML's nested <backingStore> elements (chains_from_domain_xml), and changed the way snapshots
and block jobs change it (with_leaf, after_commit, after_pull). Paths are absolute and normalized;
a relative backing name is relative to the directory of the file that names it (as QEMU reads it).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layer:
    path: str
    format: str  # qcow2, raw, ...; "" when the source did not say

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "format": self.format}


@dataclass(frozen=True)
class Chain:
    """layers[0] is the active file; each next layer is the backing file of the one before."""

    layers: tuple[Layer, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a chain has at least its active file")
        paths = [layer.path for layer in self.layers]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a file appears twice in one chain: {paths}")

    @classmethod
    def of(cls, *layers: tuple[str, str] | Layer) -> Chain:
        """Chain.of(("/leaf.qcow2", "qcow2"), ("/base.raw", "raw"))."""
        return cls(tuple(x if isinstance(x, Layer) else Layer(_norm(x[0]), x[1]) for x in layers))

    @property
    def active(self) -> Layer:
        return self.layers[0]

    @property
    def backing(self) -> tuple[Layer, ...]:
        """The backing files, nearest first (empty for a file without backing)."""
        return self.layers[1:]

    @property
    def base(self) -> Layer:
        return self.layers[-1]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and _norm(path) in self.paths

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def index(self, path: str) -> int:
        try:
            return self.paths.index(_norm(path))
        except ValueError:
            raise ValueError(f"{path} is not in the chain {list(self.paths)}") from None

    def backing_of(self, path: str) -> Layer | None:
        """The layer directly below `path` (None for the base)."""
        i = self.index(path)
        return self.layers[i + 1] if i + 1 < len(self.layers) else None

    # -- what operations make of a chain ---------------------------------------------------------

    def with_leaf(self, path: str, fmt: str = "qcow2") -> Chain:
        """After an external snapshot (or a new leaf for a revert/clone): `path` on top."""
        return Chain((Layer(_norm(path), fmt), *self.layers))

    def from_layer(self, path: str) -> Chain:
        """The chain as seen from `path` downwards (e.g. what a new leaf on it would get)."""
        return Chain(self.layers[self.index(path):])

    def after_commit(self, top: str | None = None, base: str | None = None) -> Chain:
        """After blockCommit of `top` (default: the active file, then pivoted) into `base`
        (default: top's backing file): the layers from top down to just above base are gone,
        and base takes the place of top."""
        top_i = 0 if top is None else self.index(top)
        base_i = top_i + 1 if base is None else self.index(base)
        if base_i <= top_i or base_i >= len(self.layers):
            raise ValueError(f"cannot commit {self.layers[top_i].path} into "
                             f"{base if base is not None else 'nothing'}: base must lie below top")
        return Chain(self.layers[:top_i] + self.layers[base_i:])

    def after_pull(self, base: str | None = None) -> Chain:
        """After blockPull into the active file: the layers above `base` (default: all of them)
        are merged into the active file; base (if any) stays its backing file."""
        if base is None:
            return Chain(self.layers[:1])
        base_i = self.index(base)
        if base_i == 0:
            raise ValueError("the active file cannot be its own base")
        return Chain(self.layers[:1] + self.layers[base_i:])

    def to_list(self) -> list[dict[str, str]]:
        return [layer.to_dict() for layer in self.layers]

    @classmethod
    def from_list(cls, items: Iterable[Mapping[str, str]]) -> Chain:
        return cls(tuple(Layer(_norm(i["path"]), i.get("format", "")) for i in items))


def _norm(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"chain paths must be absolute, not {path!r}")
    return os.path.normpath(path)


def _resolve(name: str, relative_to: str) -> str:
    return _norm(name if os.path.isabs(name) else os.path.join(os.path.dirname(relative_to), name))


def chain_from_qemu_img(path: str, entries: list[dict[str, Any]]) -> Chain:
    """The chain of `path` from `qemu-img info --backing-chain --output=json path` (a list, active
    first). The paths come from each entry's backing-filename, resolved against the file naming it."""
    if not entries:
        raise ValueError(f"qemu-img reported nothing for {path}")
    current = _norm(os.path.abspath(path))
    layers = []
    for n, entry in enumerate(entries):
        layers.append(Layer(current, entry.get("format", "")))
        name = entry.get("backing-filename")
        if name is None:
            if n + 1 != len(entries):
                raise ValueError(f"{current} has no backing file but qemu-img lists more layers")
            break
        current = _resolve(name, current)
    else:
        raise ValueError(f"{layers[-1].path} names a backing file qemu-img did not list")
    return Chain(tuple(layers))


def chains_from_domain_xml(domain_xml: str) -> dict[str, Chain]:
    """{target: chain} of every file-backed disk with a source in a domain XML. Live XML carries the
    whole chain in nested <backingStore>; inactive XML only the source (a one-layer chain)."""
    chains = {}
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        target = disk.find("target")
        chain = chain_from_disk_element(disk)
        if target is not None and target.get("dev") and chain is not None:
            chains[target.get("dev")] = chain
    return chains


def chain_from_disk_element(disk: ET.Element) -> Chain | None:
    """The chain of one <disk> element; None for an empty CD-ROM or a non-file source."""
    source = disk.find("source")
    if disk.get("type", "file") != "file" or source is None or not source.get("file"):
        return None
    driver = disk.find("driver")
    layers = [Layer(_norm(source.get("file")), driver.get("type", "") if driver is not None else "")]
    store = disk.find("backingStore")
    while store is not None:
        store_source = store.find("source")
        if store_source is None or not store_source.get("file"):
            break  # <backingStore/>: the end of the chain
        fmt = store.find("format")
        layers.append(Layer(_norm(store_source.get("file")), fmt.get("type", "") if fmt is not None else ""))
        store = store.find("backingStore")
    return Chain(tuple(layers))
