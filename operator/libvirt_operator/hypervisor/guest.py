"""Guest: one libvirt domain, every operation async (the blocking call runs in a thread)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import libvirt
import libvirt_qemu

from libvirt_operator.domain import cpuset
from libvirt_operator.domain.metadata import NAMESPACE as METADATA_NAMESPACE
from libvirt_operator.domain.metadata import PREFIX as METADATA_KEY
from libvirt_operator.hypervisor import readxml
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.migration import MigrationMixin
from libvirt_operator.hypervisor.readxml import DiskSource
from libvirt_operator.hypervisor.snapshots import SnapshotMixin
from libvirt_operator.hypervisor.states import PowerState, power_state
from libvirt_operator.hypervisor.tuning import TuningMixin

if TYPE_CHECKING:
    from libvirt_operator.hypervisor.host import Host

T = TypeVar("T")
PowerMode = Literal["acpi", "agent"]

_SHUTDOWN_FLAGS = {"acpi": libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
                   "agent": libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT}
_REBOOT_FLAGS = {"acpi": libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN,
                 "agent": libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT}
# Undefine must not be blocked by what the domain left behind.
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
_PING = '{"execute":"guest-ping"}'
_AGENT_TIMEOUT = 10  # seconds libvirt waits for one guest-agent reply
_EXEC_POLL = 0.1  # seconds between guest-exec-status polls
_FILE_CHUNK = 1 << 20  # bytes per guest-file-read


def _flag(table: dict[str, int], mode: str) -> int:
    if mode not in table:
        raise ValueError(f"mode must be one of {sorted(table)}, not {mode!r}")
    return table[mode]


def _affect(live: bool, config: bool) -> int:
    """VIR_DOMAIN_AFFECT_* flags (the same bits as DEVICE_MODIFY_*, VCPU_*, MEM_*)."""
    if not (live or config):
        raise ValueError("affect the live domain, its persistent config, or both")
    return (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)


def _agent(dom: libvirt.virDomain, command: str, **arguments: Any) -> Any:
    """One guest-agent command (blocking); its "return" value."""
    message = {"execute": command, **({"arguments": arguments} if arguments else {})}
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), _AGENT_TIMEOUT, 0))["return"]


def _host_cpus(dom: libvirt.virDomain) -> int:
    """The length of a cpumap on this domain's host (its highest CPU number + 1)."""
    return dom.connect().getCPUMap(0)[0]


def _cpumap(cpus: str, host_cpus: int) -> tuple[bool, ...]:
    try:
        return cpuset.to_cpumap(cpus, host_cpus)
    except ValueError as err:
        raise HypervisorError("InvalidCpuset", str(err)) from err


@dataclass(frozen=True)
class ExecResult:
    exit_code: int  # -1 when the agent reports no exit code (e.g. killed by a signal)
    stdout: str
    stderr: str


