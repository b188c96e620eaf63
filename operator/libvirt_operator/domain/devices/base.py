"""What every device element has: a user alias, a guest address, a boot order."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Attr, IntAttr, XMLElement

# libvirt accepts user-chosen aliases only with this prefix; they survive
# restarts and migration and name the device in DEVICE_REMOVED events.
USER_ALIAS_PREFIX = "ua-"


class Device(XMLElement):
    alias = Attr("name", path="alias")
    address_type = Attr("type", path="address")  # pci, drive, virtio-serial...: assigned by libvirt
    boot_order = IntAttr("order", path="boot")

    @property
    def user_alias(self) -> str | None:
        """The alias if it is one of ours (``ua-``), else None (libvirt's own, e.g. ``virtio-disk0``)."""
        alias = self.alias
        return alias if alias and alias.startswith(USER_ALIAS_PREFIX) else None
