"""parse -> serialize of XML that libvirt 9.0 printed loses and changes nothing."""

import pytest
from domain_samples import NAMES, same_xml, sample

from libvirt_operator.domain import DomainConfig


def test_samples_are_present():
    assert {"running", "running-inactive", "kernel-boot", "firmware-disks", "hotplug-kvm", "uefi",
            "interfaces", "extras"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_lossless(name):
    text = sample(name)
    assert same_xml(DomainConfig.from_xml(text).to_xml(), text)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_stable(name):
    once = DomainConfig.from_xml(sample(name)).to_xml()
    assert DomainConfig.from_xml(once).to_xml() == once


def test_foreign_namespaces_keep_their_prefixes():
    out = DomainConfig.from_xml(sample("extras")).to_xml()
    assert "<qemu:commandline>" in out and "<other:note" in out and "<lvo:vm" in out
