"""The source agent's side of a Live (shared storage) or WholeMachine (local disks copied) migration.

Steps, each written to VMMigration status before it runs (re-entry carries on from it):
- Plan: the files to make on the target (WholeMachine), recorded before anything is made there;
- CopyParents: each disk's backing file travels as a sparse libvirt volume stream (works between hosts);
- PrepareLeaves: the target's libvirt creates the new leaves over the copies;
- Migrating: the VM's status.migration says Migrating, then migrateToURI3 (P2P|LIVE|PERSIST_DEST|
  UNDEFINE_SOURCE, + NON_SHARED_INC and the target paths for WholeMachine), followed for progress,
  timeouts and abort;
- HandOver: the VM's status.migration says Landed (the source never starts it again), then the source's
  own files are removed when nothing else here holds them (WholeMachine), and phase HandingOver.

A failure before the domain landed removes what this job made on the target; the VM keeps running here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from libvirt_operator.agent import disks
from libvirt_operator.agent.migrations.context import MigrationContext, MigrationFailed
from libvirt_operator.agent.migrations.precheck import under
from libvirt_operator.agent.migrations.progress import Watchdog, completion_timeout, progress_fields
from libvirt_operator.api import quantity
from libvirt_operator.api.base import utcnow
from libvirt_operator.domain import naming
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor import volumes
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.hypervisor.migration import MigrationOptions
from libvirt_operator.storage.chain import Chain, Layer

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1.0  # s between status.progress writes (the issue asks for at least every 2 s)
DEFAULT_DOWNTIME_MS = 300  # libvirt's; set every time, as a retune stays on the domain


def pool_name(directory: str) -> str:
    return "lvo-" + hashlib.sha1(os.path.normpath(directory).encode()).hexdigest()[:12]


async def pool_over(host: Host, directory: str) -> str:
    """The name of a running pool over `directory` on `host`: an existing one (an admin's), else ours."""
    directory = os.path.normpath(directory)
    name = await host.run(lambda: volumes.pool_named_for(host.connection(), directory), fallback="PoolFailed")
    if name is None:
        name = pool_name(directory)
        await volumes.ensure_dir_pool(host, name, directory)
    return name


@contextlib.asynccontextmanager
async def connected(uri: str) -> AsyncIterator[Host]:
    host = Host(uri, workers=4)
    await host.connect()
    try:
        yield host
    finally:
        await host.close()


def chains_of(ctx: MigrationContext) -> dict[str, Chain]:
    """The recorded chain of each file-backed disk (status.disks of this domain, else the spec paths)."""
    chains = disks.status_chains(ctx.vm)
    for d in ctx.vm["spec"].get("disks") or []:
        if d.get("path") and d.get("device", "disk") == "disk" and d["name"] not in chains:
            chains[d["name"]] = Chain.of((d["path"], d.get("format") or ""))
    return chains


def plan_whole(ctx: MigrationContext, chains: dict[str, Chain]) -> list[dict]:
    """status.disks for a WholeMachine move: each local disk's new leaf and parent copy on the target."""
    target = ctx.status.get("target") or {}
    root = target.get("storageRoot")
    moves = {d["name"]: d["destinationPath"] for d in ctx.spec.get("disks") or []}
    out = []
    for name, chain in sorted(chains.items()):
        if name not in moves and under(chain.active.path, ctx.shared_roots) is not None:
            continue  # on shared storage: it stays where it is
        if len(chain) > 2:
            raise MigrationFailed("UnsupportedChain", f"disk {name} runs on {len(chain)} files; a WholeMachine "
                                  "migration copies a leaf and one parent (delete snapshots to merge first)")
        dest = moves.get(name) or (str(Path(root) / Path(chain.active.path).name) if root else None)
        if dest is None:
            raise MigrationFailed("StorageRootMismatch", f"disk {name}: the target named no storage root")
        copied = [str(Path(dest).parent / Path(layer.path).name) for layer in chain.backing]
        if dest in copied or len(set(copied)) != len(copied):
            raise MigrationFailed("FileExists", f"disk {name}: the parent's copy would be its new leaf {dest}")
        out.append({"name": name, "sourceFile": chain.active.path, "destinationFile": dest, "copiedFiles": copied})
    return out


def new_chains(planned: list[dict], chains: dict[str, Chain]) -> dict[str, Chain]:
    out = {}
    for d in planned:
        old = chains[d["name"]]
        layers = [Layer(d["destinationFile"], old.active.format or "qcow2")]
        layers += [Layer(copy, layer.format) for copy, layer in zip(d["copiedFiles"], old.backing, strict=True)]
        out[d["name"]] = Chain(tuple(layers))
    return out


def retarget(xml: str, chains: dict[str, Chain], origins: dict[str, str]) -> str:
    """The domain XML with each moved disk on its new leaf, and the disk record saying so."""
    dom = DomainConfig.from_xml(xml)
    for name, chain in chains.items():
        disk = dom.devices.by_alias(naming.disk_alias(name)) if dom.devices else None
        if disk is None:
            raise MigrationFailed("DiskNotFound", f"the domain has no disk {name}")
        disk.type, disk.source_file = "file", chain.active.path
        if chain.active.format:
            disk.driver_type = chain.active.format
        for store in disk.element.findall("backingStore"):
            disk.element.remove(store)
    own = dom.operator_metadata
    if own is not None:
        own.disks = {**own.disks, **chains}
        own.disk_origins = {**own.disk_origins, **origins}
        dom.operator_metadata = own
    return dom.to_xml()


async def run(ctx: MigrationContext) -> None:
    step = ctx.status.get("step")
    if step in ("HandOver", "Cleanup"):
        await hand_over(ctx)
        return
    target = ctx.status.get("target") or {}
    if not target.get("migrationUri"):
        raise MigrationFailed("PreCheckMissing", "the target's pre-check did not say where to migrate to")
    if step == "Migrating":
        if await _recover_migrating(ctx, target):
            await hand_over(ctx)
            return
        await _remove_target_files(ctx, target)
        raise MigrationFailed("Interrupted", f"the agent restarted during the migration; libvirt's migration "
                              f"ended without moving the VM, which runs on {ctx.node}")
    if step in ("Plan", "CopyParents", "PrepareLeaves"):
        await _remove_target_files(ctx, target)  # ours, from the interrupted run: made again
    guest = ctx.guest
    if guest is None or (await guest.state()).state != "running":
        raise MigrationFailed("VMNotRunning", f"the VM's domain is not running on {ctx.node}")
    whole = ctx.spec.get("type") == "WholeMachine"
    chains = chains_of(ctx)
    planned: list[dict] = []
    if whole:
        planned = plan_whole(ctx, chains)
        await ctx.write({"step": "Plan", "disks": planned})
        try:
            async with connected(target["migrationUri"]) as remote:
                await _copy_parents(ctx, remote, planned)
                await _prepare_leaves(ctx, remote, planned, chains)
        except (MigrationFailed, HypervisorError) as err:
            await _remove_target_files(ctx, target)
            if isinstance(err, MigrationFailed):
                raise
            raise MigrationFailed("CopyFailed", f"preparing the disks on node {target['node']}: {err.message}") from err
    else:
        for name, chain in chains.items():
            for path in chain.paths:
                if under(path, ctx.shared_roots) is None:
                    raise MigrationFailed("StorageRootMismatch", f"disk {name}: {path} is not on storage this node "
                                          "shares; use WholeMachine to copy it")
    try:
        await _migrate(ctx, target, chains, planned)
    except (MigrationFailed, HypervisorError) as err:
        await _remove_target_files(ctx, target)
        if isinstance(err, MigrationFailed):
            raise
        raise MigrationFailed("MigrationFailed", err.message) from err
    await hand_over(ctx)


async def _copy_parents(ctx: MigrationContext, remote: Host, planned: list[dict]) -> None:
    await ctx.write({"step": "CopyParents"})
    chains = chains_of(ctx)
    for d in planned:
        for copy, layer in zip(d["copiedFiles"], chains[d["name"]].backing, strict=True):
            await pool_over(ctx.host, str(Path(layer.path).parent))
            pool = await pool_over(remote, str(Path(copy).parent))
            try:
                done = await volumes.transfer(ctx.host, layer.path, remote, pool, Path(copy).name)
            except HypervisorError as err:
                raise MigrationFailed("FileExists" if err.reason == "VolumeExists" else "CopyFailed",
                                      f"disk {d['name']}: copying {layer.path} to the target: {err.message}") from err
            log.info("%s: copied %s to %s (%d data bytes, %d in holes, %.2f s)", ctx.node, layer.path, done.path,
                     done.data_bytes, done.hole_bytes, done.seconds)


async def _prepare_leaves(ctx: MigrationContext, remote: Host, planned: list[dict],
                          chains: dict[str, Chain]) -> None:
    await ctx.write({"step": "PrepareLeaves"})
    for d in planned:
        old = chains[d["name"]]
        await pool_over(ctx.host, str(Path(old.active.path).parent))
        capacity = (await volumes.volume(ctx.host, old.active.path)).capacity
        pool = await pool_over(remote, str(Path(d["destinationFile"]).parent))
        fmt = old.active.format or "qcow2"
        parent = old.backing[0] if old.backing else None
        if parent is not None and fmt != "qcow2":
            raise MigrationFailed("UnsupportedChain", f"disk {d['name']}: a {fmt} leaf over a backing file")
        try:
            await volumes.create_volume(remote, pool, Path(d["destinationFile"]).name, capacity,
                                        backing=d["copiedFiles"][0] if parent else None,
                                        backing_format=(parent.format or "raw") if parent else "qcow2", fmt=fmt)
        except HypervisorError as err:
            raise MigrationFailed("FileExists" if err.reason == "VolumeExists" else "CopyFailed",
                                  f"disk {d['name']}: preparing {d['destinationFile']}: {err.message}") from err


async def _migrate(ctx: MigrationContext, target: dict, chains: dict[str, Chain], planned: list[dict]) -> None:
    spec, guest = ctx.spec, ctx.guest
    whole = bool(planned)
    options: dict = {}
    if target.get("address"):
        options.update(data_uri=f"tcp://{target['address']}", listen_address=target["address"])
    unsafe = not whole and all(under(p, ctx.shared_roots) for c in chains.values() for p in c.paths)
    if whole:
        moved = new_chains(planned, chains)
        origins = {d["name"]: _spec_path(ctx.vm, d["name"]) for d in planned}
        origins = {k: v for k, v in origins.items() if v}
        targets = await _targets(ctx, [d["name"] for d in planned])
        options.update(copy_storage=True, migrate_disks=tuple(targets),
                       dest_xml=retarget(await guest.xml(migratable=True), moved, origins),
                       persist_xml=retarget(await guest.xml(inactive=True), moved, origins))
        # with shared disks beside the copied ones, libvirt still needs to be told they are shared
        unsafe = any(under(c.active.path, ctx.shared_roots) for n, c in chains.items() if n not in moved)
    opts = MigrationOptions(bandwidth_mib=spec.get("bandwidthMibPerSecond"),
                            auto_converge=bool(spec.get("autoConverge", True)),
                            postcopy=bool(spec.get("allowPostCopy")), unsafe=unsafe, **options)
    memory = quantity.to_bytes((ctx.vm["spec"].get("memory") or {}).get("size", "0"))
    copied = sum(await _sizes(ctx, chains, planned)) if whole else 0
    dog = Watchdog(time.monotonic(), completion_timeout(spec.get("completionTimeoutPerGiB", 150), memory, copied),
                   float(spec.get("progressTimeoutSeconds", 150)))
    await guest.set_max_speed(spec.get("bandwidthMibPerSecond") or 0)
    # both facts before the call, side by side (a restart after either one alone recovers: see run)
    await asyncio.gather(ctx.write_vm("Migrating", f"to node {target['node']}"),
                         ctx.write({"step": "Migrating", "startTime": ctx.status.get("startTime") or utcnow()}))
    call = asyncio.ensure_future(guest.migrate(target["migrationUri"], opts))
    stop: str | None = None  # why we cancelled it: MigrationAborted, MigrationTimedOut, NoProgress
    postcopy = False
    tuned = False
    last_write = 0.0
    while not call.done():
        try:
            stats = await guest.job_stats()
        except HypervisorError:  # the domain is leaving (shut off as migrated, then gone): the call ends
            await asyncio.wait({call}, timeout=PROGRESS_EVERY / 2)
            continue
        if stats.active and not tuned:
            tuned = True  # once the job shows: libvirt may apply the call's own figures when it starts
            with contextlib.suppress(HypervisorError):
                await guest.set_max_downtime(spec.get("maxDowntimeMilliseconds") or DEFAULT_DOWNTIME_MS)
        now = time.monotonic()
        if stats.active and now - last_write >= PROGRESS_EVERY:
            last_write = now
            await ctx.write({"progress": progress_fields(stats, postcopy=postcopy, when=utcnow())})
        if stop is None and not postcopy:
            if ctx.abort.is_set():
                stop = "MigrationAborted"
            elif stats.active:
                verdict = dog.observe(now, stats.data_remaining)
                if verdict is not None and spec.get("allowPostCopy") and (stats.iteration or 0) >= 1:
                    with contextlib.suppress(HypervisorError):
                        await guest.start_postcopy()
                        postcopy = True
                        await ctx.event("MigrationPostCopy", f"switched to post-copy ({verdict})", False)
                elif verdict is not None:
                    stop = "MigrationTimedOut" if verdict == "Timeout" else "NoProgress"
            if stop is not None:
                with contextlib.suppress(HypervisorError):
                    await guest.abort_job()
        await asyncio.wait({call}, timeout=PROGRESS_EVERY / 2)
    try:
        await call
    except HypervisorError as err:
        if stop is not None:  # an abort can surface as any failure when it races with the stream
            raise MigrationFailed(stop, _why(stop, spec) + f" ({err.message})") from err
        raise MigrationFailed("MigrationFailed", err.message) from err
    ctx.scratch["progress"] = {**(ctx.status.get("progress") or {}), "percent": 100, "updateTime": utcnow()}


def _why(stop: str, spec: dict) -> str:
    return {"MigrationAborted": "the VMMigration was deleted: migration cancelled; the VM runs on its source",
            "MigrationTimedOut": "not finished within the completion timeout "
                                 f"({spec.get('completionTimeoutPerGiB', 150)} s per GiB); the VM runs on its source",
            "NoProgress": f"no progress for {spec.get('progressTimeoutSeconds', 150)} s; the VM runs on its source"
            }[stop]


def _spec_path(vm: dict, name: str) -> str | None:
    for d in vm["spec"].get("disks") or []:
        if d["name"] == name:
            return d.get("path")
    return None


async def _targets(ctx: MigrationContext, names: list[str]) -> list[str]:
    dom = DomainConfig.from_xml(await ctx.guest.xml())
    out = []
    for name in names:
        disk = dom.devices.by_alias(naming.disk_alias(name)) if dom.devices else None
        target = disk.element.find("target") if disk is not None else None
        if target is None:
            raise MigrationFailed("DiskNotFound", f"the running domain has no disk {name}")
        out.append(target.get("dev"))
    return out


async def _sizes(ctx: MigrationContext, chains: dict[str, Chain], planned: list[dict]) -> list[int]:
    out = []
    for d in planned:
        with contextlib.suppress(OSError):
            out.append(os.stat(chains[d["name"]].active.path).st_size)
    return out


async def _recover_migrating(ctx: MigrationContext, target: dict) -> bool:
    """After a restart during Migrating: wait for libvirt's own job, then say where the domain is
    (True: it runs on the target)."""
    guest = await ctx.host.lookup(ctx.vm["metadata"]["uid"])
    if guest is not None:
        with contextlib.suppress(HypervisorError):
            async for stats in guest.follow_job(PROGRESS_EVERY):
                await ctx.write({"progress": progress_fields(stats, when=utcnow())})
        guest = await ctx.host.lookup(ctx.vm["metadata"]["uid"])
        if guest is not None:
            return False
    async with connected(target["migrationUri"]) as remote:
        there = await remote.lookup(ctx.vm["metadata"]["uid"])
        if there is not None and (await there.state()).state in ("running", "paused"):
            return True
    raise MigrationFailed("VMLost", f"the VM's domain is neither on {ctx.node} nor on {target.get('node')} "
                          "after the agent restarted mid-migration")


async def _remove_target_files(ctx: MigrationContext, target: dict) -> None:
    """What this job made on the target (the planned files), unless the domain runs there."""
    planned = ctx.status.get("disks") or []
    files = [f for d in planned for f in (d.get("destinationFile"), *(d.get("copiedFiles") or [])) if f]
    if not files or not target.get("migrationUri"):
        return
    try:
        async with connected(target["migrationUri"]) as remote:
            if await remote.lookup(ctx.vm["metadata"]["uid"]) is not None:
                return
            for path in files:
                with contextlib.suppress(HypervisorError):
                    await pool_over(remote, str(Path(path).parent))
                with contextlib.suppress(HypervisorError):
                    await volumes.delete_volume(remote, path)
    except HypervisorError as err:
        log.warning("%s: could not remove the target's partial files %s: %s", ctx.node, files, err.message)


async def hand_over(ctx: MigrationContext) -> None:
    target = (ctx.status.get("target") or {}).get("node") or ctx.status.get("targetNode")
    await ctx.write_vm("Landed", f"running on node {target}")
    planned = ctx.status.get("disks") or []
    if planned:
        await ctx.write({"step": "Cleanup", "phase": "HandingOver"})
        old = [f for f in _old_files(ctx, planned)]
        verdict = ctx.references().verdict(old, removing=[disks.vm_owner(ctx.vm)])
        for path in verdict.delete:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if verdict.keep:
            held = "; ".join(f"{p} (held by {', '.join(o)})" for p, o in verdict.keep.items())
            await ctx.event("DiskKept", f"kept on {ctx.node}: {held}", False)
    done = {"progress": ctx.scratch["progress"]} if "progress" in ctx.scratch else {}
    await ctx.write({"step": "HandOver", "phase": "HandingOver", **done})
    await ctx.event("MigrationLanded", f"the VM runs on node {target}; node {ctx.node} hands it over", False)


def _old_files(ctx: MigrationContext, planned: list[dict]) -> list[str]:
    chains = chains_of(ctx)
    out = []
    for d in planned:
        chain = chains.get(d["name"])
        if chain is not None and chain.active.path == d["sourceFile"]:
            out += chain.paths
        elif d.get("sourceFile"):
            out.append(d["sourceFile"])
    return out
