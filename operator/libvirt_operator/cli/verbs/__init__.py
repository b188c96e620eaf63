"""The verbs of `kubectl virsh`, one module per concern; importing this package fills plan.VERBS
(in this order, which is the order of the help)."""

from libvirt_operator.cli.verbs import devices, info, migrate, power, qos, resources, snapshots

__all__ = ["devices", "info", "migrate", "power", "qos", "resources", "snapshots"]
