"""Disk truth: the chain each disk runs on (its active file, then its backing files) is a recorded
fact, not something re-derived from spec.disks[].path. After a snapshot the VM runs on a leaf over
the spec's file; an unrelated spec edit must keep it there.

The record lives in the persistent definition's operator metadata (``<lvo:disks>``, live too) and is
mirrored in status.disks (path, format, backingChain). Rendering takes it (record_from); snapshot jobs
write it after they change files (record); deletion and snapshots ask who still needs a file
(node_references)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from libvirt_operator.agent import power
from libvirt_operator.agent.store import VMStore
from libvirt_operator.domain import naming
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.metadata import OperatorMetadata
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.storage.chain import Chain, Layer
from libvirt_operator.storage.references import References

log = logging.getLogger(__name__)


def vm_owner(obj: dict) -> str:
    return f"vm/{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def snapshot_owner(obj: dict) -> str:
    return f"snapshot/{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def record_from(stored: DomainConfig | None, obj: dict) -> dict[str, Chain]:
    """The recorded chains of this VM's disks, by disk name: the stored definition's metadata when it
    is this VM's and holds a record; else status.disks (path + backingChain) when status names this
    VM's domain (status.domain.uuid == metadata.uid); else {} (the spec's paths).

    A record is kept only for a disk the spec still has as a file-backed disk (not a CD-ROM) whose spec
    path is in the recorded chain: a user who points a disk at another file gets that file."""
    uid = obj["metadata"]["uid"]
    own = stored.operator_metadata if stored is not None else None
    chains: dict[str, Chain] = {}
    origins: dict[str, str] = {}
    if own is not None and own.vm_uid == uid:
        try:
            chains, origins = own.disks, own.disk_origins
        except (ValueError, KeyError, TypeError) as exc:  # a damaged record: fall back to status
            log.warning("%s: unreadable disk record in the domain metadata: %s", vm_owner(obj), exc)
    if not chains:
        chains = status_chains(obj)
    return applicable(chains, obj.get("spec") or {}, origins)


def origins_from(stored: DomainConfig | None, obj: dict) -> dict[str, str]:
    """The recorded origins that still apply: {disk name: spec path} for each moved disk (moved_disks)."""
    own = stored.operator_metadata if stored is not None else None
    names = moved_disks(stored, obj)
    return {name: path for name, path in own.disk_origins.items() if name in names} if names else {}


def moved_disks(stored: DomainConfig | None, obj: dict) -> frozenset[str]:
    """Disks whose files a migration moved off their spec path (recorded origin == spec path)."""
    own = stored.operator_metadata if stored is not None else None
    if own is None or own.vm_uid != obj["metadata"]["uid"]:
        return frozenset()
    try:
        origins = own.disk_origins
    except (ValueError, TypeError):
        return frozenset()
    return frozenset(d["name"] for d in (obj.get("spec") or {}).get("disks") or []
                     if d.get("path") and origins.get(d.get("name")) == d["path"])


def status_chains(obj: dict) -> dict[str, Chain]:
    """status.disks as chains, when status describes this VM object's domain."""
    st = obj.get("status") or {}
    if (st.get("domain") or {}).get("uuid") != obj["metadata"]["uid"]:
        return {}
    out = {}
    for d in st.get("disks") or []:
        if d.get("device", "disk") != "disk" or not d.get("path") or not d.get("name"):
            continue
        try:
            out[d["name"]] = Chain((Layer(_abs(d["path"]), d.get("format") or ""),
                                    *(Layer(_abs(p), "") for p in d.get("backingChain") or [])))
        except ValueError:  # relative or repeated paths: not a chain to render from
            continue
    return out


def applicable(chains: Mapping[str, Chain], spec: dict, origins: Mapping[str, str] | None = None) -> dict[str, Chain]:
    """The chains that still describe a spec disk: a file-backed disk whose spec path is in its chain, or
    whose files a migration moved from that spec path (`origins`: disk name -> spec path)."""
    origins = origins or {}
    out = {}
    for disk in spec.get("disks") or []:
        chain = chains.get(disk.get("name"))
        if chain is None or disk.get("device", "disk") != "disk" or not disk.get("path"):
            continue
        with contextlib.suppress(ValueError):
            if disk["path"] in chain or origins.get(disk["name"]) == disk["path"]:
                out[disk["name"]] = chain
    return out


