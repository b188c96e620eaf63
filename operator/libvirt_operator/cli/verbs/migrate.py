"""Migration verbs: migrate, migrate-cancel, blockcopy, domjobinfo.

Each one creates, deletes or reads VMMigrations; the controller and the node agents do the work:
- `migrate VM [NODE]` creates a VMMigration of type Live (the disks stay on shared storage), or
  WholeMachine with `--copy-storage-inc` (the disks are copied to the target; `--destblock DISK=PATH`
  names a disk's new file there). The handbook's `virsh migrate VM qemu+tcp://HOST/system tcp://HOST`
  spelling is taken too: the host of the URI is the target node, the data URI is the target agent's
  configuration (LVO_MIGRATION_ADDRESS). Auto-converge is on by default (the handbook's
  `migrate_set_capability auto-converge on`, done through libvirt's flag, never the monitor).
- `--timeout S`: the API's completion timeout is per GiB (completionTimeoutPerGiB, as KubeVirt's), so the
  verb computes the per-GiB figure from the VM's memory (rounded up: the timeout is at least S) and says
  so; for WholeMachine the copied disks add to the GiB counted, and the timeout grows with them. At the
  timeout the migration is aborted (the VM stays on its node), or switched to post-copy with `--postcopy`.
- `migrate-cancel VM` deletes the VM's active VMMigration: the agent aborts the job, the VM stays.
- `blockcopy VM DISK PATH` creates a Storage VMMigration of one disk (one per command, like virsh; a VM has
  one migration at a time, so run them one after the other with --wait). The agent copies the parents,
  prepares the leaf, copies, pivots and removes the old files: the handbook's `--shallow --reuse-external
  --pivot` steps, which are accepted and always done.
- `domjobinfo VM` prints the active (else the last) VMMigration's progress in virsh's layout.

`--wait` follows the VMMigration until Succeeded, Failed or Aborted (the steps are printed as they are
reached; `--verbose` prints the percent, as virsh's `Migration: [ 42 %]` / `Block Copy: [ 42 %]`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.api.vmmigration import TERMINAL_PHASES
from libvirt_operator.cli.client import VMClient
from libvirt_operator.cli.names import generated_name
from libvirt_operator.cli.names import host_path as _path
from libvirt_operator.cli.names import label as _label
from libvirt_operator.cli.names import vm_name as _name
from libvirt_operator.cli.plan import Check, CreateObject, Plan, Refused, Result, arg, command
from libvirt_operator.cli.vmread import condition, find_disk, node_of, power_state, spec, to_bytes
from libvirt_operator.cli.wait import wait

MIGRATIONS = "vmmigrations"
GIB = 2**30
MAX_PER_GIB = 86_400  # the API's bound of completionTimeoutPerGiB
WAIT = arg("--wait", action="store_true", help="wait for the outcome; exit 1 if it failed")
WAIT_TIMEOUT = arg("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds --wait waits (default 3600); the migration goes on when the wait ends")
NAME = arg("--name", dest="migration", metavar="N", help="the VMMigration's name (default: VM-migrate-TIMESTAMP)")
BANDWIDTH = arg("--bandwidth", type=int, metavar="MiB", help="bandwidth limit in MiB/s (default: unlimited)")
VERBOSE = arg("--verbose", action="store_true", help="with --wait: print the percent copied as it grows")






def _refuse_stopped(vm: dict) -> None:
    if power_state(vm) == "Stopped" or (vm.get("status") or {}).get("phase") == "Stopped":
        raise Refused(f"{_name(vm)} is not running: only a running (or paused) VM is migrated (VMNotRunning)")


def _body(vm: dict, name: str | None, what: str, migration_spec: dict) -> dict:
    return {"apiVersion": meta.API_VERSION, "kind": "VMMigration",
            "metadata": {"name": _label(name or generated_name(_name(vm), what), "migration name"),
                         "namespace": vm["metadata"].get("namespace", "default")},
            "spec": {"vmName": _name(vm), **migration_spec}}


# -- migrate -------------------------------------------------------------------------------------

def target_node(text: str) -> tuple[str, str]:
    """The node named by TARGET: a node name, or the host of a libvirt URI (the handbook's
    qemu+tcp://HOST/system); and a note when it was read from a URI."""
    if "://" not in text:
        return text, ""
    host = urlsplit(text).hostname
    if not host:
        raise Refused(f"{text!r}: no host in the URI (give the target node's name)")
    return host, (f"{text}: migrating to node {host} (the node named as the URI's host; how the libvirt daemons "
                  "reach each other is the agents' configuration, LVO_MIGRATION_URI)")


def parse_destblock(vm: dict, values: list[str]) -> list[dict]:
    """`--destblock DISK=PATH` (repeatable), or the handbook's `DISK:PATH,DISK:PATH`: spec.disks entries."""
    out: dict[str, str] = {}
    for value in values:
        for item in (i.strip() for i in value.split(",")):
            if not item:
                continue
            sep = "=" if "=" in item else ":"
            key, found, path = item.partition(sep)
            if not found or not key or not path:
                raise Refused(f"--destblock {item!r}: expected DISK=PATH (or DISK:PATH)")
            _, disk = find_disk(vm, key.strip())
            if disk["name"] in out:
                raise Refused(f"--destblock: disk {disk['name']} given twice")
            out[disk["name"]] = _path(path.strip(), "--destblock PATH")
    order = [d["name"] for d in spec(vm).get("disks") or []]
    return [{"name": n, "destinationPath": out[n]} for n in sorted(out, key=order.index)]


def memory_bytes(vm: dict) -> int:
    size = (spec(vm).get("memory") or {}).get("size")
    if not size:
        raise Refused(f"{_name(vm)}: no spec.memory.size to compute the timeout per GiB from")
    return to_bytes(size)


def per_gib(vm: dict, seconds: float, whole_machine: bool) -> tuple[int, str]:
    """--timeout S as completionTimeoutPerGiB (computed from the VM's memory), and the note that says so."""
    if seconds <= 0:
        raise Refused("--timeout must be a positive number of seconds")
    memory = memory_bytes(vm)
    value = max(1, math.ceil(seconds * GIB / memory))
    if value > MAX_PER_GIB:
        raise Refused(f"--timeout {seconds:g}: {value} s per GiB of this VM's memory is over the API's "
                      f"{MAX_PER_GIB}")
    mem = spec(vm)["memory"]["size"]
    note = (f"--timeout {seconds:g}: completionTimeoutPerGiB {value} (the API counts the timeout per GiB copied: "
            f"{value} s per GiB of {mem} of memory is {value * memory / GIB:.0f} s")
    note += ", plus as much per GiB of the disks copied)" if whole_machine else ")"
    return value, note


def migration_body(vm: dict, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The VMMigration `migrate` asks for, and notes on what was decided for the user."""
    name = _name(vm)
    notes: list[str] = []
    _refuse_stopped(vm)
    whole = bool(args.copy_storage_inc)
    m_spec: dict[str, Any] = {"type": "WholeMachine" if whole else "Live"}
    if args.target:
        node, note = target_node(args.target)
        if note:
            notes.append(note)
        if node == node_of(vm):
            raise Refused(f"{name} is already on node {node}: a migration goes to another node (SameNode); "
                          "'blockcopy' moves its disks on this node")
        m_spec["targetNode"] = node
    if args.migrateuri:
        notes.append(f"{args.migrateuri}: not used; the migration data goes to the address the target agent is "
                     "configured with (LVO_MIGRATION_ADDRESS)")
    if args.destblock:
        if not whole:
            raise Refused("--destblock goes with --copy-storage-inc: a Live migration keeps the disks where they "
                          "are (on storage shared by both nodes)")
        m_spec["disks"] = parse_destblock(vm, args.destblock)
    if not args.auto_converge:
        m_spec["autoConverge"] = False
    if args.postcopy:
        m_spec["allowPostCopy"] = True
    if args.bandwidth is not None:
        if args.bandwidth < 1:
            raise Refused("--bandwidth is in MiB/s, at least 1")
        m_spec["bandwidthMibPerSecond"] = args.bandwidth
    if args.timeout is not None:
        m_spec["completionTimeoutPerGiB"], note = per_gib(vm, args.timeout, whole)
        notes.append(note + (": then it switches to post-copy" if args.postcopy else
                             ": then it is aborted, and the VM stays where it is"))
    return _body(vm, args.migration, "migrate", m_spec), notes


def describe_migration(body: dict) -> str:
    s = body["spec"]
    where = f"to node {s['targetNode']}" if s.get("targetNode") else "to a node the controller picks"
    what = {"Live": "live", "WholeMachine": "whole machine, disks copied", "Storage": "storage"}[s["type"]]
    return f"{what}, {where}" if s["type"] != "Storage" else what


def migrate_plan(vm: dict, args: argparse.Namespace) -> Plan:
    body, notes = migration_body(vm, args)
    name = body["metadata"]["name"]
    return Plan(f"{_name(vm)}: migration {name} requested ({describe_migration(body)})",
                actions=[CreateObject(MIGRATIONS, body)],
                check=migration_done("Migration" if args.verbose else None), note="\n".join(notes))


# -- blockcopy -----------------------------------------------------------------------------------

def blockcopy_plan(vm: dict, args: argparse.Namespace) -> Plan:
    """A Storage VMMigration of one disk to PATH on the VM's node."""
    _refuse_stopped(vm)
    _, disk = find_disk(vm, args.disk)
    if disk.get("device", "disk") != "disk" or not disk.get("path"):
        raise Refused(f"{_name(vm)}: disk {disk['name']} is a {disk.get('device')} without a writable file: "
                      "only disks are copied")
    dest = _path(args.dest, "PATH")
    if os.path.normpath(disk["path"]) == dest:
        raise Refused(f"{_name(vm)}: disk {disk['name']} is already on {dest}")
    m_spec: dict[str, Any] = {"type": "Storage", "disks": [{"name": disk["name"], "destinationPath": dest}]}
    if args.bandwidth is not None:
        if args.bandwidth < 1:
            raise Refused("--bandwidth is in MiB/s, at least 1")
        m_spec["bandwidthMibPerSecond"] = args.bandwidth
    notes = []
    if args.reuse_external:
        notes.append(f"--reuse-external: the agent copies the parents and prepares the new leaf itself: {dest} "
                     "must not exist yet (FileExists)")
    body = _body(vm, args.migration, "blockcopy", m_spec)
    return Plan(f"{_name(vm)}: block copy {body['metadata']['name']} of disk {disk['name']} to {dest} requested "
                "(parents first, then the leaf; pivot, old files removed after success)",
                actions=[CreateObject(MIGRATIONS, body)], check=migration_done("Block Copy" if args.verbose else None),
                note="\n".join(notes))


# -- the outcome --wait follows -------------------------------------------------------------------

def migration_done(verbose: str | None = None, say: Callable[[str], None] | None = None):
    """The VMMigration reaches Succeeded, Failed or Aborted; the steps reached (and with `verbose` the
    percent, as virsh prints it) are said meanwhile."""
    say = say or (lambda line: print(line, file=sys.stderr))

    def for_update(updated: dict) -> Check:
        name = updated["metadata"]["name"]
        seen: dict[str, Any] = {"step": None, "percent": None}

        def check(obj: dict) -> Result | None:
            st = obj.get("status") or {}
            phase = st.get("phase")
            if st.get("step") and st["step"] != seen["step"] and phase not in TERMINAL_PHASES:
                seen["step"] = st["step"]
                say(f"  {name}: step {st['step']}")
            percent = (st.get("progress") or {}).get("percent")
            if verbose and percent is not None and percent != seen["percent"]:
                seen["percent"] = percent
                say(f"{verbose}: [{percent:3d} %]")
            if phase == "Succeeded":
                return Result(True, f"migration {name} Succeeded: {outcome(obj)}")
            if phase in ("Failed", "Aborted"):
                ready = condition(obj, "Ready")
                why = f"{ready.get('reason', '?')}: {ready.get('message', '')}".rstrip(": ")
                return Result(False, f"migration {name} {phase}: {why}")
            return None

        return check

    return for_update


def outcome(obj: dict) -> str:
    st, s = obj.get("status") or {}, obj.get("spec") or {}
    if s.get("type") == "Storage":
        moved = [f"{d['name']} on {d['destinationFile']}" for d in st.get("disks") or [] if d.get("destinationFile")]
        out = "disk " + ", ".join(moved) if moved else "disks copied"
    else:
        out = f"running on {st.get('targetNode') or '?'}"
    extra = []
    downtime = (st.get("progress") or {}).get("downtimeMilliseconds")
    if downtime is not None:
        extra.append(f"downtime {downtime} ms")
    if st.get("durationMilliseconds") is not None:
        extra.append(f"took {st['durationMilliseconds']} ms")
    return out + (f" ({', '.join(extra)})" if extra else "")


# -- reading the VM's migrations -----------------------------------------------------------------

def list_migrations(vms: VMClient) -> list[dict]:
    return vms.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, vms.namespace, MIGRATIONS) \
        .get("items", [])


def active(m: dict) -> bool:
    return (m.get("status") or {}).get("phase") not in TERMINAL_PHASES


def _started(m: dict) -> str:
    return (m.get("status") or {}).get("startTime") or m["metadata"].get("creationTimestamp") or ""


def of_vm(migrations: list[dict], vm_name: str) -> list[dict]:
    """The VM's VMMigrations, oldest first."""
    mine = [m for m in migrations if (m.get("spec") or {}).get("vmName") == vm_name]
    return sorted(mine, key=lambda m: (_started(m), m["metadata"].get("creationTimestamp") or "",
                                       m["metadata"]["name"]))


def current(migrations: list[dict], vm_name: str) -> dict | None:
    """The VM's active VMMigration (the newest), else its last one."""
    mine = of_vm(migrations, vm_name)
    running = [m for m in mine if active(m)]
    return (running or mine or [None])[-1]


def _carry_out(vms: VMClient, args: argparse.Namespace, vm_name: str, p: Plan) -> int:
    if p.note:
        print(p.note, file=sys.stderr)
    busy = [m["metadata"]["name"] for m in of_vm(list_migrations(vms), vm_name) if active(m)]
    if busy:
        raise Refused(f"{vm_name} has a migration in progress ({', '.join(busy)}): one at a time "
                      "(MigrationInProgress); 'kubectl virsh migrate-cancel' aborts it")
    last = vms.apply(vm_name, p)
    print(p.summary)
    if not args.wait or p.check is None or last is None:
        return 0
    plural, created = last
    result = wait(vms, created["metadata"]["name"], p.check(created), args.wait_timeout, start=created,
                  plural=plural)
    print(f"{vm_name}: {result.message}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


@command("migrate", "migrate the running VM to another node (a VMMigration): Live with the disks on shared "
         "storage, or --copy-storage-inc for the whole machine with its local disks copied",
         arg("name", metavar="NAME", help="VirtualMachine name"),
         arg("target", metavar="NODE", nargs="?", help="target node, or the handbook's qemu+tcp://NODE/system "
             "(default: the controller picks one, as for a placement)"),
         arg("migrateuri", metavar="MIGRATEURI", nargs="?", help="accepted for the handbook's command lines "
             "(tcp://HOST): the target agent's configuration decides"),
         arg("--live", action="store_true", help="live migration (the default; accepted for virsh's command lines)"),
         arg("--copy-storage-inc", action="store_true", help="WholeMachine: copy the local disks to the target "
             "(parents first, then the leaves incrementally)"),
         arg("--destblock", action="append", default=[], metavar="DISK=PATH",
             help="with --copy-storage-inc: the disk's new file on the target (repeatable; DISK:PATH,DISK:PATH as "
                  "the handbook spells it; default: the same file name under the target's local root)"),
         BANDWIDTH,
         arg("--timeout", type=float, metavar="S", help="abort after about S seconds: set as "
             "completionTimeoutPerGiB computed from the VM's memory (the API's timeout is per GiB copied)"),
         arg("--postcopy", action="store_true", help="allow post-copy: switch to it at the timeout or when "
             "pre-copy makes no progress (a post-copy migration cannot be aborted)"),
         arg("--no-auto-converge", dest="auto_converge", action="store_false",
             help="do not throttle the vCPUs of a busy guest (auto-converge is on by default)"),
         NAME, VERBOSE, WAIT, WAIT_TIMEOUT)
def migrate(vms: VMClient, args: argparse.Namespace) -> int:
    return _carry_out(vms, args, args.name, migrate_plan(vms.get(args.name), args))


@command("blockcopy", "copy one disk of the running VM to PATH on its node and switch to it (a Storage "
         "VMMigration; the handbook's blockcopy --shallow --reuse-external --pivot); one disk per command",
         arg("name", metavar="NAME", help="VirtualMachine name"),
         arg("disk", metavar="DISK", help="the disk: its name, target (vda) or path"),
         arg("dest", metavar="PATH", help="the disk's new file (its leaf) under a storage root of the node"),
         arg("--shallow", action="store_true", help="accepted: the leaf is copied, its parents copied before it"),
         arg("--reuse-external", action="store_true", help="accepted: the agent prepares PATH itself"),
         arg("--pivot", action="store_true", help="accepted: the VM always switches to the copy"),
         BANDWIDTH, NAME, VERBOSE, WAIT, WAIT_TIMEOUT)
def blockcopy(vms: VMClient, args: argparse.Namespace) -> int:
    return _carry_out(vms, args, args.name, blockcopy_plan(vms.get(args.name), args))


# -- migrate-cancel ------------------------------------------------------------------------------

def cancel_targets(migrations: list[dict], vm_name: str) -> tuple[list[dict], str]:
    """The VM's active VMMigrations to delete, and a note (a post-copy one cannot be aborted)."""
    mine = of_vm(migrations, vm_name)
    found = [m for m in mine if active(m)]
    if not found:
        last = mine[-1] if mine else None
        tail = f" (the last, {last['metadata']['name']}, is {last['status']['phase']})" if last else ""
        raise Refused(f"{vm_name} has no migration in progress{tail}")
    post = [m["metadata"]["name"] for m in found if ((m.get("status") or {}).get("progress") or {}).get("postcopy")]
    note = f"{', '.join(post)}: in post-copy, which cannot be aborted: it completes" if post else ""
    return found, note


@command("migrate-cancel", "abort the VM's migration in progress (deletes its VMMigration: the agent aborts the "
         "job and the VM stays on its node, unchanged)",
         arg("name", metavar="NAME", help="VirtualMachine name"), WAIT, WAIT_TIMEOUT)
def migrate_cancel(vms: VMClient, args: argparse.Namespace) -> int:
    found, note = cancel_targets(list_migrations(vms), args.name)
    if note:
        print(note, file=sys.stderr)
    for m in found:
        try:
            vms.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, vms.namespace, MIGRATIONS,
                                                    m["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise
        print(f"{args.name}: migration {m['metadata']['name']} cancelled (deleted; the agent aborts it)")
    if not args.wait:
        return 0
    failed = 0
    for m in found:
        gone = _wait_gone(vms, m["metadata"]["name"], args.wait_timeout)
        if gone is not None:
            print(f"{args.name}: migration {m['metadata']['name']} still there: {gone}", file=sys.stderr)
            failed = 1
    if not failed:
        print(f"{args.name}: on node {node_of(vms.get(args.name)) or '?'}")
    return failed


def _wait_gone(vms: VMClient, name: str, timeout: float) -> str | None:
    """None once the VMMigration is gone (its finalizer removed), else why the wait ended."""
    try:
        now = vms.get(name, MIGRATIONS)
    except Refused:
        return None
    result = wait(vms, name, lambda _obj: None, timeout, start=now, plural=MIGRATIONS)
    try:
        vms.get(name, MIGRATIONS)
    except Refused:
        return None
    return result.message


# -- domjobinfo ----------------------------------------------------------------------------------

JOB_TYPES = {"Running": "Unbounded", "HandingOver": "Unbounded", "Succeeded": "Completed", "Failed": "Failed",
             "Aborted": "Cancelled"}


def capacity(n: int | float) -> str:
    """virsh's pretty capacity: three decimals in the largest binary unit below the value."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:.3f} {unit}"
    return f"{float(n):.3f} B"


def _line(label: str, value: str) -> str:
    return f"{label:<17} {value}".rstrip()


def _count(value: Any, unit: str) -> str:
    return f"{value:<12} {unit}" if unit else str(value)


def jobinfo(migration: dict | None, now: datetime | None = None) -> str:
    """virsh domjobinfo's layout for a VMMigration's status.progress (Job type None without one)."""
    if migration is None:
        return _line("Job type:", "None")
    st, s = migration.get("status") or {}, migration.get("spec") or {}
    p = st.get("progress") or {}
    phase = st.get("phase") or "Pending"
    lines = [_line("Job type:", JOB_TYPES.get(phase, "None")),
             _line("Operation:", "Block copy" if s.get("type") == "Storage" else "Outgoing migration")]
    elapsed = p.get("elapsedMilliseconds")
    if elapsed is None and phase in TERMINAL_PHASES:
        elapsed = st.get("durationMilliseconds")
    if elapsed is None and st.get("startTime") and phase not in TERMINAL_PHASES:
        began = datetime.fromisoformat(st["startTime"].replace("Z", "+00:00"))
        elapsed = max(0, int(((now or datetime.now(UTC)) - began).total_seconds() * 1000))
    if elapsed is not None:
        lines.append(_line("Time elapsed:", _count(elapsed, "ms")))
    for label, key in (("Data processed:", "dataProcessedBytes"), ("Data remaining:", "dataRemainingBytes"),
                       ("Data total:", "dataTotalBytes")):
        if p.get(key) is not None:
            lines.append(_line(label, capacity(p[key])))
    if p.get("memoryBytesPerSecond") is not None:
        lines.append(_line("Memory bandwidth:", capacity(p["memoryBytesPerSecond"]) + "/s"))
    if p.get("memoryDirtyRateBytesPerSecond") is not None:
        lines.append(_line("Dirty rate:", capacity(p["memoryDirtyRateBytesPerSecond"]) + "/s"))
    if p.get("iteration") is not None:
        lines.append(_line("Iteration:", _count(p["iteration"], "")))
    if p.get("downtimeMilliseconds") is not None:
        lines.append(_line("Total downtime:", _count(p["downtimeMilliseconds"], "ms")))
    if p.get("autoConvergeThrottle") is not None:
        lines.append(_line("Auto converge throttle:", f"{p['autoConvergeThrottle']} %"))
    if p.get("postcopy"):
        lines.append(_line("Postcopy:", "yes"))
    # What virsh has no line for: which VMMigration this is, and where it stands.
    where = " -> ".join(n for n in (st.get("sourceNode"), st.get("targetNode")) if n)
    lines.append(_line("Migration:", f"{migration['metadata']['name']} ({s.get('type', 'Live')}"
                                     + (f", {where})" if where else ")")))
    state = phase + (f", step {st['step']}" if st.get("step") and phase not in TERMINAL_PHASES else "")
    ready = condition(migration, "Ready")
    if phase in ("Failed", "Aborted", "Pending") and ready.get("reason"):
        state += f" ({ready['reason']}" + (f": {ready['message']})" if ready.get("message") else ")")
    lines.append(_line("Phase:", state))
    if p.get("percent") is not None:
        lines.append(_line("Progress:", f"{p['percent']} %"))
    if p.get("updateTime"):
        lines.append(_line("Updated:", p["updateTime"]))
    return "\n".join(lines)


@command("domjobinfo", "the VM's migration job as virsh domjobinfo prints it: the active VMMigration's progress "
         "(else the last one's)",
         arg("name", metavar="NAME", help="VirtualMachine name (its migrations are shown even when it is gone)"))
def domjobinfo(vms: VMClient, args: argparse.Namespace) -> int:
    print(jobinfo(current(list_migrations(vms), args.name)))
    return 0
