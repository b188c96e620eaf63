"""Device element classes, one module per family."""

from libvirt_operator.domain.devices.base import USER_ALIAS_PREFIX, Device
from libvirt_operator.domain.devices.channel import GUEST_AGENT_CHANNEL, Channel
from libvirt_operator.domain.devices.chardev import CharDevice, Console, Serial
from libvirt_operator.domain.devices.container import Devices
from libvirt_operator.domain.devices.controller import Controller
from libvirt_operator.domain.devices.disk import Disk
from libvirt_operator.domain.devices.hostdev import HostDev
from libvirt_operator.domain.devices.interface import Bandwidth, Inbound, Interface, Outbound, Vlan, VlanTag
from libvirt_operator.domain.devices.memballoon import MemBalloon
from libvirt_operator.domain.devices.memory import MemoryDevice

__all__ = [
    "GUEST_AGENT_CHANNEL", "USER_ALIAS_PREFIX", "Bandwidth", "Channel", "CharDevice", "Console",
    "Controller", "Device", "Devices", "Disk", "HostDev", "Inbound", "Interface", "MemBalloon", "MemoryDevice",
    "Outbound",
    "Serial", "Vlan", "VlanTag",
]
