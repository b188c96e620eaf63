"""The test guest image (kernel + initramfs) built by hack/build-guest.sh."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "build-guest.sh"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    cmdline: str
    ready_marker: str  # printed once on the serial console per boot


def ensure_guest_image() -> GuestImage:
    """Builds the guest image if its inputs changed (seconds), else returns the cached one."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{result.stderr[-3000:]}")
    image_dir = Path(result.stdout.strip().splitlines()[-1])
    return GuestImage(
        kernel=image_dir / "vmlinux",  # ELF, booted through PVH
        initrd=image_dir / "initrd.img",
        cmdline=(image_dir / "cmdline").read_text().strip(),
        ready_marker=(image_dir / "ready-marker").read_text().strip(),
    )


def guest_domain_xml(
    image: GuestImage,
    name: str,
    console_log: Path,
    *,
    memory_mib: int = 256,
    vcpus: int = 1,
    disk: Path | None = None,
    nic: bool = False,
) -> str:
    """A minimal TCG domain that direct-boots the test guest.

    The serial console goes to ``console_log`` (appended, so it survives reboots
    and migration: wait on it with :func:`wait_for_marker`); the guest agent
    channel and ACPI are present; ``disk`` (qcow2) becomes ``vda``; ``nic`` adds
    a virtio NIC on QEMU's user-mode network (no host network setup needed).
    """
    disk_xml = (
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
        if disk
        else ""
    )
    nic_xml = "\n    <interface type='user'><model type='virtio'/></interface>" if nic else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{image.cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <devices>{disk_xml}{nic_xml}
    <serial type='file'>
      <source path='{console_log}' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


def wait_for_marker(console_log: Path, marker: str, timeout: float = 120.0, count: int = 1) -> float:
    """Waits until ``marker`` appears ``count`` times in the console log; returns
    the seconds waited. Raises TimeoutError with the log's tail otherwise."""
    start = time.monotonic()
    while True:
        try:
            text = Path(console_log).read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if text.count(marker) >= count:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(
                f"{marker!r} seen {text.count(marker)}/{count} times in {console_log} "
                f"after {timeout:.0f} s; tail: {text[-500:]!r}"
            )
        time.sleep(0.05)


def agent_ping(dom: libvirt.virDomain, timeout: int = 10) -> dict:
    """guest-ping through libvirt's agent channel; returns the agent's reply."""
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-ping"}', timeout, 0))


def wait_for_shutoff(dom: libvirt.virDomain, timeout: float = 60.0) -> int:
    """Waits until a persistent domain is shut off; returns the VIR_DOMAIN_SHUTOFF_* reason."""
    deadline = time.monotonic() + timeout
    while True:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return reason
        if time.monotonic() > deadline:
            raise TimeoutError(f"domain {dom.name()} still in state {state} after {timeout:.0f} s")
        time.sleep(0.05)