async def record(host: Host, guest: Guest, chains: Mapping[str, Chain],
                 origins: Mapping[str, str] | None = None) -> None:
    """Records new chains ({disk name: chain}) for some of the guest's disks: the persistent definition
    gets those disks' source and driver type from each chain's active file and the metadata record
    (the other disks' records are kept); a running domain's live metadata gets the record too (its live
    disks are what libvirt already runs on). Snapshot jobs call this after they change files; a migration
    that moved a disk off its spec path passes `origins` ({disk name: spec path})."""
    if not chains:
        return
    dom = DomainConfig.from_xml(await guest.xml(inactive=True))
    own = dom.operator_metadata
    if own is None:
        raise ValueError(f"domain {guest.name} has no operator metadata: not ours to record on")
    moved = False  # a disk whose definition is not on its chain's active file yet
    for name, chain in chains.items():
        disk = dom.devices.by_alias(naming.disk_alias(name)) if dom.devices else None
        if disk is None or disk.element.tag != "disk":
            raise KeyError(f"domain {guest.name} has no disk {name}")
        stores = disk.element.findall("backingStore")
        if (disk.type, disk.source_file) == ("file", chain.active.path) and not stores and (
                not chain.active.format or disk.driver_type == chain.active.format):
            continue
        moved = True
        disk.type, disk.source_file = "file", chain.active.path
        if chain.active.format:
            disk.driver_type = chain.active.format
        for store in stores:  # libvirt reads the chain from the files
            disk.element.remove(store)
    log.info("%s: disk record %s", guest.name, {name: chain.paths for name, chain in chains.items()})
    own.disks = {**own.disks, **chains}
    if origins:
        own.disk_origins = {**own.disk_origins, **origins}
    if moved:
        dom.operator_metadata = own
        await host.define(dom.to_xml(), validate=False)
    else:  # libvirt moved the definition itself (an external snapshot does): the record alone
        await guest.set_operator_metadata(own.to_api_xml(), live=False, config=True)
    if (await guest.state()).state not in power.ACTIVE_STATES:
        return
    try:
        text = await guest.operator_metadata(live=True)
        live = OperatorMetadata.from_api_xml(text) if text else own
        live.disks = {**(live.disks if text else {}), **chains}
        if origins:
            live.disk_origins = {**(live.disk_origins if text else {}), **origins}
        await guest.set_operator_metadata(live.to_api_xml(), live=True)
    except HypervisorError as exc:  # stopped meanwhile: its next start boots from the definition
        log.info("%s: live disk record not written: %s", guest.name, exc.message)


def vm_chains(obj: dict) -> list[Chain]:
    """Every chain a VM object names: its status.disks chains (any device) and its spec paths."""
    out = []
    st = obj.get("status") or {}
    for d in st.get("disks") or []:
        if d.get("path"):
            with contextlib.suppress(ValueError):
                out.append(Chain((Layer(_abs(d["path"]), d.get("format") or ""),
                                  *(Layer(_abs(p), "") for p in d.get("backingChain") or []))))
    for d in (obj.get("spec") or {}).get("disks") or []:
        if d.get("path"):
            with contextlib.suppress(ValueError):
                out.append(Chain.of((d["path"], d.get("format") or "")))
    return out


def node_references(vms: VMStore, snapshots: VMStore | None) -> References:
    """Who needs which file on this node, from the agent's stores: each VM (owner vm/<ns>/<name>) its
    status.disks chains and spec paths; each VMSnapshot (owner snapshot/<ns>/<name>) its
    status.disks[].snapshotFile with the backing files below it (the entry's backingChain when it has
    one, else the snapshot's VM's recorded chain below that file) and its status.memoryFile."""
    refs = References()
    by_uid: dict[str, list[Chain]] = {}
    for key in vms.all_keys():
        obj = vms.get(key)
        if obj is None:
            continue
        chains = vm_chains(obj)
        by_uid[obj["metadata"].get("uid", "")] = chains
        refs.add_chains(vm_owner(obj), chains)
    if snapshots is None:
        return refs
    for key in snapshots.all_keys():
        snap = snapshots.get(key)
        if snap is None:
            continue
        owner, st = snapshot_owner(snap), snap.get("status") or {}
        vm_chains_ = by_uid.get(st.get("vmUid") or "", [])
        for d in st.get("disks") or []:
            path = d.get("snapshotFile")
            if not path or not path.startswith("/"):
                continue
            files = [path, *(p for p in d.get("backingChain") or [] if p.startswith("/"))]
            if not d.get("backingChain"):
                for chain in vm_chains_:
                    if path in chain:
                        files += chain.from_layer(path).paths
            refs.add_files(owner, files)
        if (st.get("memoryFile") or "").startswith("/"):
            refs.add_files(owner, [st["memoryFile"]])
    return refs


def _abs(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    return path
