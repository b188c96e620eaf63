"""``<serial>`` and ``<console>``: character devices, here pty-backed with an optional log file."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr, BoolAttr, IntAttr


class CharDevice(Device):
    TAG = "serial"
    CHILD_ORDER = ("source", "log", "protocol", "target", "alias", "address")

    type = Attr("type")  # 'pty', 'file', 'unix'...
    tty = Attr("tty")  # live only, pty: the host pty (consoles)
    source_path = Attr("path", path="source")  # live only for pty: '/dev/pts/N'
    log_file = Attr("file", path="log")  # everything the guest writes, appended by virtlogd
    log_append = BoolAttr("append", path="log", true="on", false="off")
    target_type = Attr("type", path="target")  # 'isa-serial' (serial), 'serial' (console)
    target_port = IntAttr("port", path="target")
    target_model = Attr("name", path="target/model")


class Serial(CharDevice):
    TAG = "serial"


class Console(CharDevice):
    """A console of target type 'serial' is the first serial port seen again:
    libvirt copies that serial's source, log and alias into it."""

    TAG = "console"