class Guest(TuningMixin, SnapshotMixin, MigrationMixin):
    """A domain on a Host. It survives reconnects: after one, the next call looks the
    domain up again by UUID on the new connection."""

    def __init__(self, host: Host, dom: libvirt.virDomain):
        self._host = host
        self._dom = dom
        # Both are cached in the virDomain object: reading them makes no RPC.
        self._uuid = dom.UUIDString()
        self._name = dom.name()

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"Guest({self._name!r}, {self._uuid})"

    def domain(self) -> libvirt.virDomain:
        """The virDomain on the current connection (blocking if it must be looked up again:
        call it from inside Host.run). For calls this class does not wrap."""
        conn = self._host.connection_for(self._uuid)
        if self._dom.connect() is not conn:
            self._dom = conn.lookupByUUIDString(self._uuid)
        return self._dom

    async def call(self, fn: Callable[[libvirt.virDomain], T], fallback: str = "LibvirtError") -> T:
        """Runs fn(virDomain) in a thread; libvirt errors become HypervisorError."""
        return await self._host.run(lambda: fn(self.domain()), fallback=fallback)

    # -- reading ---------------------------------------------------------------------------

    async def state(self) -> PowerState:
        state, reason = await self.call(lambda d: d.state())
        return power_state(state, reason)

    async def xml(self, inactive: bool = False, migratable: bool = False) -> str:
        flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
            libvirt.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0)
        return await self.call(lambda d: d.XMLDesc(flags))

    async def disk_sources(self) -> list[DiskSource]:
        return readxml.disk_sources(await self.xml())

    async def agent_connected(self) -> bool:
        """True when libvirt sees qemu-ga on the channel (live XML state='connected')."""
        return readxml.agent_channel_state(await self.xml()) == "connected"

    async def agent_ping(self, timeout: int = 5) -> bool:
        """guest-ping through the agent: False when the agent is not configured, not
        connected or does not answer within `timeout` seconds; other errors raise."""
        try:
            await self.call(lambda d: libvirt_qemu.qemuAgentCommand(d, _PING, timeout, 0))
        except HypervisorError as err:
            if err.reason == "GuestAgentUnavailable":
                return False
            raise
        return True

    # -- power -----------------------------------------------------------------------------

    async def start(self, paused: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        await self.call(lambda d: d.createWithFlags(flags), fallback="StartFailed")

    async def shutdown(self, mode: PowerMode) -> None:
        """Asks the guest to power off (ACPI power button or qemu-ga); returns at once:
        wait for the lifecycle STOPPED event."""
        flags = _flag(_SHUTDOWN_FLAGS, mode)
        await self.call(lambda d: d.shutdownFlags(flags), fallback="ShutdownFailed")

    async def reboot(self, mode: PowerMode) -> None:
        flags = _flag(_REBOOT_FLAGS, mode)
        await self.call(lambda d: d.reboot(flags), fallback="RebootFailed")

    async def destroy(self, graceful: bool = False) -> None:
        """Kills QEMU; graceful only sends SIGTERM and fails if QEMU does not exit."""
        flags = libvirt.VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0
        await self.call(lambda d: d.destroyFlags(flags), fallback="DestroyFailed")

    async def reset(self) -> None:
        await self.call(lambda d: d.reset(0), fallback="ResetFailed")

    async def suspend(self) -> None:
        await self.call(lambda d: d.suspend(), fallback="SuspendFailed")

    async def resume(self) -> None:
        await self.call(lambda d: d.resume(), fallback="ResumeFailed")

    async def undefine(self) -> None:
        """Removes the persistent definition (a running domain keeps running, transient)."""
        await self.call(lambda d: d.undefineFlags(_UNDEFINE_FLAGS), fallback="UndefineFailed")

    # -- live updates ----------------------------------------------------------------------

    async def attach_device(self, xml: str, *, live: bool = True, config: bool = False) -> None:
        """Hot-plugs (live) and/or adds to the definition (config) the device `xml`."""
        flags = _affect(live, config)
        await self.call(lambda d: d.attachDeviceFlags(xml, flags), fallback="AttachFailed")

    async def detach_device(self, xml: str, *, live: bool = True, config: bool = False) -> None:
        """Asks to unplug the device `xml`; a live unplug is confirmed by a device-removed event."""
        flags = _affect(live, config)
        await self.call(lambda d: d.detachDeviceFlags(xml, flags), fallback="DetachFailed")

    async def detach_device_alias(self, alias: str, *, live: bool = True, config: bool = False) -> None:
        """Asks to unplug the device named `alias` (ua-...); confirmed by a device-removed event."""
        flags = _affect(live, config)
        await self.call(lambda d: d.detachDeviceAlias(alias, flags), fallback="DetachFailed")

    async def update_device(self, xml: str, *, live: bool = True, config: bool = False, force: bool = False) -> None:
        """Changes a device in place (CD-ROM media: insert, change, eject); force opens a locked tray."""
        flags = _affect(live, config) | (libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE if force else 0)
        await self.call(lambda d: d.updateDeviceFlags(xml, flags), fallback="UpdateDeviceFailed")

    async def set_vcpus(self, count: int, *, live: bool = True, config: bool = False) -> None:
        """Sets the number of enabled vCPUs (hot-add/unplug when live)."""
        flags = _affect(live, config)
        await self.call(lambda d: d.setVcpusFlags(count, flags), fallback="SetVcpusFailed")

    async def set_guest_vcpus(self, count: int) -> None:
        """Onlines/offlines vCPUs inside the guest through qemu-ga (no unplug: QEMU 7.2 cannot report one)."""
        await self.call(lambda d: d.setVcpusFlags(count, libvirt.VIR_DOMAIN_VCPU_GUEST), fallback="SetVcpusFailed")

    async def pin_vcpu(self, vcpu: int, cpus: str, *, live: bool = True, config: bool = False) -> None:
        """Pins vCPU `vcpu` to the host CPUs of cpuset `cpus` ("0-1,3"); InvalidCpuset if the host lacks one."""
        flags = _affect(live, config)
        await self.call(lambda d: d.pinVcpuFlags(vcpu, _cpumap(cpus, _host_cpus(d)), flags),
                        fallback="PinVcpuFailed")

    async def pin_emulator(self, cpus: str, *, live: bool = True, config: bool = False) -> None:
        """Pins QEMU's emulator threads to the host CPUs of cpuset `cpus`."""
        flags = _affect(live, config)
        await self.call(lambda d: d.pinEmulator(_cpumap(cpus, _host_cpus(d)), flags), fallback="PinEmulatorFailed")

    async def vcpu_pins(self) -> dict[int, str]:
        """Live pinning of every vCPU up to the maximum (offline ones too), as canonical cpusets."""
        maps = await self.call(lambda d: d.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE))
        return {vcpu: cpuset.from_cpumap(cpumap) for vcpu, cpumap in enumerate(maps)}

    async def emulator_pin(self) -> str:
        """Live pinning of the emulator threads as a canonical cpuset."""
        return cpuset.from_cpumap(await self.call(lambda d: d.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)))

    async def set_memory(self, kib: int, *, live: bool = True, config: bool = False) -> None:
        """Sets the balloon target (current memory) in KiB."""
        flags = _affect(live, config)
        await self.call(lambda d: d.setMemoryFlags(kib, flags), fallback="SetMemoryFailed")

    async def block_resize(self, target: str, size_bytes: int) -> None:
        """Grows disk `target` (vdb, sda, ...) to size_bytes; ShrinkRefused below its current capacity."""
        def grow(d: libvirt.virDomain) -> None:
            capacity = d.blockInfo(target, 0)[0]
            if size_bytes < capacity:
                raise HypervisorError("ShrinkRefused", f"{target}: {size_bytes} bytes is below its {capacity}")
            d.blockResize(target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

        await self.call(grow, fallback="BlockResizeFailed")

    async def block_info(self, target: str) -> tuple[int, int, int]:
        """(capacity, allocation, physical) of disk `target`, in bytes."""
        capacity, allocation, physical = await self.call(lambda d: d.blockInfo(target, 0), fallback="BlockInfoFailed")
        return capacity, allocation, physical

    async def set_operator_metadata(self, xml: str, *, live: bool = True, config: bool = False) -> None:
        """Replaces the operator's <metadata> element (OperatorMetadata.to_api_xml())."""
        flags = _affect(live, config)
        await self.call(lambda d: d.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, METADATA_KEY,
                                                METADATA_NAMESPACE, flags), fallback="SetMetadataFailed")

    async def operator_metadata(self, live: bool = True) -> str | None:
        """The operator's element without namespace (for OperatorMetadata.from_api_xml), live or
        persistent (live on a shut-off domain fails OperationInvalid); None when absent."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG

        def read(d: libvirt.virDomain) -> str | None:
            try:
                return d.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, flags)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        return await self.call(read)

    # -- inside the guest (qemu-ga) --------------------------------------------------------

    async def guest_exec(self, argv: list[str], timeout: float = 30) -> ExecResult:
        """Runs argv in the guest through qemu-ga and waits for it (GuestExecTimeout after `timeout` s)."""
        started = await self.call(lambda d: _agent(d, "guest-exec", path=argv[0], arg=argv[1:],
                                                   **{"capture-output": True}), fallback="GuestExecFailed")
        deadline = time.monotonic() + timeout
        while True:
            status = await self.call(lambda d: _agent(d, "guest-exec-status", pid=started["pid"]),
                                     fallback="GuestExecFailed")
            if status["exited"]:
                return ExecResult(status.get("exitcode", -1), _b64text(status.get("out-data")),
                                  _b64text(status.get("err-data")))
            if time.monotonic() > deadline:
                raise HypervisorError("GuestExecTimeout", f"{argv} still running in the guest after {timeout} s")
            await asyncio.sleep(_EXEC_POLL)

    async def guest_read_file(self, path: str) -> bytes:
        """The whole content of file `path` in the guest, through qemu-ga guest-file-*."""
        def read(d: libvirt.virDomain) -> bytes:
            handle = _agent(d, "guest-file-open", path=path, mode="r")
            try:
                chunks = []
                while True:
                    chunk = _agent(d, "guest-file-read", handle=handle, count=_FILE_CHUNK)
                    chunks.append(base64.b64decode(chunk.get("buf-b64", "")))
                    if chunk.get("eof") or not chunk.get("count"):
                        return b"".join(chunks)
            finally:
                _agent(d, "guest-file-close", handle=handle)

        return await self.call(read, fallback="GuestFileFailed")


def _b64text(data: str | None) -> str:
    return base64.b64decode(data or "").decode(errors="replace")
