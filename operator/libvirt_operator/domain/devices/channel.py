"""``<channel>``: host-guest channels, here the qemu-guest-agent's virtio port."""

from __future__ import annotations

from libvirt_operator.domain.devices.base import Device
from libvirt_operator.domain.xmlbase import Attr

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


class Channel(Device):
    TAG = "channel"
    CHILD_ORDER = ("source", "target", "alias", "address")

    type = Attr("type")  # 'unix'
    source_path = Attr("path", path="source")  # socket path; libvirt picks one when empty
    source_mode = Attr("mode", path="source")  # 'bind'
    target_type = Attr("type", path="target")  # 'virtio'
    target_name = Attr("name", path="target")
    target_state = Attr("state", path="target")  # live only: 'connected' / 'disconnected'

    @property
    def is_guest_agent(self) -> bool:
        return self.target_type == "virtio" and self.target_name == GUEST_AGENT_CHANNEL

    @property
    def agent_connected(self) -> bool:
        """Live XML: the guest side of the port is open (the agent runs)."""
        return self.target_state == "connected"
