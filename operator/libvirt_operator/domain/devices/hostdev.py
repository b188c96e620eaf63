"""``<hostdev>``: host PCI (VFIO) and USB devices passed through to the guest."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.devices.interface import pci_address, set_pci_address
from libvirt_operator.domain.xmlbase import Attr, BoolAttr


class HostDev(Device):
    TAG = "hostdev"
    CHILD_ORDER = ("driver", "source", "boot", "rom", "alias", "address")

    mode = Attr("mode")  # 'subsystem'
    type = Attr("type")  # 'pci' or 'usb'
    managed = BoolAttr("managed")
    pci_domain = Attr("domain", path="source/address")
    pci_bus = Attr("bus", path="source/address")
    pci_slot = Attr("slot", path="source/address")
    pci_function = Attr("function", path="source/address")
    usb_vendor = Attr("id", path="source/vendor")
    usb_product = Attr("id", path="source/product")

    @property
    def pci_address(self) -> str | None:
        return pci_address(self)

    def set_pci_address(self, address: str) -> None:
        set_pci_address(self, address)
