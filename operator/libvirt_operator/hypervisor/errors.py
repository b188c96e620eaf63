"""One exception for everything libvirt reports, with a reason a status condition can carry."""

from __future__ import annotations

import libvirt

# Error codes that mean the same thing whatever the operation was.
_REASON_BY_CODE = {
    libvirt.VIR_ERR_NO_DOMAIN: "DomainNotFound",
    libvirt.VIR_ERR_OPERATION_INVALID: "OperationInvalid",
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: "GuestAgentUnavailable",  # not connected, or timed out
    libvirt.VIR_ERR_AGENT_UNSYNCED: "GuestAgentUnavailable",
    libvirt.VIR_ERR_OPERATION_TIMEOUT: "OperationTimeout",
    libvirt.VIR_ERR_NO_CONNECT: "ConnectionLost",
    libvirt.VIR_ERR_INVALID_CONN: "ConnectionLost",
}


class HypervisorError(Exception):
    """A failed hypervisor operation.

    reason: CamelCase, fit for a condition's reason; message: libvirt's own text;
    code: libvirt's error code (0 when the error did not come from libvirt).
    """

    def __init__(self, reason: str, message: str, code: int = 0):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.code = code


def reason_for(err: libvirt.libvirtError, fallback: str = "LibvirtError", connection_alive: bool = True) -> str:
    code = err.get_error_code() or 0
    message = err.get_error_message() or ""
    if not connection_alive:
        return "ConnectionLost"
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "agent is not configured" in message:
        return "GuestAgentUnavailable"  # the domain has no guest-agent channel
    return _REASON_BY_CODE.get(code, fallback)


def translate(err: libvirt.libvirtError, fallback: str = "LibvirtError",
              connection_alive: bool = True) -> HypervisorError:
    """libvirtError -> HypervisorError. `fallback` names the operation's own failure
    (e.g. DefineFailed) for errors without a more specific reason."""
    return HypervisorError(reason_for(err, fallback, connection_alive),
                           err.get_error_message() or str(err), err.get_error_code() or 0)
