from domain_samples import same_xml, sample

from libvirt_operator.domain import DomainConfig
from libvirt_operator.domain.addresses import carry_over_addresses
from libvirt_operator.domain.devices import Controller, Disk


def without_addresses(dom: DomainConfig, keep_controllers_above: int | None = None) -> DomainConfig:
    """A copy with every address (and root-port target) removed from aliased devices and PCI controllers."""
    copy = DomainConfig.from_xml(dom.to_xml())
    for element in list(copy.devices.element):
        is_pci = element.tag == "controller" and element.get("type") == "pci"
        if keep_controllers_above is not None and is_pci and int(element.get("index")) > keep_controllers_above:
            copy.devices.element.remove(element)
            continue
        alias = element.find("alias")
        if is_pci or (alias is not None and alias.get("name", "").startswith("ua-")):
            for child in element.findall("address") + (element.findall("target") if is_pci else []):
                element.remove(child)
    return copy


def controllers_sorted(dom: DomainConfig) -> str:
    """The XML with controllers in (type, index) order: libvirt does not care about their order."""
    copy = DomainConfig.from_xml(dom.to_xml())
    controllers = sorted(copy.devices.controllers, key=lambda c: (c.type, c.index))
    copy.devices.controllers = [Controller(c.element) for c in controllers]
    return copy.to_xml()


def test_addresses_come_back_from_the_stored_definition():
    stored = DomainConfig.from_xml(sample("firmware-disks"))
    desired = without_addresses(stored)
    assert not same_xml(desired.to_xml(), stored.to_xml())
    assert carry_over_addresses(desired, stored) > 0
    assert same_xml(controllers_sorted(desired), controllers_sorted(stored))


def test_controllers_only_libvirt_had_are_added_when_addresses_need_them():
    stored = DomainConfig.from_xml(sample("interfaces"))  # e1000/rtl8139 sit behind libvirt's bridge
    desired = without_addresses(stored, keep_controllers_above=0)
    carry_over_addresses(desired, stored)
    models = [c.model for c in desired.devices.controllers if c.type == "pci"]
    assert "pcie-to-pci-bridge" in models
    bridge = desired.devices.controllers.find(lambda c: c.model == "pcie-to-pci-bridge")
    used = {int(a.get("bus"), 16) for a in desired.devices.element.iter("address") if a.get("type") == "pci"}
    have = {c.index for c in desired.devices.controllers if c.type == "pci"}
    assert used <= have and bridge.index in used


def test_new_devices_are_left_to_libvirt_and_more_root_ports_added():
    stored = DomainConfig.from_xml(sample("firmware-disks"))
    desired = without_addresses(stored)
    desired.devices.disks.append(Disk(type="file", device="disk", source_file="/new", target_dev="vdb",
                                      target_bus="virtio", alias="ua-disk-new"))
    desired.devices.controllers.append(Controller(type="pci", index=99, model="pcie-root-port"))
    carry_over_addresses(desired, stored)
    assert desired.devices.by_alias("ua-disk-new").address_type is None
    stored_indexes = [c.index for c in stored.devices.controllers if c.type == "pci"]
    new_ports = [c for c in desired.devices.controllers if c.type == "pci" and c.index not in stored_indexes]
    assert [(c.index, c.model, c.address_type) for c in new_ports] == [
        (max(stored_indexes) + 1, "pcie-root-port", None)]


def test_the_stored_pci_topology_replaces_the_rendered_one():
    stored = DomainConfig.from_xml(sample("interfaces"))
    desired = without_addresses(stored)
    desired.devices.controllers.remove(desired.devices.controllers.find(lambda c: c.model == "pcie-to-pci-bridge"))
    carry_over_addresses(desired, stored)
    assert same_xml(controllers_sorted(desired), controllers_sorted(stored))


def test_nothing_is_carried_across_machine_families():
    stored = DomainConfig.from_xml(sample("firmware-disks"))
    desired = without_addresses(stored)
    desired.os.machine = "pc"
    assert carry_over_addresses(desired, stored) == 0
    assert carry_over_addresses(DomainConfig(name="a"), stored) == 0
