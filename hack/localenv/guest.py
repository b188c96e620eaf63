"""The test guest image (kernel + initramfs) built by hack/build-guest.sh."""

from __future__ import annotations

import base64
import json
import re
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


# -- proofs from inside the guest and from the host (independent of the operator's code) ---------


@dataclass(frozen=True)
class GuestExec:
    exit_code: int
    stdout: str
    stderr: str


def _agent(dom: libvirt.virDomain, command: str, arguments: dict | None = None, timeout: int = 10):
    message = {"execute": command, **({"arguments": arguments} if arguments else {})}
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), timeout, 0))["return"]


def guest_exec(dom: libvirt.virDomain, argv: list[str], timeout: float = 30.0) -> GuestExec:
    """Runs argv in the guest through qemu-ga guest-exec and waits for its exit."""
    pid = _agent(dom, "guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = _agent(dom, "guest-exec-status", {"pid": pid})
        if status["exited"]:
            out, err = (base64.b64decode(status.get(key, "")).decode(errors="replace")
                        for key in ("out-data", "err-data"))
            return GuestExec(status.get("exitcode", -1), out, err)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{argv} still running in {dom.name()} after {timeout:.0f} s")
        time.sleep(0.1)


def guest_sh(dom: libvirt.virDomain, script: str, timeout: float = 30.0) -> str:
    """stdout of a shell script run in the guest; AssertionError if it exits non-zero."""
    result = guest_exec(dom, ["/bin/sh", "-c", script], timeout)
    assert result.exit_code == 0, f"guest script {script!r} failed: {result}"
    return result.stdout


def wait_in_guest(dom: libvirt.virDomain, script: str, expect, timeout: float = 60.0) -> str:
    """Runs `script` in the guest until expect(stdout) is true; returns that stdout (TimeoutError with the last
    output otherwise). Failed runs (non-zero exit) count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        result = guest_exec(dom, ["/bin/sh", "-c", script])
        if result.exit_code == 0 and expect(result.stdout):
            return result.stdout
        if time.monotonic() > deadline:
            raise TimeoutError(f"{script!r} in {dom.name()}: last result {result}")
        time.sleep(0.3)


def qemu_processes(needle: bytes) -> list[int]:
    """QEMU processes with `needle` in an argument (libvirt nodes share the host's PID namespace)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(needle in a for a in argv):
            found.append(int(entry.name))
    return found


def qemu_pids(uuid: str) -> list[int]:
    """Every QEMU process of domain `uuid` (its -uuid argument) on this machine."""
    return qemu_processes(uuid.encode())


def qemu_pid(uuid: str) -> int | None:
    """The QEMU process of domain `uuid`, if one runs."""
    pids = qemu_pids(uuid)
    return pids[0] if pids else None


def vcpu_thread_affinity(pid: int) -> dict[int, str]:
    """{vCPU index: Cpus_allowed_list} of QEMU's vCPU threads (named "CPU n/TCG" or "CPU n/KVM")."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread just exited
        name = re.search(r"^Name:\s*(.*)$", status, re.M).group(1)
        vcpu = re.fullmatch(r"CPU (\d+)/(TCG|KVM)", name)
        if vcpu:
            found[int(vcpu.group(1))] = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1)
    return found


def thread_affinity(pid: int) -> str:
    """Cpus_allowed_list of QEMU's main (emulator) thread."""
    return re.search(r"^Cpus_allowed_list:\s*(\S+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)


def make_iso(path: Path, label: str) -> Path:
    """An ISO 9660 image with volume label `label` (genisoimage), holding one small file."""
    path = Path(path)
    content = path.with_suffix(".content")
    content.mkdir(parents=True, exist_ok=True)
    (content / "LABEL.TXT").write_text(label + "\n")
    subprocess.run(["genisoimage", "-quiet", "-V", label, "-o", str(path), str(content)], check=True)
    return path

