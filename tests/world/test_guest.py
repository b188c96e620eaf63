"""The test guest under TCG on a real libvirtd: boot, ACPI and agent power actions."""

import stat
import subprocess
import time
import uuid

import libvirt
import pytest

from localenv.fixtures_libvirt import agent_ping, wait_for_marker, wait_for_shutoff
from localenv.guest import BUILD_SCRIPT

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 120.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def booted(start_guest, libvirt_nodes, guest_image):
    """A guest on node-a that has printed its ready marker."""
    dom, console_log = start_guest(libvirt_nodes[0], unique("guest"))
    waited = wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    print(f"\nTIMING boot to marker: {waited:.2f} s")
    return dom, console_log


def test_guest_image_is_cached_and_world_readable(guest_image):
    for path in (guest_image.kernel, guest_image.initrd):
        assert path.stat().st_size > 1_000_000
        assert path.stat().st_mode & stat.S_IROTH
    assert "console=ttyS0" in guest_image.cmdline.split()
    started = time.monotonic()
    again = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=True)
    print(f"\nTIMING image build (warm): {time.monotonic() - started:.2f} s")
    assert again.stdout.strip() == str(guest_image.kernel.parent)
    assert "cached image" in again.stderr


def test_guest_boots_to_ready_marker_once(booted, guest_image):
    dom, console_log = booted
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert console_log.read_text().count(guest_image.ready_marker) == 1


def test_guest_agent_answers_ping(booted):
    dom, _ = booted
    assert agent_ping(dom) == {"return": {}}


def test_guest_brings_up_loopback_and_its_virtio_nic(start_guest, libvirt_nodes, guest_image):
    dom, console_log = start_guest(libvirt_nodes[0], unique("nic"), nic=True)
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    deadline = time.monotonic() + 20
    while True:  # an IPv6 link-local address appears once the link is up (after DAD)
        ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
        nics = {name: [a["addr"] for a in i["addrs"] or []] for name, i in ifaces.items() if name != "lo"}
        if any(a.startswith("fe80:") for addrs in nics.values() for a in addrs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "127.0.0.1" in [a["addr"] for a in ifaces["lo"]["addrs"]]
    assert len(nics) == 1, nics
    assert any(a.startswith("fe80:") for a in next(iter(nics.values()))), nics


def test_acpi_power_button_powers_guest_off(booted):
    dom, _ = booted
    started = time.monotonic()
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    reason = wait_for_shutoff(dom)
    print(f"\nTIMING ACPI shutdown: {time.monotonic() - started:.2f} s")
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN  # the guest powered off itself


def test_guest_agent_shutdown_powers_guest_off(booted):
    dom, _ = booted
    started = time.monotonic()
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    reason = wait_for_shutoff(dom)
    print(f"\nTIMING agent shutdown: {time.monotonic() - started:.2f} s")
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN


def test_guest_agent_reboot_comes_back_to_marker(booted, guest_image):
    dom, console_log = booted
    domain_id = dom.ID()
    started = time.monotonic()
    dom.reboot(libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT)
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT, count=2)
    print(f"\nTIMING agent reboot to marker: {time.monotonic() - started:.2f} s")
    assert dom.ID() == domain_id  # same QEMU process: a guest reboot, not a restart
    assert agent_ping(dom) == {"return": {}}
