"""``<domain>``: the root element, ``DomainConfig``."""

from __future__ import annotations

from libvirt_operator.domain import metadata
from libvirt_operator.domain.clock import Clock
from libvirt_operator.domain.cpu import CPU
from libvirt_operator.domain.cputune import CPUTune
from libvirt_operator.domain.devices import Devices
from libvirt_operator.domain.features import Features
from libvirt_operator.domain.guest_os import GuestOS
from libvirt_operator.domain.metadata import OperatorMetadata
from libvirt_operator.domain.xmlbase import Attr, Child, IntAttr, IntText, KiBText, Text, XMLElement


class DomainConfig(XMLElement):
    TAG = "domain"
    # libvirt's own output order
    CHILD_ORDER = ("name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory",
                   "currentMemory", "blkiotune", "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads",
                   "cputune", "numatune", "resource", "sysinfo", "bootloader", "bootloader_args", "os",
                   "idmap", "features", "cpu", "clock", "on_poweroff", "on_reboot", "on_crash", "pm",
                   "perf", "devices", "seclabel", "keywrap", "launchSecurity")

    type = Attr("type")  # 'kvm' or 'qemu' (TCG)
    id = IntAttr("id")  # live only
    name = Text("name")
    uuid = Text("uuid")
    title = Text("title")
    max_memory_kib = KiBText("maxMemory")  # hot-add ceiling
    max_memory_slots = IntAttr("slots", path="maxMemory")
    memory_kib = KiBText("memory")
    current_memory_kib = KiBText("currentMemory")
    vcpus_max = IntText("vcpu")
    vcpus_current = IntAttr("current", path="vcpu")  # absent: all vcpus_max online
    vcpu_placement = Attr("placement", path="vcpu")
    cputune = Child(CPUTune)
    os = Child(GuestOS)
    features = Child(Features)
    cpu = Child(CPU)
    clock = Child(Clock)
    on_poweroff = Text("on_poweroff")
    on_reboot = Text("on_reboot")
    on_crash = Text("on_crash")
    devices = Child(Devices)
    operator_metadata = Child(OperatorMetadata, path="metadata")

    @property
    def vcpus_online(self) -> int | None:
        return self.vcpus_current if self.vcpus_current is not None else self.vcpus_max

    def config_hash(self) -> str:
        """Hash of this definition without the operator metadata; see ``metadata``."""
        return metadata.config_hash(self.element)

    def is_stale(self, desired: DomainConfig) -> bool:
        """Whether this (stored) domain was rendered from something else than ``desired``."""
        own = self.operator_metadata
        wanted = desired.operator_metadata
        return own is None or wanted is None or own.config_hash != wanted.config_hash
