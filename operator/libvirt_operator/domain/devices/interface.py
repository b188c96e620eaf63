"""``<interface>``: NICs on a libvirt network, a host bridge or user-mode networking,
with their QoS (``<bandwidth>``) and VLAN (``<vlan>``) children."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, BoolAttr, Child, Children, IntAttr, XMLElement


class BandwidthLimit(XMLElement):
    """``<inbound>`` or ``<outbound>``: average/peak in KiB/s, burst in KiB."""

    average = IntAttr("average")
    peak = IntAttr("peak")
    burst = IntAttr("burst")
    floor = IntAttr("floor")  # inbound only, type='network' only


class Inbound(BandwidthLimit):
    TAG = "inbound"


class Outbound(BandwidthLimit):
    TAG = "outbound"


class Bandwidth(XMLElement):
    TAG = "bandwidth"
    CHILD_ORDER = ("inbound", "outbound")
    inbound = Child(Inbound)
    outbound = Child(Outbound)


class VlanTag(XMLElement):
    TAG = "tag"
    id = IntAttr("id")
    native_mode = Attr("nativeMode")  # 'tagged' / 'untagged', trunks only


class Vlan(XMLElement):
    TAG = "vlan"
    trunk = BoolAttr("trunk")
    tags = Children(VlanTag)


class Interface(Device):
    TAG = "interface"
    CHILD_ORDER = ("mac", "source", "vlan", "virtualport", "bandwidth", "target", "model", "driver",
                   "link", "mtu", "boot", "alias", "address")

    type = Attr("type")  # 'network', 'bridge', 'user', 'hostdev' (SR-IOV VF)
    managed = BoolAttr("managed")  # hostdev: libvirt binds the VF to vfio-pci itself
    mac_address = Attr("address", path="mac")
    source_network = Attr("network", path="source")
    source_bridge = Attr("bridge", path="source")
    model_type = Attr("type", path="model")  # 'virtio', 'e1000e'...
    target_dev = Attr("dev", path="target")  # host tap device, live only
    link_state = Attr("state", path="link")  # 'up' / 'down'
    pci_domain = Attr("domain", path="source/address")  # hostdev: the VF's host address
    pci_bus = Attr("bus", path="source/address")
    pci_slot = Attr("slot", path="source/address")
    pci_function = Attr("function", path="source/address")
    bandwidth = Child(Bandwidth)
    vlan = Child(Vlan)

    @property
    def source(self) -> str | None:
        """Network or bridge name, whichever this type uses; a hostdev's PCI address."""
        if self.type == "hostdev":
            return pci_address(self)
        return {"network": self.source_network, "bridge": self.source_bridge}.get(self.type or "")

    def set_pci_address(self, address: str) -> None:
        set_pci_address(self, address)


def pci_address(dev) -> str | None:
    """'0000:03:00.1' from a device's ``<source><address>`` (libvirt writes hex attributes)."""
    parts = (dev.pci_domain, dev.pci_bus, dev.pci_slot, dev.pci_function)
    if None in parts:
        return None
    d, b, s, f = (int(p, 16) for p in parts)
    return f"{d:04x}:{b:02x}:{s:02x}.{f:x}"


def set_pci_address(dev, address: str) -> None:
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    dev._ensure("source/address").set("type", "pci")
    dev.pci_domain, dev.pci_bus, dev.pci_slot, dev.pci_function = (
        f"0x{domain}", f"0x{bus}", f"0x{slot}", f"0x{function}")
