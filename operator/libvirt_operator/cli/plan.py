"""The verb table of `kubectl virsh`, and what a verb decides: a Plan.

A verb is a pure function of the VM as read (and the parsed command line) to a Plan: the
actions to take — patch the VM, or create another object (a VMSnapshot, a VMMigration) — and
the outcome `--wait` follows. Verbs register themselves with `@verb(...)` in the modules of
`cli/verbs/`, one module per concern; the command line is built from this table.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libvirt_operator.cli.client import VMClient

VM_PLURAL = "virtualmachines"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


class Refused(Exception):
    """The verb does not apply to the VM as it is (exit status 1, message on stderr)."""


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str


# A check looks at the watched object as it is now: None while the outcome is not known yet.
Check = Callable[[dict], Result | None]


# -- actions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchVM:
    """A JSON patch (a list of operations) or a merge patch (a dict) of the VM."""

    body: list[dict] | dict

    @property
    def content_type(self) -> str:
        return JSON_PATCH if isinstance(self.body, list) else MERGE_PATCH


@dataclass(frozen=True)
class CreateObject:
    """A new object of this operator's API group in the VM's namespace (e.g. a VMSnapshot)."""

    plural: str
    body: dict

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]


Action = PatchVM | CreateObject


@dataclass
class Plan:
    summary: str = ""  # what was asked, for the user
    actions: list[Action] = field(default_factory=list)  # applied in order
    # Given the object the last action returned (the VM when there is none), the outcome --wait follows.
    # --wait watches the object of the last action: the created object, or the VM.
    check: Callable[[dict], Check] | None = None
    note: str = ""  # said (on stderr) before acting
    output: str = ""  # what a read-only verb prints

    @property
    def patches(self) -> list[PatchVM]:
        return [a for a in self.actions if isinstance(a, PatchVM)]


# -- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One argparse argument: the flags and keyword arguments of add_argument."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    args: tuple[Arg, ...] = ()
    plan: Callable[[dict, argparse.Namespace], Plan] | None = None  # a verb about one VM (NAME)
    run: Callable[[VMClient, argparse.Namespace], int] | None = None  # or a verb of its own (list)
    wait: bool = True  # offers --wait and --timeout
    group: str = ""  # the module that registered it, for the help


VERBS: dict[str, Verb] = {}


def verb(name: str, help_: str, *args: Arg, wait: bool = True) -> Callable[[Callable], Callable]:
    """Register a VM verb: `fn(vm, args) -> Plan`, pure (no API calls)."""

    def register(fn: Callable[[dict, argparse.Namespace], Plan]) -> Callable[[dict, argparse.Namespace], Plan]:
        _add(Verb(name, help_, args, plan=fn, wait=wait, group=fn.__module__.rsplit(".", 1)[-1]))
        return fn

    return register


def command(name: str, help_: str, *args: Arg) -> Callable[[Callable], Callable]:
    """Register a verb that is not about one VM: `fn(vm_client, args) -> exit status`."""

    def register(fn: Callable[[VMClient, argparse.Namespace], int]) -> Callable[[VMClient, argparse.Namespace], int]:
        _add(Verb(name, help_, args, run=fn, wait=False, group=fn.__module__.rsplit(".", 1)[-1]))
        return fn

    return register


def _add(v: Verb) -> None:
    if v.name in VERBS:
        raise ValueError(f"verb {v.name!r} registered twice")
    VERBS[v.name] = v


# -- helpers for verbs ---------------------------------------------------------------------------

def generation(vm: dict) -> int:
    return int(vm["metadata"].get("generation") or 1)


def guard(vm: dict) -> dict:
    """The test operation that makes a JSON patch apply only to the generation the decision was made on."""
    return {"op": "test", "path": "/metadata/generation", "value": generation(vm)}


def spec_ops(vm: dict, **spec: Any) -> list[dict]:
    """A JSON patch setting top-level spec fields, guarded by the generation."""
    return [guard(vm)] + [{"op": "add", "path": f"/spec/{key}", "value": value} for key, value in spec.items()]


def set_in_spec(vm: dict, path: list[str], value: Any) -> list[dict]:
    """A JSON patch setting spec.<path> (missing parents are created), guarded by the generation."""
    node: Any = vm.get("spec") or {}
    for depth, key in enumerate(path[:-1]):
        if not isinstance(node, dict) or key not in node or node[key] is None:
            nested = value
            for k in reversed(path[depth + 1:]):
                nested = {k: nested}
            return [guard(vm), {"op": "add", "path": pointer(["spec", *path[:depth + 1]]), "value": nested}]
        node = node[key]
    return [guard(vm), {"op": "add", "path": pointer(["spec", *path]), "value": value}]


def pointer(parts: list[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def new_request_id() -> str:
    return f"kv-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
