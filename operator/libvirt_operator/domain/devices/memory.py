"""``<memory model='dimm'>``: a hot-plugged memory module (needs ``<maxMemory>`` and a NUMA cell)."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, IntText, KiBText


class MemoryDevice(Device):
    TAG = "memory"
    CHILD_ORDER = ("source", "target", "alias", "address")

    model = Attr("model")  # 'dimm'
    size_kib = KiBText("target/size")
    node = IntText("target/node")
