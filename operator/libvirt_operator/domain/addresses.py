"""Keeping guest-visible device addresses across redefinitions.

A freshly rendered domain has no ``<address>`` elements: libvirt assigns PCI
slots at define time, in its own order, so redefining after a spec change
moves existing disks and NICs (and renames NICs in the guest, whose
predictable names come from the PCI slot). Before redefining, carry the
stored definition's addresses over to the desired one.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.devices.base import USER_ALIAS_PREFIX
from libvirt_operator.domain.devices.controller import Controller


def carry_over_addresses(desired: DomainConfig, current: DomainConfig) -> int:
    """Gives the devices of ``desired`` the addresses that ``current`` (libvirt's
    stored XML) has for the devices with the same ``ua-`` alias, and takes over
    current's PCI controllers (their indexes are the buses those addresses
    name), adding root ports when desired asks for more. Returns the number of
    device addresses copied. Nothing is carried across a machine family change
    (i440fx <-> q35). The config hash is unaffected: it was taken at rendering."""
    if desired.devices is None or current.devices is None or _q35(desired) != _q35(current):
        return 0
    stored_by_alias = {alias: el for el in current.devices.element if (alias := _user_alias(el))}
    copied = 0
    for element in desired.devices.element:
        source = stored_by_alias.get(_user_alias(element) or "")
        address = None if source is None or source.tag != element.tag else source.find("address")
        if address is not None and element.find("address") is None:
            element.append(copy.deepcopy(address))
            copied += 1
    _take_over_pci_controllers(desired, current)
    return copied


def _take_over_pci_controllers(desired: DomainConfig, current: DomainConfig) -> None:
    stored = [c for c in current.devices.controllers if c.type == "pci"]
    if not stored:
        return
    wanted = [c for c in desired.devices.controllers if c.type == "pci"]
    extra_ports = _root_ports(wanted) - _root_ports(stored)
    for controller in wanted:
        desired.devices.controllers.remove(controller)
    for controller in stored:
        desired.devices.controllers.append(Controller(copy.deepcopy(controller.element)))
    next_index = max(c.index for c in stored) + 1
    for index in range(next_index, next_index + max(extra_ports, 0)):
        desired.devices.controllers.append(Controller(type="pci", index=index, model="pcie-root-port"))


def _root_ports(controllers: list[Controller]) -> int:
    return sum(1 for c in controllers if c.model == "pcie-root-port")


def _q35(domain: DomainConfig) -> bool:
    machine = (domain.os.machine if domain.os is not None else None) or ""
    return "q35" in machine


def _user_alias(element: ET.Element) -> str | None:
    alias = element.find("alias")
    name = None if alias is None else alias.get("name")
    return name if name and name.startswith(USER_ALIAS_PREFIX) else None
