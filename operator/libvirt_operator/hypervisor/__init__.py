"""The hypervisor layer: libvirt behind async Host (a connection) and Guest (a domain) objects.

Imports libvirt, the standard library and the API layer only; never kubernetes or kopf.
"""

from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.events import ConnectionEvent, DomainEvent, register_event_loop
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host, HostInfo
from libvirt_operator.hypervisor.readxml import DiskSource
from libvirt_operator.hypervisor.states import PowerState

__all__ = ["ConnectionEvent", "DiskSource", "DomainEvent", "Guest", "Host", "HostInfo", "HypervisorError",
           "PowerState", "register_event_loop"]
