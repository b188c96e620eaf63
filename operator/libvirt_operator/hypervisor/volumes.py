"""Storage volumes through libvirt's own connection: pools over a node's storage roots, overlay volumes, and
the copy of a file from one node to another as a volume stream (virStorageVolDownload on the source's
connection piped into virStorageVolUpload on the destination's), sparse: holes travel as hole lengths, not
zeros. It needs nothing but the two libvirt connections, so it works between real hosts (qemu+tcp/tls)
exactly as between the local world's nodes; no shared filesystem, no ssh, no cp.

Every function takes Host objects and runs its blocking part in a Host worker thread.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

import libvirt

from libvirt_operator.hypervisor.errors import HypervisorError

if TYPE_CHECKING:
    from libvirt_operator.hypervisor.host import Host

CHUNK = 1 << 20  # bytes per stream read (libvirt's own limit is 4 MiB minus its header)
_SPARSE_DOWNLOAD = libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
_SPARSE_UPLOAD = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM


@dataclass(frozen=True)
class Transfer:
    path: str  # the new volume's path on the destination
    data_bytes: int  # bytes sent as data
    hole_bytes: int  # bytes sent as holes (0 without sparse)
    seconds: float


@dataclass(frozen=True)
class Volume:
    path: str
    pool: str
    format: str | None  # what libvirt detected (raw, qcow2, ...)
    capacity: int  # virtual size, bytes
    allocation: int  # bytes on disk


# -- pools -----------------------------------------------------------------------------------------------


async def ensure_dir_pool(host: Host, name: str, path: str) -> None:
    """A running `dir` pool `name` over directory `path` (created when missing); an existing pool of that name
    must have that path (PoolMismatch otherwise)."""

    def blocking() -> None:
        conn = host.connection()
        try:
            pool = conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            xml = (f"<pool type='dir'><name>{escape(name)}</name>"
                   f"<target><path>{escape(path)}</path></target></pool>")
            pool = conn.storagePoolDefineXML(xml, 0)
            pool.build(0)  # mkdir -p (NO_OVERWRITE would try to format a source device)
            pool.setAutostart(1)
        if _pool_path(pool) != os.path.normpath(path):
            raise HypervisorError("PoolMismatch", f"pool {name} is over {_pool_path(pool)}, not {path}")
        if not pool.isActive():
            pool.create(0)

    await host.run(blocking, fallback="PoolFailed")


def pool_named_for(conn: libvirt.virConnect, directory: str) -> str | None:
    """The name of an active pool over `directory` (blocking; on a libvirt thread), or None."""
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if _pool_path(pool) == os.path.normpath(directory):
            return pool.name()
    return None


def _pool_path(pool: libvirt.virStoragePool) -> str:
    return os.path.normpath(ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") or "")


def _volume_by_path(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol:
    """The volume of file `path`; refreshes the pools over its directory first if libvirt has not seen it yet
    (files made outside libvirt appear only after a refresh). VolumeNotFound when no pool holds it."""
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
    directory = os.path.dirname(os.path.normpath(path))
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if _pool_path(pool) == directory:
            pool.refresh(0)
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise HypervisorError("VolumeNotFound", f"no storage pool holds {path}", err.get_error_code()) from err
        raise


def _describe(vol: libvirt.virStorageVol) -> Volume:
    root = ET.fromstring(vol.XMLDesc(0))
    fmt = root.find("./target/format")
    _type, capacity, allocation = vol.info()
    return Volume(vol.path(), vol.storagePoolLookupByVolume().name(), fmt.get("type") if fmt is not None else None,
                  capacity, allocation)


async def volume(host: Host, path: str) -> Volume:
    return await host.run(lambda: _describe(_volume_by_path(host.connection(), path)), fallback="VolumeFailed")


async def create_volume(host: Host, pool: str, name: str, capacity: int, *, backing: str | None = None,
                        backing_format: str = "qcow2", fmt: str = "qcow2") -> str:
    """A new qcow2 volume `name` of `capacity` bytes in `pool`, empty, or an overlay on `backing` (a file on that
    host) when given; returns its path. libvirt runs qemu-img on that host itself, so this works remotely (e.g.
    a target node's leaves before a migration with local disks). VolumeExists when the pool has that name.
    `fmt`: the new volume's format (an empty raw file of `capacity` bytes has no backing)."""
    backing_xml = (f"<backingStore><path>{escape(backing)}</path><format type={quoteattr(backing_format)}/>"
                   f"</backingStore>" if backing else "")
    xml = (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{int(capacity)}</capacity>"
           f"<target><format type={quoteattr(fmt)}/></target>{backing_xml}</volume>")

    def blocking() -> str:
        p = host.connection().storagePoolLookupByName(pool)
        p.refresh(0)
        _refuse_existing(p, name)
        return p.createXML(xml, 0).path()

    return await host.run(blocking, fallback="VolumeCreateFailed")


async def delete_volume(host: Host, path: str) -> bool:
    """Deletes the file of volume `path`; False when no volume had that path."""

    def blocking() -> bool:
        try:
            vol = _volume_by_path(host.connection(), path)
        except HypervisorError as err:
            if err.reason == "VolumeNotFound":
                return False
            raise
        vol.delete(0)
        return True

    return await host.run(blocking, fallback="VolumeDeleteFailed")


def _refuse_existing(pool: libvirt.virStoragePool, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        existing = pool.storageVolLookupByName(name)
        raise HypervisorError("VolumeExists", f"{existing.path()} exists already")


# -- transfer ----------------------------------------------------------------------------------------------


async def transfer(source: Host, source_path: str, destination: Host, pool: str, name: str, *,
                   sparse: bool = True) -> Transfer:
    """Copies the file of volume `source_path` on `source` into a new volume `name` of `pool` on `destination`,
    byte for byte (any format: the file is streamed as it is), keeping holes when `sparse`. The destination
    volume must not exist (VolumeExists); a failed transfer deletes what it created (VolumeTransferFailed)."""

    def blocking() -> Transfer:
        started = time.monotonic()
        src_conn, dst_conn = source.connection(), destination.connection()
        src_vol = _volume_by_path(src_conn, source_path)
        dst_pool = dst_conn.storagePoolLookupByName(pool)
        dst_pool.refresh(0)
        _refuse_existing(dst_pool, name)
        # An empty raw file: the upload writes the source's bytes (and holes) into it as they are.
        dst_vol = dst_pool.createXML(f"<volume><name>{escape(name)}</name><capacity>0</capacity>"
                                     f"<allocation>0</allocation><target><format type='raw'/></target></volume>", 0)
        down, up = src_conn.newStream(0), dst_conn.newStream(0)
        data = holes = 0
        try:
            src_vol.download(down, 0, 0, _SPARSE_DOWNLOAD if sparse else 0)
            dst_vol.upload(up, 0, 0, _SPARSE_UPLOAD if sparse else 0)
            while True:
                got = down.recvFlags(CHUNK, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE if sparse else 0)
                if got == -3:  # a hole is next
                    length = down.recvHole(0)
                    up.sendHole(length, 0)
                    holes += length
                    continue
                if isinstance(got, int):
                    raise HypervisorError("VolumeTransferFailed", f"unexpected stream result {got}")
                if not got:
                    break
                view = memoryview(got)
                while view:
                    sent = up.send(view.tobytes())
                    view = view[sent:]
                data += len(got)
            down.finish()
            up.finish()
        except BaseException:
            for stream in (down, up):
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
            with contextlib.suppress(libvirt.libvirtError):
                dst_vol.delete(0)
            raise
        with contextlib.suppress(libvirt.libvirtError):
            dst_pool.refresh(0)  # libvirt re-reads the new file's format and sizes
        return Transfer(dst_vol.path(), data, holes, time.monotonic() - started)

    return await source.run(blocking, fallback="VolumeTransferFailed")
