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

    type = Attr("type")  # 'network', 'bridge', 'user'
    mac_address = Attr("address", path="mac")
    source_network = Attr("network", path="source")
    source_bridge = Attr("bridge", path="source")
    model_type = Attr("type", path="model")  # 'virtio', 'e1000e'...
    target_dev = Attr("dev", path="target")  # host tap device, live only
    link_state = Attr("state", path="link")  # 'up' / 'down'
    bandwidth = Child(Bandwidth)
    vlan = Child(Vlan)

    @property
    def source(self) -> str | None:
        """Network or bridge name, whichever this type uses."""
        return {"network": self.source_network, "bridge": self.source_bridge}.get(self.type or "")
