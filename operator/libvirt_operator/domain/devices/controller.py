"""``<controller>``: USB, SCSI, virtio-serial, SATA and PCI(e) controllers."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, IntAttr


class Controller(Device):
    TAG = "controller"
    CHILD_ORDER = ("model", "target", "driver", "alias", "address")

    type = Attr("type")  # 'usb', 'scsi', 'virtio-serial', 'sata', 'pci'
    index = IntAttr("index")
    model = Attr("model")  # 'qemu-xhci', 'virtio-scsi', 'pcie-root-port'...
    ports = IntAttr("ports")
    target_chassis = IntAttr("chassis", path="target")  # pcie-root-port, set by libvirt
    target_port = IntAttr("port", path="target")
