"""`kubectl virsh`: the virsh verbs of the handbook, as edits of VirtualMachine objects.

kubectl runs any `kubectl-<name>` executable on PATH as `kubectl <name>`; this module is the
`kubectl-virsh` console script. Every verb changes the VM's spec, the one place the operator
takes orders from, and with `--wait` follows the status until the node agent reports the
outcome:

    list                          VMs with node, phase, desired power state, Ready and its reason
    start NAME                    powerState: Running
    shutdown NAME --mode acpi|agent   powerState: Stopped, shutdown.mode: acpi|agent
    destroy NAME                  powerState: Stopped, shutdown.mode: force
    reboot NAME --mode acpi|agent reboot: {id: <new id>, mode}  (one-shot)
    reset NAME                    reset: {id: <new id>}  (one-shot)
    suspend NAME / resume NAME    powerState: Paused / Running

A VM that stopped on its own (status.haltedGeneration == metadata.generation) stays stopped
until its spec changes, and its powerState already says Running; `start` then records the
stop in the spec and asks for Running again (two patches, each guarded by the generation
it read), which is what a user would do by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta

PLURAL = "virtualmachines"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
GRACEFUL_MODES = ("acpi", "agent")


class Refused(Exception):
    """The verb does not apply to the VM as it is (exit status 1, message on stderr)."""


# -- reading a VM --------------------------------------------------------------------------------

def condition(vm: dict, type_: str) -> dict:
    for c in (vm.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def generation(vm: dict) -> int:
    return int(vm["metadata"].get("generation") or 1)


def state_reason(vm: dict) -> tuple[str, str]:
    """Why the VM is in its state: the Failure condition when it is on, else Ready's reason and message."""
    failure = condition(vm, "Failure")
    if failure.get("status") == "True":
        return failure.get("reason", ""), failure.get("message", "")
    ready = condition(vm, "Ready")
    return ready.get("reason", ""), ready.get("message", "")


def halted(vm: dict) -> bool:
    """Stopped on its own at the current generation: the agent keeps it stopped until the spec changes."""
    return (vm.get("status") or {}).get("haltedGeneration") == generation(vm)


# -- plans: what each verb changes, and what outcome it waits for ---------------------------------

@dataclass(frozen=True)
class Result:
    ok: bool
    message: str


# A check looks at the VM as it is now: None while the outcome is not known yet.
Check = Callable[[dict], Result | None]


@dataclass
class Plan:
    summary: str  # what was asked, for the user
    patches: list[list[dict]] = field(default_factory=list)  # JSON patches, applied in order
    merge: dict | None = None  # or one merge patch
    check: Callable[[dict], Check] | None = None  # given the updated VM, the outcome to wait for
    note: str = ""  # said before patching


def _spec_ops(vm: dict, **spec: Any) -> list[dict]:
    """A JSON patch setting spec fields, guarded by the generation the decision was made on."""
    ops: list[dict] = [{"op": "test", "path": "/metadata/generation", "value": generation(vm)}]
    for key, value in spec.items():
        ops.append({"op": "add", "path": f"/spec/{key}", "value": value})
    return ops


def power_reached(phase: str) -> Callable[[dict], Check]:
    """Wait until the agent has acted on the new generation and reports `phase` with Ready True."""

    def for_update(updated: dict) -> Check:
        gen = generation(updated)

        def check(vm: dict) -> Result | None:
            st = vm.get("status") or {}
            if (st.get("observedGeneration") or 0) < gen:
                return None
            failure = condition(vm, "Failure")
            if failure.get("status") == "True":
                return Result(False, f"{failure.get('reason')}: {failure.get('message', '')}")
            if phase != "Stopped" and st.get("haltedGeneration") == gen:
                reason, message = state_reason(vm)
                return Result(False, f"{reason}: {message}")
            if st.get("phase") == phase and condition(vm, "Ready").get("status") == "True":
                node = st.get("nodeName") or (vm["metadata"].get("labels") or {}).get(meta.NODE_LABEL, "?")
                return Result(True, f"{phase} on {node}")
            return None

        return check

    return for_update


def request_done(status_field: str, request_id: str) -> Callable[[dict], Check]:
    """Wait for the one-shot request's outcome in status.lastReboot / status.lastReset."""

    def for_update(_updated: dict) -> Check:
        def check(vm: dict) -> Result | None:
            last = (vm.get("status") or {}).get(status_field) or {}
            if last.get("id") != request_id or last.get("result") == "InProgress":
                return None
            ok = last.get("result") == "Succeeded"
            return Result(ok, f"{last.get('result')}" + (f": {last['message']}" if last.get("message") else ""))

        return check

    return for_update


