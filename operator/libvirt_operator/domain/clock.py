"""``<clock>``: the guest's clock offset (timers are kept as they are)."""

from __future__ import annotations

from libvirt_operator.domain.xmlbase import Attr, XMLElement


class Clock(XMLElement):
    TAG = "clock"
    offset = Attr("offset")  # 'utc', 'localtime'
