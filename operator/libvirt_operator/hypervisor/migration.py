"""Migration of one domain to another node, and the storage move on one node (MigrationMixin, inherited by Guest).

- migrate(): migrateToURI3, peer-to-peer (the source libvirtd talks to the destination's itself), always
  LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE: the domain arrives persistent, and the source keeps no
  definition (its QEMU ends with shutoff reason `migrated`). Options add AUTO_CONVERGE, POSTCOPY,
  NON_SHARED_INC with MIGRATE_DISKS (local disks: the destination's files must exist, pre-created on the
  same backing chain), DEST_XML/PERSIST_XML (other paths on the destination) and UNSAFE (only where the
  configuration says that a local filesystem is shared: libvirt 9.0 refuses such disks otherwise).
- While it runs (the call blocks in a worker thread; the Host has more): job_stats(), set_max_downtime(),
  set_max_speed(), abort_job(), start_postcopy(); follow_job() yields the figures periodically, woken by
  MIGRATION_ITERATION events. No qemu-monitor-command anywhere: it does not stick and taints the domain.
- move_disk(): the same-node storage move (blockCopy SHALLOW|REUSE_EXT|TRANSIENT_JOB to a pre-created leaf,
  READY, pivot). The persistent definition is then redefined by the caller (domain.snapshot.retarget_disks).

Facts this relies on are in /work/notes/migration-facts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

import libvirt

from libvirt_operator.hypervisor.errors import HypervisorError

if TYPE_CHECKING:
    from libvirt_operator.hypervisor.host import Host

BASE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
JOB_TYPES = {
    libvirt.VIR_DOMAIN_JOB_NONE: "none",
    libvirt.VIR_DOMAIN_JOB_BOUNDED: "bounded",
    libvirt.VIR_DOMAIN_JOB_UNBOUNDED: "unbounded",
    libvirt.VIR_DOMAIN_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_JOB_CANCELLED: "cancelled",
}
JOB_OPERATIONS = {
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "migration-out",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: "migration-in",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "save",
    libvirt.VIR_DOMAIN_JOB_OPERATION_RESTORE: "restore",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "dump",
    libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP: "backup",
}
_BLOCK_COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                     | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)


@dataclass(frozen=True)
class MigrationOptions:
    """What one migration asks for beyond the base flags (pure data: migration_flags/params build the call)."""

    data_uri: str | None = None  # where QEMU sends the data, e.g. tcp://10.0.0.2 (default: the destination's name)
    listen_address: str | None = None  # the destination QEMU's (and NBD server's) listen address
    bandwidth_mib: int | None = None  # MiB/s, 0/None = unlimited
    auto_converge: bool = False
    auto_converge_initial: int | None = None  # % throttle at the start (libvirt/QEMU default 20)
    auto_converge_increment: int | None = None  # % more per iteration (default 10)
    postcopy: bool = False  # allows start_postcopy(); the migration starts pre-copy
    copy_storage: bool = False  # NON_SHARED_INC: copy the top layer of migrate_disks into the destination's files
    migrate_disks: tuple[str, ...] = ()  # targets (vda, ...); required with copy_storage
    dest_xml: str | None = None  # the domain as it must run on the destination (XMLDesc MIGRATABLE, retargeted)
    persist_xml: str | None = None  # its persistent definition there (required with dest_xml on 9.0)
    unsafe: bool = False  # only for storage the configuration declares shared although libvirt cannot tell
    parallel_connections: int | None = None
    extra_flags: int = 0  # e.g. VIR_MIGRATE_ABORT_ON_ERROR, COMPRESSED

    def __post_init__(self) -> None:
        if self.copy_storage and not self.migrate_disks:
            # libvirt reads an empty list as "every writable disk": always say which.
            raise ValueError("copy_storage needs migrate_disks (the targets to copy)")
        if self.migrate_disks and not self.copy_storage:
            raise ValueError("migrate_disks without copy_storage copies nothing")
        if self.dest_xml is not None and self.persist_xml is None:
            # Without PERSIST_XML, 9.0 persists the source's inactive definition (the source's paths).
            raise ValueError("dest_xml without persist_xml would persist the source's definition")
        if self.bandwidth_mib is not None and self.bandwidth_mib < 0:
            raise ValueError("bandwidth_mib must be >= 0")


def migration_flags(options: MigrationOptions) -> int:
    flags = BASE_FLAGS | options.extra_flags
    flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE if options.auto_converge else 0
    flags |= libvirt.VIR_MIGRATE_POSTCOPY if options.postcopy else 0
    flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC if options.copy_storage else 0
    flags |= libvirt.VIR_MIGRATE_UNSAFE if options.unsafe else 0
    return flags


def migration_params(options: MigrationOptions) -> dict[str, Any]:
    params: dict[str, Any] = {}
    optional = {
        libvirt.VIR_MIGRATE_PARAM_URI: options.data_uri,
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: options.listen_address,
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: options.bandwidth_mib or None,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: options.dest_xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: options.persist_xml,
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: options.parallel_connections,
    }
    if options.auto_converge:
        optional[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = options.auto_converge_initial
        optional[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = options.auto_converge_increment
    params.update({k: v for k, v in optional.items() if v is not None})
    if options.migrate_disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(options.migrate_disks)
    return params


@dataclass(frozen=True)
class JobStats:
    """A domain job's figures (jobStats). Bytes, ms; None where libvirt did not report the field."""

    type: str  # none, bounded, unbounded, completed, failed, cancelled
    operation: str | None = None  # migration-out, migration-in, save, ...
    data_total: int | None = None
    data_processed: int | None = None
    data_remaining: int | None = None
    memory_total: int | None = None
    memory_processed: int | None = None
    memory_remaining: int | None = None
    memory_dirty_rate: int | None = None  # pages/s
    memory_page_size: int | None = None
    memory_bps: int | None = None  # transfer rate, bytes/s
    iteration: int | None = None
    disk_total: int | None = None
    disk_processed: int | None = None
    disk_remaining: int | None = None
    downtime: int | None = None  # ms (expected while running, real when completed)
    elapsed: int | None = None  # ms
    setup_time: int | None = None  # ms
    auto_converge_throttle: int | None = None  # % of vCPU time taken away
    error: str | None = None  # VIR_DOMAIN_JOB_ERRMSG of a failed job
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_libvirt(cls, stats: Mapping[str, Any]) -> JobStats:
        def get(key: str) -> Any:
            return stats.get(key)

        operation = get(libvirt.VIR_DOMAIN_JOB_OPERATION)
        return cls(
            type=JOB_TYPES.get(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE), str(stats.get("type"))),
            operation=None if operation is None else JOB_OPERATIONS.get(operation, str(operation)),
            data_total=get(libvirt.VIR_DOMAIN_JOB_DATA_TOTAL),
            data_processed=get(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED),
            data_remaining=get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING),
            memory_total=get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL),
            memory_processed=get(libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED),
            memory_remaining=get(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING),
            memory_dirty_rate=get(libvirt.VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE),
            memory_page_size=get(libvirt.VIR_DOMAIN_JOB_MEMORY_PAGE_SIZE),
            memory_bps=get(libvirt.VIR_DOMAIN_JOB_MEMORY_BPS),
            iteration=get(libvirt.VIR_DOMAIN_JOB_MEMORY_ITERATION),
            disk_total=get(libvirt.VIR_DOMAIN_JOB_DISK_TOTAL),
            disk_processed=get(libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED),
            disk_remaining=get(libvirt.VIR_DOMAIN_JOB_DISK_REMAINING),
            downtime=get(libvirt.VIR_DOMAIN_JOB_DOWNTIME),
            elapsed=get(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED),
            setup_time=get(libvirt.VIR_DOMAIN_JOB_SETUP_TIME),
            auto_converge_throttle=get(libvirt.VIR_DOMAIN_JOB_AUTO_CONVERGE_THROTTLE),
            error=get(libvirt.VIR_DOMAIN_JOB_ERRMSG),
            raw=dict(stats),
        )

    @property
    def active(self) -> bool:
        return self.type in ("bounded", "unbounded")

    @property
    def percent(self) -> int | None:
        """Share of the data sent so far (0-100); 100 for a completed job."""
        if self.type == "completed":
            return 100
        if not self.data_total:
            return None
        return max(0, min(100, int(100 * (self.data_processed or 0) / self.data_total)))

    @property
    def dirty_rate_bytes(self) -> int | None:
        if self.memory_dirty_rate is None:
            return None
        return self.memory_dirty_rate * (self.memory_page_size or 4096)


