"""`kubectl virsh`: the virsh verbs of the handbook, as edits of VirtualMachine objects.

kubectl runs any `kubectl-<name>` executable on PATH as `kubectl <name>`; this module is the
`kubectl-virsh` console script. Every verb changes the VM's spec (or creates an object of the
operator's API), the one place the operator takes orders from, and with `--wait` follows the
status through a watch until the node agent reports the outcome.

The verbs live in `cli/verbs/` (info, power, resources, devices), registered in the table
`cli.plan.VERBS`; each one is a pure function from the VM as read to a Plan (`cli/plan.py`).
This module builds the command line from the table and carries a plan out.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from kubernetes import config
from kubernetes.client.exceptions import ApiException

from libvirt_operator.cli import verbs as _verbs  # noqa: F401  (registers the verbs)
from libvirt_operator.cli.client import VMClient, api_message, connect
from libvirt_operator.cli.plan import VERBS, VM_PLURAL, Plan, Refused, Verb
from libvirt_operator.cli.vmread import generation
from libvirt_operator.cli.wait import wait

GROUPS = ("info", "power", "resources", "devices", "qos")  # the help lists the verbs in this order


def _verbs_in_order() -> list[Verb]:
    return sorted(VERBS.values(), key=lambda v: GROUPS.index(v.group) if v.group in GROUPS else len(GROUPS))


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
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for v in _verbs_in_order():
        p = sub.add_parser(v.name, help=v.help, description=v.help)
        connection_flags(p, False)
        if v.plan is not None:
            p.add_argument("name", metavar="NAME", help="VirtualMachine name")
        for a in v.args:
            p.add_argument(*a.flags, **a.kwargs)
        if v.wait:
            p.add_argument("--wait", action="store_true", help="wait for the outcome; exit 1 if it failed")
            p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    return top


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return parser()


def plan(argv: Sequence[str], vm: dict) -> Plan:
    """What `kubectl virsh ARGV` would do to this VM (pure: no API calls)."""
    args = _parser().parse_args(list(argv))
    v = VERBS[args.verb]
    if v.plan is None:
        raise ValueError(f"{args.verb} is not a verb about one VM")
    return v.plan(vm, args)


def follow(last: tuple[str, dict] | None, vm: dict) -> tuple[str, dict]:
    """What --wait watches: the object the plan's last action wrote (a created object, or the VM),
    else the VM as read."""
    return last if last is not None else (VM_PLURAL, vm)


def done(plural: str, obj: dict, acted: bool) -> str:
    """What the summary adds once the actions are taken."""
    if not acted:
        return ""
    if plural == VM_PLURAL:
        return f" (generation {generation(obj)})"
    return f" ({plural.removesuffix('s')} {obj['metadata']['name']} created)"


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        api_client, default_ns = connect(args.kubeconfig, args.context)
    except (config.ConfigException, OSError) as exc:
        print(f"error: no usable kubeconfig: {exc}", file=sys.stderr)
        return 1
    vms = VMClient(api_client, args.namespace or default_ns)
    v = VERBS[args.verb]
    try:
        if v.run is not None:
            return v.run(vms, args)
        vm = vms.get(args.name)
        p = v.plan(vm, args)
        if p.output:
            print(p.output)
        if p.note:
            print(p.note, file=sys.stderr)
        last = vms.apply(args.name, p)
        plural, updated = follow(last, vm)
        if p.summary:
            print(p.summary + done(plural, updated, acted=last is not None))
        if not getattr(args, "wait", False) or p.check is None:
            return 0
        outcome = wait(vms, updated["metadata"]["name"], p.check(updated), args.timeout, start=updated, plural=plural)
        print(f"{args.name}: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
        return 0 if outcome.ok else 1
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        print(f"error: {api_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # ^C during --wait: what was asked stays asked
        print(f"\n{args.verb}: stopped waiting; the request stands (see 'kubectl virsh list')", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run())