def new_request_id() -> str:
    return f"kv-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def plan(verb: str, vm: dict, mode: str | None = None, request_id: str | None = None) -> Plan:
    """What `verb` changes on this VM (pure: no API calls)."""
    name = vm["metadata"]["name"]
    spec = vm.get("spec") or {}
    power = spec.get("powerState", "Running")
    current_mode = (spec.get("shutdown") or {}).get("mode", "acpi")
    shutdown = dict(spec.get("shutdown") or {})

    if verb == "start":
        if power == "Paused":
            raise Refused(f"{name} is paused (powerState: Paused): use 'kubectl virsh resume {name}'")
        if power == "Running" and halted(vm):
            reason, _ = state_reason(vm)
            gen = generation(vm)
            return Plan(
                f"{name}: start requested (it had stopped on its own: {reason})",
                patches=[_spec_ops(vm, powerState="Stopped"),
                         [{"op": "test", "path": "/metadata/generation", "value": gen + 1},
                          {"op": "add", "path": "/spec/powerState", "value": "Running"}]],
                check=power_reached("Running"),
                note=f"{name} stopped on its own at generation {gen} and stays stopped until its spec changes: "
                     "setting powerState Stopped, then Running",
            )
        if power == "Running":
            return Plan(f"{name}: powerState is already Running", check=power_reached("Running"))
        return Plan(f"{name}: start requested", patches=[_spec_ops(vm, powerState="Running")],
                    check=power_reached("Running"))

    if verb in ("shutdown", "destroy"):
        wanted = "force" if verb == "destroy" else (mode or (current_mode if current_mode in GRACEFUL_MODES
                                                                else "acpi"))
        if power == "Stopped" and current_mode == wanted:
            return Plan(f"{name}: powerState is already Stopped (shutdown.mode {wanted})",
                        check=power_reached("Stopped"))
        shutdown["mode"] = wanted
        what = "forced power-off" if verb == "destroy" else f"{wanted} shutdown"
        return Plan(f"{name}: {what} requested", patches=[_spec_ops(vm, powerState="Stopped", shutdown=shutdown)],
                    check=power_reached("Stopped"))

    if verb == "suspend":
        if power == "Paused":
            return Plan(f"{name}: powerState is already Paused", check=power_reached("Paused"))
        if power != "Running":
            raise Refused(f"{name} is not running (powerState: {power}): nothing to suspend")
        return Plan(f"{name}: suspend requested", patches=[_spec_ops(vm, powerState="Paused")],
                    check=power_reached("Paused"))

    if verb == "resume":
        if power != "Paused":
            raise Refused(f"{name} is not paused (powerState: {power})")
        return Plan(f"{name}: resume requested", patches=[_spec_ops(vm, powerState="Running")],
                    check=power_reached("Running"))

    if verb in ("reboot", "reset"):
        rid = request_id or new_request_id()
        body: dict[str, Any] = {"id": rid}
        if verb == "reboot":
            body["mode"] = mode or "acpi"
        what = f"{body['mode']} reboot" if verb == "reboot" else "reset"
        status_field = "lastReboot" if verb == "reboot" else "lastReset"
        return Plan(f"{name}: {what} requested (id {rid})", merge={"spec": {verb: body}},
                    check=request_done(status_field, rid))

    raise ValueError(f"unknown verb {verb!r}")


# -- the API -------------------------------------------------------------------------------------

class VMClient:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def get(self, name: str) -> dict:
        try:
            return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                raise Refused(f'virtualmachine "{name}" not found in namespace "{self.namespace}"') from None
            raise

    def list(self, all_namespaces: bool) -> list[dict]:
        if all_namespaces:
            res = self.api.list_cluster_custom_object(meta.GROUP, meta.VERSION, PLURAL)
        else:
            res = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, PLURAL)
        return res.get("items", [])

    def patch(self, name: str, body: Any, content_type: str) -> dict:
        try:
            return self.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, PLURAL, name,
                                                           body, _content_type=content_type)
        except ApiException as exc:
            if exc.status == 422 and content_type == JSON_PATCH and "test" in _api_message(exc).lower():
                raise Refused(f"{name} changed while this command ran; run it again") from None
            raise

    def apply(self, name: str, p: Plan) -> dict | None:
        updated = None
        for ops in p.patches:
            updated = self.patch(name, ops, JSON_PATCH)
        if p.merge is not None:
            updated = self.patch(name, p.merge, MERGE_PATCH)
        return updated


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or exc)


