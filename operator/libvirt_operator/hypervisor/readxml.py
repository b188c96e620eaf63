"""Facts read out of a domain's XML (libvirt's own output, so a small reader suffices)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class DiskSource:
    target: str  # guest device name, e.g. vda
    path: str | None  # file/block device/dir/network name; None for an empty CD-ROM
    device: str  # disk, cdrom, floppy, lun
    read_only: bool


def agent_channel_state(domain_xml: str) -> str | None:
    """The guest-agent channel's target state: 'connected', 'disconnected', '' when the
    XML carries none (inactive XML), None when the domain has no such channel."""
    for target in ET.fromstring(domain_xml).iterfind("./devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == AGENT_CHANNEL:
            return target.get("state", "")
    return None


def disk_sources(domain_xml: str) -> list[DiskSource]:
    disks = []
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        target = disk.find("target")
        disks.append(DiskSource(
            target=target.get("dev", "") if target is not None else "",
            path=_source_path(disk.get("type", "file"), disk.find("source")),
            device=disk.get("device", "disk"),
            read_only=disk.find("readonly") is not None,
        ))
    return disks


def _source_path(disk_type: str, source: ET.Element | None) -> str | None:
    if source is None:
        return None
    if disk_type == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        return f"{pool}/{volume}" if pool and volume else None
    if disk_type == "network":
        protocol, name = source.get("protocol"), source.get("name")
        return f"{protocol}:{name}" if protocol and name else name
    for attr in ("file", "dev", "dir"):
        if source.get(attr):
            return source.get(attr)
    return None