def disk_destination_xml(path: str, fmt: str = "qcow2") -> str:
    """blockCopy's destination: a file disk of format `fmt` (its backing chain read from the file's header)."""
    return f"<disk type='file'><driver type={quoteattr(fmt)}/><source file={quoteattr(path)}/></disk>"


class MigrationMixin:
    """Migration calls of a Guest; expects `call(fn, fallback)`, `uuid` and `_host` (and SnapshotMixin's
    block-job calls for move_disk)."""

    call: Callable[..., Any]
    uuid: str
    _host: Host

    async def migrate(self, dest_uri: str, options: MigrationOptions | None = None) -> None:
        """Migrates the running domain to the libvirtd at `dest_uri` (e.g. qemu+tcp://node-b/system) and returns
        when it runs there. MigrationAborted when abort_job() (or a timeout) cancelled it, MigrationFailed
        otherwise; either way the domain still runs here, unchanged."""
        options = options or MigrationOptions()
        flags, params = migration_flags(options), migration_params(options)

        def run(d: libvirt.virDomain) -> None:
            try:
                d.migrateToURI3(dest_uri, params, flags)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED:
                    raise HypervisorError("MigrationAborted", err.get_error_message() or str(err),
                                          err.get_error_code()) from err
                raise

        await self.call(run, fallback="MigrationFailed")

    async def job_stats(self, completed: bool = False) -> JobStats:
        """The running job's figures; `completed`: those of the last completed job (the destination keeps the
        incoming migration's), kept for a later read."""
        flags = (libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
                 if completed else 0)
        return JobStats.from_libvirt(await self.call(lambda d: d.jobStats(flags), fallback="JobStatsFailed"))

    async def set_max_downtime(self, milliseconds: int) -> None:
        """The longest pause allowed for the final switch-over; raising it lets a busy guest converge."""
        await self.call(lambda d: d.migrateSetMaxDowntime(milliseconds, 0), fallback="SetMaxDowntimeFailed")

    async def max_downtime(self) -> int:
        return await self.call(lambda d: d.migrateGetMaxDowntime(0), fallback="GetMaxDowntimeFailed")

    async def set_max_speed(self, mib_per_second: int) -> None:
        """Migration bandwidth in MiB/s (0 = unlimited), for the running migration and the next one."""
        await self.call(lambda d: d.migrateSetMaxSpeed(mib_per_second, 0), fallback="SetMaxSpeedFailed")

    async def max_speed(self) -> int:
        return await self.call(lambda d: d.migrateGetMaxSpeed(0), fallback="GetMaxSpeedFailed")

    async def abort_job(self) -> None:
        """Cancels the running job (a pre-copy migration: the domain stays here, running). OperationInvalid
        when no job runs; refused by libvirt once post-copy started."""
        await self.call(lambda d: d.abortJob(), fallback="AbortJobFailed")

    async def start_postcopy(self) -> None:
        """Switches a migration started with postcopy=True to post-copy: the domain runs on the destination at
        once and its memory follows on demand. From here on it cannot be aborted. Only once the job is active and
        past its setup (QEMU: "Enable postcopy with migrate_set_capability before the start of migration" when
        called during libvirt's setup; "post-copy can only be started while outgoing migration is in progress"
        before or after the job)."""
        await self.call(lambda d: d.migrateStartPostCopy(0), fallback="StartPostCopyFailed")

    async def follow_job(self, interval: float = 1.0) -> AsyncIterator[JobStats]:
        """Yields job_stats() at least every `interval` s (and at each MIGRATION_ITERATION / JOB_COMPLETED event)
        until no job runs (the last figures yielded are the ones before the end). Stops quietly when the domain
        is gone from this host. It ends at once when no job runs YET: for a migration started in another task,
        wait_job_active() first."""
        woken = asyncio.Event()

        def on_event(event: Any) -> None:
            if getattr(event, "uuid", None) == self.uuid and getattr(event, "kind", None) in (
                    "migration-iteration", "job-completed"):
                woken.set()

        unsubscribe = self._host.subscribe(on_event)
        try:
            while True:
                try:
                    stats = await self.job_stats()
                except HypervisorError as err:
                    if err.reason == "DomainNotFound":
                        return
                    raise
                if not stats.active:
                    return
                yield stats
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), interval)
        finally:
            unsubscribe()

    async def wait_job_active(self, timeout: float = 30.0) -> JobStats:
        """Waits until a job runs on the domain (e.g. a migration started in another task); JobNotStarted after
        `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.job_stats()
            if stats.active:
                return stats
            if time.monotonic() > deadline:
                raise HypervisorError("JobNotStarted", f"no job on the domain after {timeout} s")
            await asyncio.sleep(0.05)

    # -- storage move on the same node ---------------------------------------------------------------

    async def move_disk(self, target: str, leaf: str, fmt: str = "qcow2", *, bandwidth: int | None = None,
                        timeout: float = 600.0) -> None:
        """Moves disk `target` onto `leaf`: a file pre-created (qemu-img create -F ... -b <copied parent>) whose
        backing chain holds the same data as the disk's backing chain. blockCopy SHALLOW|REUSE_EXT|TRANSIENT_JOB
        (only the top layer is copied), wait for READY, pivot. On failure the copy is cancelled and the disk
        stays on its old files. `bandwidth` in bytes/s. The persistent definition is the caller's to rewrite."""
        flags = _BLOCK_COPY_FLAGS
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else {}
        dest_xml = disk_destination_xml(leaf, fmt)
        await self.call(lambda d: d.blockCopy(target, dest_xml, params, flags), fallback="BlockCopyFailed")
        try:
            await self.wait_block_job(target, "ready", timeout)
            await self.block_job_pivot(target)
        except BaseException:
            with contextlib.suppress(HypervisorError):
                await self.block_job_abort(target)
            raise
