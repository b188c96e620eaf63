"""Save images, external snapshots and block jobs of one domain (SnapshotMixin, inherited by Guest).

- save(): saveFlags; the domain stops (shut off, reason `saved`); Host.restore() brings it back.
- snapshot_external(): snapshotCreateXML with NO_METADATA (libvirt keeps nothing: the caller records
  the files), LIVE with memory, DISK_ONLY without, REUSE_EXT for pre-created overlays.
- Block jobs: commit (active layer: wait for READY, then pivot), pull, copy. A job's progress comes
  from blockJobInfo and the live XML's <mirror ready=...>; BLOCK_JOB_2 events wake the waiter early.

libvirt 9.0 facts this relies on (see /work/notes/snapshot-facts.md): blockCommit with base=None
commits into the BOTTOM of the chain, so the active-layer commit into the next file passes SHALLOW.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import libvirt

from libvirt_operator.domain.snapshot import external_snapshot
from libvirt_operator.hypervisor import readxml
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.storage.chain import Chain, chains_from_domain_xml

if TYPE_CHECKING:
    from libvirt_operator.hypervisor.host import Host

JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}
JOB_STATUS = {  # BLOCK_JOB_2 event status
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
_POLL = 0.2  # seconds between blockJobInfo polls when no event arrives


@dataclass(frozen=True)
class BlockJob:
    target: str
    type: str  # pull, copy, commit, active-commit, backup (or the number libvirt gave)
    cur: int
    end: int
    bandwidth: int  # MiB/s (libvirt's default unit), 0 = unlimited
    ready: bool  # a mirroring job (copy, active-commit) may pivot now: <mirror ready='yes'>

    @property
    def progress(self) -> float:
        return self.cur / self.end if self.end else 0.0


class SnapshotMixin:
    """Snapshot calls of a Guest; expects `call(fn, fallback)`, `uuid` and `_host`."""

    call: Callable[..., Any]
    uuid: str
    _host: Host

    # -- save images -----------------------------------------------------------------------------

    async def save(self, path: str, xml: str | None = None, *, running: bool = False, paused: bool = False,
                   bypass_cache: bool = False) -> None:
        """Saves memory and device state to `path` and stops the domain (shut off, reason saved). `xml`
        replaces the embedded definition (host-side parts only); running/paused: how a restore starts it."""
        if running and paused:
            raise ValueError("a save image restores either running or paused")
        flags = ((libvirt.VIR_DOMAIN_SAVE_RUNNING if running else 0) | (libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0)
                 | (libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if bypass_cache else 0))
        await self.call(lambda d: d.saveFlags(path, xml, flags), fallback="SaveFailed")

    async def save_image_xml(self, path: str) -> str:
        """The domain XML embedded in save image (or memory snapshot) `path`, secure parts included."""
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
        return await self.call(lambda d: d.connect().saveImageGetXMLDesc(path, flags), fallback="SaveImageUnreadable")

    # -- external snapshots ----------------------------------------------------------------------

    async def snapshot_external(self, disks: Mapping[str, str], memory_path: str | None = None, *,
                                reuse: bool = False, quiesce: bool = False, live: bool = True) -> str:
        """An external snapshot without libvirt metadata: each disk in `disks` ({target: overlay file})
        continues on its overlay (a new qcow2 leaf whose backing file is the disk's current file);
        every other disk is left out (snapshot='no'). With `memory_path` the memory goes there and a
        running domain keeps running (LIVE); without, the snapshot is disk-only (crash-consistent
        unless `quiesce`, which needs the guest agent). `reuse`: the overlays exist already
        (pre-created with the right backing file: QEMU takes the current file as backing whatever the
        overlay's header says, so verify it first: storage.images.verify_overlay). live=False pauses a
        running domain while its memory is saved (paused, reason snapshot). Returns the snapshot XML sent."""
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT if reuse else 0
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0

        def create(d: libvirt.virDomain) -> str:
            others = [s.target for s in readxml.disk_sources(d.XMLDesc(0)) if s.target not in disks]
            snapshot_xml = external_snapshot(disks, memory_path, skip=others).to_xml()
            extra = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY if memory_path is None else 0
            if memory_path is not None and live and d.isActive():
                extra |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
            d.snapshotCreateXML(snapshot_xml, flags | extra)
            return snapshot_xml

        return await self.call(create, fallback="SnapshotFailed")

    async def disk_chains(self) -> dict[str, Chain]:
        """{target: chain} of the file disks, from the live XML (the persistent one when shut off)."""
        return chains_from_domain_xml(await self.call(lambda d: d.XMLDesc(0)))

    # -- block jobs ------------------------------------------------------------------------------

    async def block_job_info(self, target: str) -> BlockJob | None:
        """The block job on disk `target`, or None when it has none."""
        def read(d: libvirt.virDomain) -> BlockJob | None:
            info = d.blockJobInfo(target, 0)
            if not info:
                return None
            return BlockJob(target, JOB_TYPES.get(info["type"], str(info["type"])), info["cur"], info["end"],
                            info["bandwidth"], _mirror_ready(d.XMLDesc(0), target))

        return await self.call(read, fallback="BlockJobInfoFailed")

    async def block_commit_active(self, target: str, base: str | None = None, *, bandwidth: int = 0) -> None:
        """Starts committing the active file of `target` into `base` (default: its backing file). The
        job then mirrors writes: wait_block_job(target, "ready"), then block_job_pivot (the disk runs
        on base) or block_job_abort (it stays on the active file)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW if base is None else 0
        await self.call(lambda d: d.blockCommit(target, base, None, bandwidth, flags), fallback="BlockCommitFailed")

    async def block_commit(self, target: str, base: str, top: str, *, bandwidth: int = 0) -> None:
        """Starts committing the layers from `top` down to just above `base` into `base` (both below
        the active file); the job ends by itself: wait_block_job(target, "gone")."""
        await self.call(lambda d: d.blockCommit(target, base, top, bandwidth, 0), fallback="BlockCommitFailed")

    async def block_pull(self, target: str, base: str | None = None, *, bandwidth: int = 0) -> None:
        """Starts pulling the layers above `base` (default: all) into the active file; ends by itself."""
        if base is None:
            await self.call(lambda d: d.blockPull(target, bandwidth, 0), fallback="BlockPullFailed")
        else:
            await self.call(lambda d: d.blockRebase(target, base, bandwidth, 0), fallback="BlockPullFailed")

    async def block_copy(self, target: str, dest_xml: str, *, shallow: bool = False, reuse_ext: bool = False,
                         transient_job: bool = True, bandwidth: int | None = None) -> None:
        """Starts copying disk `target` to `dest_xml` (<disk type='file'><driver type=.../><source
        file=.../></disk>); a mirror: wait for "ready", then pivot or abort. `transient_job` is
        required for a persistent domain; `bandwidth` in bytes/s."""
        flags = ((libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW if shallow else 0)
                 | (libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT if reuse_ext else 0)
                 | (libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB if transient_job else 0))
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else {}
        await self.call(lambda d: d.blockCopy(target, dest_xml, params, flags), fallback="BlockCopyFailed")

    async def block_job_pivot(self, target: str) -> None:
        """Switches disk `target` to the mirror's destination (a READY copy or active commit); returns
        once the switch is done."""
        await self.call(lambda d: d.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
                        fallback="BlockJobPivotFailed")

    async def block_job_abort(self, target: str) -> None:
        """Cancels the job on `target` (a mirror stays on its source)."""
        await self.call(lambda d: d.blockJobAbort(target, 0), fallback="BlockJobAbortFailed")

    async def wait_block_job(self, target: str, until: Literal["ready", "gone"], timeout: float = 300.0) -> None:
        """Waits until the job on `target` is READY (mirrors) or has ended (gone). BlockJobFailed when the
        job failed or was cancelled (or vanished while waiting for ready); BlockJobTimeout after `timeout` s."""
        woken = asyncio.Event()
        outcomes: list[str] = []

        def on_event(event: Any) -> None:
            if getattr(event, "kind", None) == "block-job" and event.uuid == self.uuid and event.device == target:
                outcomes.append(JOB_STATUS.get(event.detail, str(event.detail)))
                woken.set()

        unsubscribe = self._host.subscribe(on_event)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if outcomes and outcomes[-1] in ("failed", "canceled"):
                    raise HypervisorError("BlockJobFailed", f"{target}: the block job {outcomes[-1]}")
                job = await self.block_job_info(target)
                if until == "ready" and job is not None and job.ready:
                    return
                if job is None:
                    await asyncio.sleep(0)  # let an event dispatched with the job's end arrive
                    if until == "gone" and not (outcomes and outcomes[-1] in ("failed", "canceled")):
                        return
                    raise HypervisorError("BlockJobFailed", f"{target}: the block job ended "
                                                            f"{'before it was ready ' if until == 'ready' else ''}"
                                                            f"(events: {outcomes or 'none'})")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HypervisorError("BlockJobTimeout", f"{target}: {job.type} job not {until} after "
                                                             f"{timeout} s ({job.cur}/{job.end})")
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(_POLL, remaining))
        finally:
            unsubscribe()


def _mirror_ready(domain_xml: str, target: str) -> bool:
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        dev = disk.find("target")
        if dev is not None and dev.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False
