"""``<memballoon>``: the balloon device behind live memory resizing and memory stats."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, IntAttr


class MemBalloon(Device):
    TAG = "memballoon"
    CHILD_ORDER = ("alias", "stats", "address")

    model = Attr("model")  # 'virtio' or 'none'
    stats_period = IntAttr("period", path="stats")  # seconds between guest memory stats updates
