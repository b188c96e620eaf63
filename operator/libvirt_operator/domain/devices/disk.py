"""``<disk>``: file-backed disks and CD-ROMs."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, Flag


class Disk(Device):
    TAG = "disk"
    CHILD_ORDER = ("driver", "source", "backingStore", "target", "iotune", "boot", "readonly",
                   "shareable", "serial", "alias", "address")

    type = Attr("type")  # 'file'
    device = Attr("device")  # 'disk' or 'cdrom'
    driver_name = Attr("name", path="driver")  # 'qemu'
    driver_type = Attr("type", path="driver")  # image format: 'qcow2', 'raw'
    source_file = Attr("file", path="source")  # None: an empty CD-ROM drive
    target_dev = Attr("dev", path="target")  # guest name: 'vda', 'sda'
    target_bus = Attr("bus", path="target")
    readonly = Flag("readonly")

    @property
    def is_cdrom(self) -> bool:
        return self.device == "cdrom"
