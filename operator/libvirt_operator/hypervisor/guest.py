"""Guest: one libvirt domain, every operation async (the blocking call runs in a thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

import libvirt
import libvirt_qemu

from libvirt_operator.hypervisor import readxml
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.readxml import DiskSource
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


def _flag(table: dict[str, int], mode: str) -> int:
    if mode not in table:
        raise ValueError(f"mode must be one of {sorted(table)}, not {mode!r}")
    return table[mode]


class Guest(TuningMixin):
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
        conn = self._host.connection()
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
