"""The target node's pre-check of a Live or WholeMachine migration: can this node run the VM, with its
files where they must be? On success it tells the source where to migrate to (status.target)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from libvirt_operator.agent.migrations.context import MigrationFailed
from libvirt_operator.api import quantity
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.host import Host


@dataclass(frozen=True)
class TargetConfig:
    node: str
    roots: tuple[str, ...]
    shared_roots: tuple[str, ...]
    migration_uri: str
    address: str | None


def under(path: str, roots: tuple[str, ...]) -> str | None:
    """The root `path` resolves under (symlinks included), or None."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return root
    return None


def vm_files(vm: dict) -> dict[str, list[str]]:
    """Each file-backed disk's files (active first) as the VM's status records them, else its spec path."""
    st = vm.get("status") or {}
    out: dict[str, list[str]] = {}
    for d in st.get("disks") or []:
        if d.get("device", "disk") == "disk" and d.get("path"):
            out[d["name"]] = [d["path"], *(d.get("backingChain") or [])]
    for d in (vm.get("spec") or {}).get("disks") or []:
        if d.get("path") and d["name"] not in out and d.get("device", "disk") == "disk":
            out[d["name"]] = [d["path"]]
    return out


def boot_files(vm: dict) -> list[str]:
    kernel = ((vm.get("spec") or {}).get("boot") or {}).get("kernel") or {}
    return [p for p in (kernel.get("kernel"), kernel.get("initrd")) if p]


def local_root(cfg: TargetConfig) -> str | None:
    """Where a WholeMachine migration puts its disks by default: the first root not shared."""
    for root in cfg.roots:
        if root not in cfg.shared_roots:
            return root
    return None


def check_files(cfg: TargetConfig, vm: dict, migration: dict) -> str | None:
    """Raises MigrationFailed for files this node cannot hold; returns the root a WholeMachine copy uses."""
    kind = migration["spec"].get("type", "Live")
    for path in boot_files(vm):
        if under(path, cfg.shared_roots) is None:
            raise MigrationFailed("StorageRootMismatch", f"{path} (boot) is not on storage shared with node "
                                  f"{cfg.node} (its shared roots: {', '.join(cfg.shared_roots) or 'none'})")
    files = vm_files(vm)
    if kind == "Live":
        for name, paths in files.items():
            for path in paths:
                if under(path, cfg.shared_roots) is None:
                    raise MigrationFailed("StorageRootMismatch", f"disk {name}: {path} is not on storage shared "
                                          f"with node {cfg.node} (its shared roots: "
                                          f"{', '.join(cfg.shared_roots) or 'none'}); use WholeMachine to copy it")
        return None
    default_root = local_root(cfg)
    moves = {d["name"]: d["destinationPath"] for d in migration["spec"].get("disks") or []}
    for name in moves:
        if name not in files:
            raise MigrationFailed("DiskNotFound", f"the VM has no file-backed disk {name}")
    for name, dest in moves.items():
        if under(dest, cfg.roots) is None:
            raise MigrationFailed("PathNotAllowed", f"disk {name}: {dest} is outside node {cfg.node}'s storage "
                                  f"roots ({', '.join(cfg.roots)})")
        if os.path.lexists(dest):
            raise MigrationFailed("FileExists", f"disk {name}: {dest} exists on node {cfg.node}")
    if default_root is None and any(n not in moves and under(p[0], cfg.shared_roots) is None
                                    for n, p in files.items()):
        raise MigrationFailed("StorageRootMismatch", f"node {cfg.node} has no local storage root for the disks")
    for name, paths in files.items():
        if name in moves or under(paths[0], cfg.shared_roots) is not None:
            continue
        dest = str(Path(default_root) / Path(paths[0]).name)
        if os.path.lexists(dest):
            raise MigrationFailed("FileExists", f"disk {name}: {dest} exists on node {cfg.node}; name a "
                                  "destinationPath for it")
    return default_root


async def check_host(host: Host, vm: dict) -> None:
    """Networks, memory: what this node's libvirt must offer."""
    spec = vm.get("spec") or {}
    for nic in spec.get("interfaces") or []:
        kind, source = nic.get("type", "network"), nic.get("source")
        if kind == "network" and source:
            try:
                active = await host.run(lambda s=source: host.connection().networkLookupByName(s).isActive())
            except HypervisorError:
                active = False
            if not active:
                raise MigrationFailed("NetworkNotFound", f"interface {nic.get('name')}: network {source} is not "
                                      "active on this node")
        elif kind == "bridge" and source and not Path(f"/sys/class/net/{source}/bridge").is_dir():
            raise MigrationFailed("NetworkNotFound", f"interface {nic.get('name')}: no bridge {source} on this node")
    memory = quantity.to_bytes((spec.get("memory") or {}).get("size", "0"))
    free = await host.run(lambda: host.connection().getFreeMemory())
    if free < memory:
        raise MigrationFailed("InsufficientMemory", f"the VM needs {memory >> 20} MiB; this node has "
                              f"{free >> 20} MiB free")
    has_kvm = (await host.info()).has_kvm
    if (vm.get("status") or {}).get("domain") and spec.get("domainType") == "kvm" and not has_kvm:
        raise MigrationFailed("CPUIncompatible", "the VM runs with KVM; this node has none")


async def run(cfg: TargetConfig, host: Host, vm: dict, migration: dict) -> dict:
    """The status.target to write, or MigrationFailed."""
    if await host.lookup(vm["metadata"]["uid"]) is not None:
        raise MigrationFailed("DomainExists", f"a domain with the VM's uuid exists on node {cfg.node} already")
    root = check_files(cfg, vm, migration)
    await check_host(host, vm)
    target = {"node": cfg.node, "migrationUri": cfg.migration_uri}
    if cfg.address:
        target["address"] = cfg.address
    if root:
        target["storageRoot"] = root
    return target
