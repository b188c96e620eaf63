"""Host-level calls on save images (HostSnapshotMixin, inherited by Host): restore one, read or
rewrite the domain XML embedded in it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import libvirt

from libvirt_operator.hypervisor.errors import HypervisorError

if TYPE_CHECKING:
    from libvirt_operator.hypervisor.guest import Guest


class HostSnapshotMixin:
    """Expects `run(fn, fallback=...)`, `connection()` and `lookup(uuid)` (Host)."""

    run: Callable[..., Any]
    connection: Callable[[], libvirt.virConnect]
    lookup: Callable[..., Any]

    async def restore(self, path: str, xml: str, *, paused: bool = False, running: bool = False,
                      bypass_cache: bool = False) -> Guest:
        """Starts the domain saved in `path` with definition `xml` (the embedded one with host-side
        changes, e.g. each disk pointed at its new leaf; required: restoring a memory snapshot
        without it would run QEMU on the backing files). paused/running override the image's own
        choice. Returns the running (or paused) Guest."""
        if paused and running:
            raise ValueError("restore either paused or running")
        if not xml:
            raise ValueError("restore needs the domain XML (saveImageGetXMLDesc, disks pointed at their leaves)")
        flags = ((libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0) | (libvirt.VIR_DOMAIN_SAVE_RUNNING if running else 0)
                 | (libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if bypass_cache else 0))
        await self.run(lambda: self.connection().restoreFlags(path, xml, flags), fallback="RestoreFailed")
        uuid = ET.fromstring(xml).findtext("uuid")
        guest = await self.lookup(uuid) if uuid else None
        if guest is None:
            raise HypervisorError("RestoreFailed", f"{path}: restored, but no domain with UUID {uuid} is found")
        return guest

    async def save_image_xml(self, path: str) -> str:
        """The domain XML embedded in save image (or memory snapshot) `path`, secure parts included."""
        return await self.run(lambda: self.connection().saveImageGetXMLDesc(
            path, libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE), fallback="SaveImageUnreadable")

    async def save_image_define_xml(self, path: str, xml: str, *, paused: bool = False,
                                    running: bool = False) -> None:
        """Rewrites the XML embedded in save image `path` (host-side changes only)."""
        flags = (libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0) | (libvirt.VIR_DOMAIN_SAVE_RUNNING if running else 0)
        await self.run(lambda: self.connection().saveImageDefineXML(path, xml, flags), fallback="SaveImageDefineFailed")