def connect(kubeconfig: str | None, context: str | None) -> tuple[client.ApiClient, str]:
    """An ApiClient and the default namespace, as kubectl finds them: --kubeconfig, else KUBECONFIG,
    else ~/.kube/config; in a pod without either, the service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not (kubeconfig or os.environ.get("KUBECONFIG")) and not os.path.exists(path) and \
            os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else "default"
    api_client = config.new_client_from_config(config_file=path, context=context)
    contexts, active = config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    ns = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return api_client, ns


# -- output --------------------------------------------------------------------------------------

def table(vms: list[dict], all_namespaces: bool, wide: bool) -> str:
    header = ["NAME", "NODE", "PHASE", "DESIRED", "READY", "REASON"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    if wide:
        header.append("MESSAGE")
    rows = [header]
    for vm in sorted(vms, key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"])):
        md, st = vm["metadata"], vm.get("status") or {}
        node = st.get("nodeName") or (md.get("labels") or {}).get(meta.NODE_LABEL) or "-"
        reason, message = state_reason(vm)
        row = [md["name"], node, st.get("phase") or "-", (vm.get("spec") or {}).get("powerState", "Running"),
               condition(vm, "Ready").get("status", "Unknown"), reason or "-"]
        if all_namespaces:
            row.insert(0, md["namespace"])
        if wide:
            row.append(message or "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def describe(vm: dict) -> str:
    """One line: phase, and why (reason: message)."""
    reason, message = state_reason(vm)
    line = (vm.get("status") or {}).get("phase") or "no status yet"
    if reason:
        line += f" ({reason}: {message})" if message else f" ({reason})"
    return line


def wait(vms: VMClient, name: str, check: Check, timeout: float, interval: float = 0.5) -> Result:
    """Poll the VM until `check` decides; progress goes to stderr as the phase or reason changes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        vm = vms.get(name)
        outcome = check(vm)
        if outcome is not None:
            return outcome
        now = describe(vm)
        if now != last:
            print(f"  {name}: {now}", file=sys.stderr)
            last = now
        if time.monotonic() >= deadline:
            return Result(False, f"timed out after {timeout:g}s; last seen: {now}")
        time.sleep(interval)


# -- command line --------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    # Connection flags work before or after the verb, as with kubectl; the subparsers'
    # copies default to SUPPRESS so that they never overwrite a value given before the verb.
    def connection_flags(p: argparse.ArgumentParser, top: bool) -> None:
        d = (lambda v: v) if top else (lambda _v: argparse.SUPPRESS)
        p.add_argument("--kubeconfig", default=d(None), help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
        p.add_argument("--context", default=d(None), help="kubeconfig context")
        p.add_argument("-n", "--namespace", default=d(None), help="namespace (default: the context's, else default)")

    top = argparse.ArgumentParser(
        prog="kubectl virsh", description="virsh verbs for libvirt-operator VirtualMachines: each one edits the "
        "VM's spec; --wait follows its status until the node agent reports the outcome.")
    connection_flags(top, True)
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_: str, modes: bool = False, request: bool = False) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_, description=help_)
        connection_flags(p, False)
        p.add_argument("name", metavar="NAME", help="VirtualMachine name")
        if modes:
            p.add_argument("--mode", choices=GRACEFUL_MODES,
                           help="acpi (power button) or agent (qemu-guest-agent)"
                           + ("; default: the spec's graceful mode, else acpi" if name == "shutdown"
                              else "; default: acpi"))
        if request:
            p.add_argument("--id", dest="request_id", help="request id (default: a new one)")
        p.add_argument("--wait", action="store_true", help="wait for the outcome; exit 1 if it failed")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
        return p

    lst = verbs.add_parser("list", help="list VirtualMachines", description="list VirtualMachines")
    connection_flags(lst, False)
    lst.add_argument("-A", "--all-namespaces", action="store_true", help="VMs of every namespace")
    lst.add_argument("-o", "--output", choices=["wide"], help="wide: also the reason's message")
    verb("start", "start the VM (powerState: Running)")
    verb("shutdown", "shut the guest down gracefully (powerState: Stopped)", modes=True)
    verb("destroy", "power the VM off at once (powerState: Stopped, shutdown.mode: force)")
    verb("reboot", "reboot the guest once (spec.reboot with a new id)", modes=True, request=True)
    verb("reset", "hard-reset the VM once (spec.reset with a new id)", request=True)
    verb("suspend", "pause the vCPUs (powerState: Paused)")
    verb("resume", "resume the vCPUs (powerState: Running)")
    return top


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        api_client, default_ns = connect(args.kubeconfig, args.context)
    except (config.ConfigException, OSError) as exc:
        print(f"error: no usable kubeconfig: {exc}", file=sys.stderr)
        return 1
    vms = VMClient(api_client, args.namespace or default_ns)
    try:
        if args.verb == "list":
            items = vms.list(args.all_namespaces)
            if not items:
                where = "any namespace" if args.all_namespaces else f"namespace {vms.namespace}"
                print(f"No VirtualMachines found in {where}.", file=sys.stderr)
                return 0
            print(table(items, args.all_namespaces, args.output == "wide"))
            return 0
        vm = vms.get(args.name)
        p = plan(args.verb, vm, getattr(args, "mode", None), getattr(args, "request_id", None))
        if p.note:
            print(p.note, file=sys.stderr)
        updated = vms.apply(args.name, p) or vm
        print(p.summary + (f" (generation {generation(updated)})" if p.patches else ""))
        if not args.wait or p.check is None:
            return 0
        outcome = wait(vms, args.name, p.check(updated), args.timeout)
        print(f"{args.name}: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
        return 0 if outcome.ok else 1
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        print(f"error: {_api_message(exc)}", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run())
