"""Power verbs: start, shutdown, destroy, reboot, reset, suspend, resume, restart.

A VM that stopped on its own (status.haltedGeneration == metadata.generation) stays stopped
until its spec changes, and its powerState already says Running; `start` then records the
stop in the spec and asks for Running again (two patches, each guarded by the generation
it read), which is what a user would do by hand.
"""

from __future__ import annotations

import argparse
from typing import Any

from libvirt_operator.cli.outcomes import power_reached, request_done
from libvirt_operator.cli.plan import PatchVM, Plan, Refused, arg, generation, new_request_id, spec_ops, verb
from libvirt_operator.cli.vmread import halted, power_state, spec, state_reason

GRACEFUL_MODES = ("acpi", "agent")
MODE_HELP = "acpi (power button) or agent (qemu-guest-agent)"
REQUEST_ID = arg("--id", dest="request_id", help="request id (default: a new one)")


@verb("start", "start the VM (powerState: Running)")
def start(vm: dict, _args: argparse.Namespace) -> Plan:
    name, power = vm["metadata"]["name"], power_state(vm)
    if power == "Paused":
        raise Refused(f"{name} is paused (powerState: Paused): use 'kubectl virsh resume {name}'")
    if power == "Running" and halted(vm):
        reason, _ = state_reason(vm)
        gen = generation(vm)
        return Plan(
            f"{name}: start requested (it had stopped on its own: {reason})",
            actions=[PatchVM(spec_ops(vm, powerState="Stopped")),
                     PatchVM([{"op": "test", "path": "/metadata/generation", "value": gen + 1},
                              {"op": "add", "path": "/spec/powerState", "value": "Running"}])],
            check=power_reached("Running"),
            note=f"{name} stopped on its own at generation {gen} and stays stopped until its spec changes: "
                 "setting powerState Stopped, then Running",
        )
    if power == "Running":
        return Plan(f"{name}: powerState is already Running", check=power_reached("Running"))
    return Plan(f"{name}: start requested", actions=[PatchVM(spec_ops(vm, powerState="Running"))],
                check=power_reached("Running"))


def _stop(vm: dict, wanted: str, what: str) -> Plan:
    name, power = vm["metadata"]["name"], power_state(vm)
    shutdown = dict(spec(vm).get("shutdown") or {})
    if power == "Stopped" and shutdown.get("mode", "acpi") == wanted:
        return Plan(f"{name}: powerState is already Stopped (shutdown.mode {wanted})", check=power_reached("Stopped"))
    shutdown["mode"] = wanted
    return Plan(f"{name}: {what} requested", actions=[PatchVM(spec_ops(vm, powerState="Stopped", shutdown=shutdown))],
                check=power_reached("Stopped"))


@verb("shutdown", "shut the guest down gracefully (powerState: Stopped)",
      arg("--mode", choices=GRACEFUL_MODES, help=MODE_HELP + "; default: the spec's graceful mode, else acpi"))
def shutdown(vm: dict, args: argparse.Namespace) -> Plan:
    current = (spec(vm).get("shutdown") or {}).get("mode", "acpi")
    wanted = args.mode or (current if current in GRACEFUL_MODES else "acpi")
    return _stop(vm, wanted, f"{wanted} shutdown")


@verb("destroy", "power the VM off at once (powerState: Stopped, shutdown.mode: force)")
def destroy(vm: dict, _args: argparse.Namespace) -> Plan:
    return _stop(vm, "force", "forced power-off")


@verb("suspend", "pause the vCPUs (powerState: Paused)")
def suspend(vm: dict, _args: argparse.Namespace) -> Plan:
    name, power = vm["metadata"]["name"], power_state(vm)
    if power == "Paused":
        return Plan(f"{name}: powerState is already Paused", check=power_reached("Paused"))
    if power != "Running":
        raise Refused(f"{name} is not running (powerState: {power}): nothing to suspend")
    return Plan(f"{name}: suspend requested", actions=[PatchVM(spec_ops(vm, powerState="Paused"))],
                check=power_reached("Paused"))


@verb("resume", "resume the vCPUs (powerState: Running)")
def resume(vm: dict, _args: argparse.Namespace) -> Plan:
    name, power = vm["metadata"]["name"], power_state(vm)
    if power != "Paused":
        raise Refused(f"{name} is not paused (powerState: {power})")
    return Plan(f"{name}: resume requested", actions=[PatchVM(spec_ops(vm, powerState="Running"))],
                check=power_reached("Running"))


def _one_shot(vm: dict, field: str, status_field: str, what: str, body: dict[str, Any]) -> Plan:
    return Plan(f"{vm['metadata']['name']}: {what} requested (id {body['id']})",
                actions=[PatchVM({"spec": {field: body}})], check=request_done(status_field, body["id"]))


@verb("reboot", "reboot the guest once (spec.reboot with a new id)",
      arg("--mode", choices=GRACEFUL_MODES, help=MODE_HELP + "; default: acpi"), REQUEST_ID)
def reboot(vm: dict, args: argparse.Namespace) -> Plan:
    mode = args.mode or "acpi"
    return _one_shot(vm, "reboot", "lastReboot", f"{mode} reboot",
                     {"id": args.request_id or new_request_id(), "mode": mode})


@verb("reset", "hard-reset the VM once (spec.reset with a new id)", REQUEST_ID)
def reset(vm: dict, args: argparse.Namespace) -> Plan:
    return _one_shot(vm, "reset", "lastReset", "reset", {"id": args.request_id or new_request_id()})


@verb("restart", "restart the VM once, cold (shutdown per spec.shutdown, then start: spec.restart with a new "
      "id), which applies the changes that need a restart", REQUEST_ID)
def restart(vm: dict, args: argparse.Namespace) -> Plan:
    name, power = vm["metadata"]["name"], power_state(vm)
    if power == "Stopped":
        raise Refused(f"{name} is not running (powerState: Stopped): its changes apply when it starts "
                      f"('kubectl virsh start {name}')")
    if power == "Paused":
        raise Refused(f"{name} is paused (powerState: Paused): resume it first ('kubectl virsh resume {name}')")
    pending = (vm.get("status") or {}).get("pendingRestart") or []
    plan = _one_shot(vm, "restart", "lastRestart", "restart", {"id": args.request_id or new_request_id()})
    if pending:
        plan.note = f"{name}: the restart applies {', '.join(pending)}"
    return plan
