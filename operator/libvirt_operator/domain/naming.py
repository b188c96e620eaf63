"""Names the operator gives to domains and devices, and how to read them back."""

from __future__ import annotations

import hashlib

from libvirt_operator.domain.devices.base import USER_ALIAS_PREFIX

DISK_ALIAS_PREFIX = f"{USER_ALIAS_PREFIX}disk-"
NIC_ALIAS_PREFIX = f"{USER_ALIAS_PREFIX}nic-"
HOSTDEV_ALIAS_PREFIX = f"{USER_ALIAS_PREFIX}hostdev-"
DIMM_ALIAS_PREFIX = f"{USER_ALIAS_PREFIX}dimm-"
# Aliases of the devices every rendered domain has at most one of.
SERIAL_ALIAS = f"{USER_ALIAS_PREFIX}serial0"
GUEST_AGENT_ALIAS = f"{USER_ALIAS_PREFIX}guest-agent"
BALLOON_ALIAS = f"{USER_ALIAS_PREFIX}balloon"
USB_CONTROLLER_ALIAS = f"{USER_ALIAS_PREFIX}usb"
SCSI_CONTROLLER_ALIAS = f"{USER_ALIAS_PREFIX}scsi"
VIRTIO_SERIAL_ALIAS = f"{USER_ALIAS_PREFIX}virtio-serial"


def default_domain_name(namespace: str, vm_name: str) -> str:
    # '_' appears in neither a namespace nor an object name: the split is unambiguous.
    return f"{namespace}_{vm_name}"


def disk_alias(disk_name: str) -> str:
    return DISK_ALIAS_PREFIX + disk_name


def nic_alias(interface_name: str) -> str:
    return NIC_ALIAS_PREFIX + interface_name


def hostdev_alias(device_name: str) -> str:
    return HOSTDEV_ALIAS_PREFIX + device_name


def dimm_alias(index: int) -> str:
    return f"{DIMM_ALIAS_PREFIX}{index}"


def hostdev_name_from_alias(alias: str | None) -> str | None:
    return _strip(alias, HOSTDEV_ALIAS_PREFIX)


def disk_name_from_alias(alias: str | None) -> str | None:
    """The spec's disk name behind ``ua-disk-<name>``, else None."""
    return _strip(alias, DISK_ALIAS_PREFIX)


def nic_name_from_alias(alias: str | None) -> str | None:
    return _strip(alias, NIC_ALIAS_PREFIX)


def _strip(alias: str | None, prefix: str) -> str | None:
    return alias[len(prefix):] if alias and alias.startswith(prefix) else None


def generated_mac(domain_uuid: str, interface_name: str) -> str:
    """A stable MAC for an interface without one: redefining a domain must not
    change its MACs (libvirt would draw a new random one on every define)."""
    digest = hashlib.sha256(f"{domain_uuid}/{interface_name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])  # 52:54:00 = QEMU's OUI
