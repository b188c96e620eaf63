import re

from libvirt_operator.domain import default_domain_name
from libvirt_operator.domain.naming import (
    disk_alias,
    disk_name_from_alias,
    generated_mac,
    nic_alias,
    nic_name_from_alias,
)


def test_domain_name():
    assert default_domain_name("team-a", "web-1") == "team-a_web-1"


def test_aliases_round_trip():
    assert disk_alias("root") == "ua-disk-root" and disk_name_from_alias("ua-disk-root") == "root"
    assert nic_alias("eth0") == "ua-nic-eth0" and nic_name_from_alias("ua-nic-eth0") == "eth0"
    assert disk_name_from_alias("ua-nic-eth0") is None and disk_name_from_alias("virtio-disk0") is None
    assert nic_name_from_alias(None) is None


def test_generated_mac_is_stable_local_and_distinct():
    uuid = "0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c01"
    mac = generated_mac(uuid, "eth0")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    assert generated_mac(uuid, "eth0") == mac
    assert generated_mac(uuid, "eth1") != mac
    assert generated_mac("0b8d5c1e-52a4-4c55-9d7e-1f0d2a3b4c02", "eth0") != mac
