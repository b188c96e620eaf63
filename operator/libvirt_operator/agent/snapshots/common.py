"""What the entry points share: reading the domain's disks, waiting for libvirt's own job to end, writing
status through the JobContext, and removing files only when nothing references them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime

import libvirt

from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots.plan import DiskState
from libvirt_operator.domain import naming
from libvirt_operator.hypervisor import Guest, Host, HypervisorError
from libvirt_operator.storage import Chain, StorageError, images
from libvirt_operator.storage.chain import chain_from_disk_element

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 600.0  # how long a re-entered job waits for libvirt's own job on the domain to end


class JobFailed(Exception):
    """A step failed after the job started: reason and message for status (create and revert)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def condition(status: str, reason: str, message: str = "") -> dict:
    return {"type": "Ready", "status": status, "reason": reason, "message": message[:32000],
            "lastTransitionTime": now()}


def owner_vm(vm: dict) -> str:
    meta = vm.get("metadata") or {}
    return f"vm/{meta.get('namespace', '')}/{meta.get('name', '')}"


def owner_snapshot(snapshot: dict) -> str:
    meta = snapshot.get("metadata") or {}
    return f"snapshot/{meta.get('namespace', '')}/{meta.get('name', '')}"


class Status:
    """The VMSnapshot status as this job wrote it: each write merges top-level fields (lists and the job
    dict whole) and goes to the API through ctx.write before the step it announces runs."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.fields: dict = dict(ctx.snapshot.get("status") or {})

    def __getitem__(self, key: str):
        return self.fields[key]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    @property
    def step(self) -> str | None:
        return (self.fields.get("job") or {}).get("step")

    async def write(self, **fields) -> None:
        self.fields.update(fields)
        await self.ctx.write(fields)

    async def step_to(self, step: str, message: str = "") -> None:
        job = dict(self.fields.get("job") or {})
        job.update(step=step, message=message)
        job.setdefault("startedAt", now())
        await self.write(job=job)


async def disk_states(guest: Guest, *, inactive: bool = False) -> dict[str, DiskState]:
    """{disk name: DiskState} of the operator's file disks (alias ua-disk-<name>), from the live XML (the
    definition when shut off, or when `inactive`)."""
    xml = await guest.xml(inactive=inactive)
    out = {}
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        alias = disk.find("alias")
        name = naming.disk_name_from_alias(alias.get("name") if alias is not None else None)
        target = disk.find("target")
        chain = chain_from_disk_element(disk)
        if name and target is not None and chain is not None and disk.get("device", "disk") == "disk":
            out[name] = DiskState(name, target.get("dev", ""), chain)
    return out


async def state_name(guest: Guest) -> str:
    ps = await guest.state()
    return f"{ps.state}/{ps.reason}"


async def job_active(guest: Guest) -> bool:
    """libvirt has a job on the domain (a save, a snapshot's memory migration...)."""
    def read(d: libvirt.virDomain) -> bool:
        try:
            return d.jobInfo()[0] not in (libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                return False
            raise
    return await guest.call(read)


async def wait_idle(guest: Guest, timeout: float = IDLE_TIMEOUT) -> None:
    """Waits while the domain is inside libvirt's own job (paused by a save or a snapshot, a job
    active): a re-entered job judges the facts only after it."""
    deadline = time.monotonic() + timeout
    while True:
        ps = await guest.state()
        transient = ps.state == "paused" and ps.reason in ("save", "snapshot", "unknown", "migration", "dump")
        if not transient and not await job_active(guest):
            return
        if time.monotonic() > deadline:
            raise HypervisorError("DomainBusy", f"{guest.name}: still {ps.state}/{ps.reason} in a libvirt job "
                                                f"after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def blocking(fn, *args, **kwargs):
    """storage.images calls block (qemu-img, cp): run them in a thread."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def full_chains(ctx: JobContext, guest: Guest) -> dict[str, DiskState]:
    """The domain's disks with their whole chains: the live XML of a running domain; for a stopped one
    the definition's files with the backing files qemu-img reads from their headers."""
    if (await guest.state()).state != "shutoff":
        return await disk_states(guest)
    out = {}
    for name, state in (await disk_states(guest, inactive=True)).items():
        out[name] = DiskState(name, state.target, await _expand(state.chain, ctx.roots))
    return out


async def _expand(chain: Chain, roots: tuple[str, ...]) -> Chain:
    if len(chain) > 1 or not os.path.isfile(chain.active.path):
        return chain
    try:
        return await blocking(images.chain, chain.active.path, roots=roots)
    except (StorageError, ValueError):
        return chain


async def node_files_in_use(host: Host, roots: tuple[str, ...] = ()) -> set[str]:
    """Every file a domain on this node has in its chains (live XML of running domains, the definition
    of the others with the backing files their headers name): a last guard before a file is removed."""
    used: set[str] = set()
    for guest in await host.domains():
        with contextlib.suppress(HypervisorError):
            live = await guest.xml()
            inactive = await guest.xml(inactive=True)
            # the live XML first: it lists whole chains; a file already found there is not read again
            for xml in (live,) if inactive == live else (live, inactive):
                for chain in _chains(xml):
                    if chain.active.path not in used:
                        used.update((await _expand(chain, roots)).paths)
    return used


def _chains(xml: str) -> Iterable[Chain]:
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        chain = chain_from_disk_element(disk)
        if chain is not None:
            yield chain


async def remove_unreferenced(ctx: JobContext, files: Iterable[str], *, removing: Iterable[str] = (),
                              keep: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Removes each of `files` that exists, that no owner but `removing` references (ctx.references())
    and that no domain of the node uses, except those in `keep`. Returns (removed, {kept: why})."""
    keep_set = {os.path.normpath(p) for p in keep}
    files = [os.path.normpath(p) for p in dict.fromkeys(files) if os.path.normpath(p) not in keep_set]
    if not files:
        return [], {}
    verdict = ctx.references().verdict(files, removing=list(removing))
    in_use = await node_files_in_use(ctx.host, ctx.roots)
    removed, kept = [], {}
    for path, holders in verdict.keep.items():
        kept[path] = "held by " + ", ".join(holders)
    for path in verdict.delete:
        if path in in_use:
            kept[path] = "in use by a domain of this node"
            continue
        try:
            if await blocking(images.remove, path, roots=ctx.roots):
                removed.append(path)
        except StorageError as err:
            kept[path] = f"{err.reason}: {err.message}"
    return removed, kept


def remove_temp_files(paths: Iterable[str]) -> None:
    """storage.images' temporary files (`.<name>.lvo-tmp-*` beside each path) left by a killed copy."""
    for path in paths:
        head, tail = os.path.split(path)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(head):
                if entry.startswith(f".{tail}.lvo-tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(head, entry))
