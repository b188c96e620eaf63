"""``<devices>``: the device families, each a live list."""

from __future__ import annotations

from libvirt_operator.domain.devices.channel import Channel
from libvirt_operator.domain.devices.chardev import Console, Serial
from libvirt_operator.domain.devices.controller import Controller
from libvirt_operator.domain.devices.disk import Disk
from libvirt_operator.domain.devices.hostdev import HostDev
from libvirt_operator.domain.devices.interface import Interface
from libvirt_operator.domain.devices.memballoon import MemBalloon
from libvirt_operator.domain.devices.memory import MemoryDevice
from libvirt_operator.domain.xmlbase import Child, Children, Text, XMLElement


class Devices(XMLElement):
    TAG = "devices"
    # libvirt's own output order
    CHILD_ORDER = ("emulator", "disk", "controller", "lease", "filesystem", "interface", "smartcard",
                   "serial", "parallel", "console", "channel", "input", "tpm", "graphics", "sound",
                   "audio", "video", "hostdev", "redirdev", "redirfilter", "hub", "watchdog",
                   "memballoon", "rng", "panic", "shmem", "memory", "iommu", "vsock")

    emulator = Text("emulator")
    disks = Children(Disk)
    controllers = Children(Controller)
    interfaces = Children(Interface)
    serials = Children(Serial)
    consoles = Children(Console)
    channels = Children(Channel)
    hostdevs = Children(HostDev)
    memballoon = Child(MemBalloon)
    memories = Children(MemoryDevice)

    def by_alias(self, alias: str):
        """The modelled device carrying this alias, if any."""
        families = (self.disks, self.interfaces, self.controllers, self.serials, self.channels, self.hostdevs,
                    self.memories)
        for family in families:
            found = family.find(lambda dev: dev.alias == alias)
            if found is not None:
                return found
        balloon = self.memballoon
        return balloon if balloon is not None and balloon.alias == alias else None
