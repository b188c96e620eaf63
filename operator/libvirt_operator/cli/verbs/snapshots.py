"""Snapshot verbs: snapshot-create-as, snapshot-list, snapshot-revert, snapshot-delete, save, restore.

Each one creates or edits objects of the operator's API; the node agent does the work:
- `snapshot-create-as VM NAME` creates a VMSnapshot (the handbook's `--memspec`/`--diskspec`
  spelled as virsh spells them; `--copy` is method Copy, for raw disks);
- `snapshot-revert VM NAME` sets the VM's one-shot `spec.revert` {id, snapshot} (a new id each time);
- `snapshot-delete VM NAME` deletes the VMSnapshot; its files are dealt with by the agent (S8);
- `save VM FILE` is the handbook's raw snapshot (S1): a VMSnapshot of method Copy with the memory in
  FILE that leaves the VM stopped (`stopAfter`); unlike a bare `virsh save` the disks are copied too,
  so that `restore` finds them as they were at the save;
- `restore FILE` reverts the VM whose snapshot holds the memory file FILE to that snapshot.

`--wait` follows the VMSnapshot's phase (create), the VM's status.lastRevert (revert, restore), or the
VMSnapshot until it is gone (delete), printing the step reached and, while a delete is held, the files
kept and why.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.cli.client import VMClient
from libvirt_operator.cli.names import generated_name
from libvirt_operator.cli.names import host_path as _path
from libvirt_operator.cli.names import label as _label
from libvirt_operator.cli.names import vm_name as _name
from libvirt_operator.cli.outcomes import request_done
from libvirt_operator.cli.output import table
from libvirt_operator.cli.plan import (
    Check,
    CreateObject,
    PatchVM,
    Plan,
    Refused,
    Result,
    arg,
    command,
    new_request_id,
    verb,
)
from libvirt_operator.cli.vmread import condition, disks, find_disk, power_state, spec
from libvirt_operator.cli.wait import wait

SNAPSHOTS = "vmsnapshots"
WAIT = arg("--wait", action="store_true", help="wait for the outcome; exit 1 if it failed")
TIMEOUT = arg("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
POWER_AFTER = (arg("--running", action="store_true", help="also set powerState Running (the VM runs after the revert)"),
               arg("--paused", action="store_true", help="also set powerState Paused (the VM is left paused after "
                   "the revert)"))






# -- which disk is which ------------------------------------------------------------------------

def snapshottable(disk: dict) -> bool:
    """A disk the operator snapshots: device disk, writable, with a file (cdroms never)."""
    return disk.get("device", "disk") == "disk" and not disk.get("readOnly") and bool(disk.get("path"))


def system_disk(vm: dict) -> str | None:
    """The system disk: the disk with the lowest bootOrder when any disk has one, else the first disk of
    device `disk` in spec.disks (the VM's disks have no bootOrder today: the first disk)."""
    candidates = [d for d in disks(vm) if d.get("device", "disk") == "disk"]
    ordered = [d for d in candidates if d.get("bootOrder") is not None]
    if ordered:
        return min(ordered, key=lambda d: d["bootOrder"])["name"]
    return candidates[0]["name"] if candidates else None


# -- --diskspec / --memspec ---------------------------------------------------------------------

def _options(text: str, flag: str) -> tuple[str, dict[str, str]]:
    """virsh's `FIRST[,key=value|,flag]...`: the first item and the rest as a dict (a bare flag is '')."""
    parts = [p.strip() for p in text.split(",")]
    if not parts[0]:
        raise Refused(f"{flag} {text!r}: empty")
    out: dict[str, str] = {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if not key:
            raise Refused(f"{flag} {text!r}: an empty item")
        if key in out:
            raise Refused(f"{flag} {text!r}: {key} given twice")
        out[key] = value
    return parts[0], out


def parse_memspec(text: str) -> tuple[bool, str | None]:
    """`[file=]PATH[,snapshot=external|no]` or `snapshot=external|no`: (memory, path)."""
    first, rest = _options(text, "--memspec")
    key, sep, value = first.partition("=")
    if sep:
        if key in rest:
            raise Refused(f"--memspec {text!r}: {key} given twice")
        rest = {key: value, **rest}
    else:
        rest = {"file": first, **rest}
    unknown = set(rest) - {"file", "snapshot"}
    if unknown:
        raise Refused(f"--memspec {text!r}: unknown {', '.join(sorted(unknown))} (expected file=PATH and "
                      "snapshot=external|no)")
    mode = rest.get("snapshot", "external")
    if mode not in ("external", "no"):
        raise Refused(f"--memspec {text!r}: snapshot={mode}: the operator's memory snapshots are external "
                      "(snapshot=external, or no)")
    if mode == "no":
        if rest.get("file"):
            raise Refused(f"--memspec {text!r}: snapshot=no takes no file")
        return False, None
    return True, _path(rest["file"], "--memspec file") if rest.get("file") else None


def parse_diskspec(vm: dict, text: str, method: str, reuse_all: bool) -> dict:
    """`DISK[,snapshot=external|no][,driver=qcow2][,stype=file][,file=PATH][,reuse]`: one spec.disks[] entry.
    DISK is a disk's name, target (vda) or path; file= is the new leaf (External) or the copy (Copy)."""
    key, rest = _options(text, "--diskspec")
    _, disk = find_disk(vm, key)
    name = disk["name"]
    unknown = set(rest) - {"snapshot", "driver", "stype", "file", "reuse"}
    if unknown:
        raise Refused(f"--diskspec {text!r}: unknown {', '.join(sorted(unknown))} (expected snapshot=, driver=, "
                      "file= and reuse)")
    if rest.get("stype", "file") != "file":
        raise Refused(f"--diskspec {text!r}: stype={rest['stype']}: only file-backed images (stype=file)")
    mode = rest.get("snapshot", "external")
    if mode not in ("external", "no"):
        raise Refused(f"--diskspec {text!r}: snapshot={mode}: the operator's disk snapshots are external "
                      "(snapshot=external, or no to leave the disk out)")
    if mode == "no":
        if set(rest) - {"snapshot"}:
            raise Refused(f"--diskspec {text!r}: snapshot=no leaves the disk out: no file, driver or reuse")
        return {"name": name, "snapshot": "no"}
    if not snapshottable(disk):
        why = "a cdrom" if disk.get("device") == "cdrom" else "read-only" if disk.get("readOnly") else "without a file"
        raise Refused(f"{_name(vm)}: disk {name} is {why}: it is never snapshotted (leave it out)")
    if rest.get("reuse"):
        raise Refused(f"--diskspec {text!r}: reuse takes no value")
    entry: dict[str, Any] = {"name": name}
    file = _path(rest["file"], "--diskspec file") if rest.get("file") else None
    driver = rest.get("driver")
    if method == "Copy":
        if "reuse" in rest:
            raise Refused(f"--diskspec {text!r}: a copy never reuses a file")
        own = disk.get("format") or "qcow2"
        if driver and driver != own:
            raise Refused(f"--diskspec {text!r}: a copy keeps the disk's format ({own}), not {driver}")
        if file:
            entry["copyPath"] = file
        return entry
    if driver and driver != "qcow2":
        raise Refused(f"--diskspec {text!r}: an external snapshot's new leaf is qcow2, not {driver}")
    if file:
        entry["overlayPath"] = file
    if "reuse" in rest or (reuse_all and file):
        if not file:
            raise Refused(f"--diskspec {text!r}: reuse needs file= (the pre-created overlay)")
        entry["reuseExisting"] = True
    return entry


# -- the VMSnapshot ------------------------------------------------------------------------------

def snapshot_body(vm: dict, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The VMSnapshot that `snapshot-create-as` asks for, and notes on what was decided for the user."""
    name = _name(vm)
    notes: list[str] = []
    method = "Copy" if args.copy else "External"
    for_clone = bool(args.for_clone)
    memory, memory_path = (True, None)
    if args.memspec is not None:
        memory, memory_path = parse_memspec(args.memspec)
    if args.disk_only or for_clone:
        if args.memspec is not None and memory:
            raise Refused("--memspec saves the memory: it does not go with --disk-only or --for-clone")
        memory = False
    if method == "Copy":
        if args.disk_only or for_clone:
            raise Refused("--copy saves the memory and copies the disks: it does not go with --disk-only or "
                          "--for-clone")
        if not memory:
            raise Refused("--copy needs the memory (the handbook's raw snapshot saves it, then copies the disks)")
        if args.reuse_external:
            raise Refused("--reuse-external is for external snapshots: a copy never reuses a file")
    if args.stop_after and method != "Copy":
        raise Refused("--stop-after (--halt) applies to --copy: an external snapshot leaves the VM running")
    if power_state(vm) == "Stopped" or (vm.get("status") or {}).get("phase") == "Stopped":
        raise Refused(f"{name} is not running: snapshots are taken of a running (or paused) VM (VMNotRunning)")
    if memory and spec(vm).get("hostDevices"):
        raise Refused(f"{name} has host devices passed through: its memory cannot be saved (PassthroughDevice); "
                      "use --disk-only")

    entries: list[dict] = []
    for text in args.diskspec:
        entry = parse_diskspec(vm, text, method, args.reuse_external)
        if any(e["name"] == entry["name"] for e in entries):
            raise Refused(f"--diskspec: disk {entry['name']} given twice")
        entries.append(entry)
    system = system_disk(vm)
    if not memory and not for_clone and system is not None:
        mine = next((e for e in entries if e["name"] == system), None)
        if mine is None:
            entries.append({"name": system, "snapshot": "no"})
            notes.append(f"{name}: the system disk {system} is left out of the disk-only snapshot "
                         "(the handbook warns against it); --for-clone takes every disk")
        elif mine.get("snapshot") != "no":
            raise Refused(f"{name}: disk {system} is the system disk: a disk-only snapshot of it is refused "
                          "(SystemDiskSnapshot, as the handbook warns); take a snapshot with memory, or use "
                          "--for-clone for a clone source")
    left_out = {e["name"] for e in entries if e.get("snapshot") == "no"}
    taken = [d["name"] for d in disks(vm) if snapshottable(d) and d["name"] not in left_out]
    if not taken:
        besides = f" besides the system disk {system}" if system and not memory and not for_clone else ""
        raise Refused(f"{name}: no disk to snapshot{besides} (cdroms, read-only disks and snapshot=no are left out)")

    snap_spec: dict[str, Any] = {"vmName": name, "method": method, "memory": memory}
    if memory_path:
        snap_spec["memoryPath"] = memory_path
    if entries:
        snap_spec["disks"] = sorted(entries, key=lambda e: [d["name"] for d in disks(vm)].index(e["name"]))
    if for_clone:
        snap_spec["forClone"] = True
    if args.stop_after:
        snap_spec["stopAfter"] = True
    snapshot = _label(args.snapshot or generated_name(name, "snap"), "snapshot name")
    body = {"apiVersion": meta.API_VERSION, "kind": "VMSnapshot",
            "metadata": {"name": snapshot, "namespace": vm["metadata"].get("namespace", "default")},
            "spec": snap_spec}
    return body, notes


def describe_snapshot(snap_spec: dict) -> str:
    what = "disk-only" if not snap_spec.get("memory") else "memory"
    if snap_spec.get("method") == "Copy":
        what = "copy with memory" + (", VM left stopped" if snap_spec.get("stopAfter") else "")
    elif snap_spec.get("forClone"):
        what = "clone source (disk-only, every disk)"
    else:
        what = f"external, {what}"
    return what


def snapshot_ready(updated: dict) -> Check:
    """The VMSnapshot reaches Ready (its files, the downtime) or Failed (the Ready condition's reason)."""
    name = updated["metadata"]["name"]
    step = {"last": None}

    def check(obj: dict) -> Result | None:
        st = obj.get("status") or {}
        job = (st.get("job") or {}).get("step")
        if job and job != step["last"] and st.get("phase") == "InProgress":
            step["last"] = job
            print(f"  {name}: step {job}", file=sys.stderr)
        if st.get("phase") == "Ready":
            parts = [f"{len(st.get('disks') or [])} disk(s)"]
            if st.get("memoryFile"):
                parts.append(f"memory {st['memoryFile']}")
            if st.get("downtimeMs") is not None:
                parts.append(f"downtime {st['downtimeMs']} ms")
            if st.get("durationMs") is not None:
                parts.append(f"took {st['durationMs']} ms")
            return Result(True, f"snapshot {name} Ready: " + ", ".join(parts))
        if st.get("phase") == "Failed":
            ready = condition(obj, "Ready")
            return Result(False, f"snapshot {name} Failed: {ready.get('reason', '?')}: {ready.get('message', '')}"
                          .rstrip(": "))
        return None

    return check


@verb("snapshot-create-as", "create a VMSnapshot (the handbook's snapshot-create-as --memspec/--diskspec "
      "[--disk-only] --no-metadata; --copy for raw disks, --for-clone for an online clone)",
      arg("snapshot", metavar="SNAPSHOT", nargs="?", help="the VMSnapshot's name (default: VM-snap-TIMESTAMP)"),
      arg("--memspec", metavar="[file=]PATH[,snapshot=external|no]",
          help="where the memory goes (default with memory: generated next to the first disk)"),
      arg("--diskspec", metavar="DISK[,snapshot=external|no][,driver=qcow2][,file=PATH][,reuse]",
          action="append", default=[],
          help="per disk (name, target or path): file= is the new leaf the VM runs on (external) or the copy "
               "(--copy); reuse takes a pre-created overlay; snapshot=no leaves the disk out. Disks not named "
               "take the defaults (generated paths)"),
      arg("--disk-only", action="store_true",
          help="no memory: data disks only (the system disk is left out, a snapshot of it refused)"),
      arg("--copy", action="store_true",
          help="method Copy (raw disks): save the memory, copy the disks, restore the VM (S1)"),
      arg("--for-clone", action="store_true",
          help="a disk-only snapshot of every disk, system disk included, for VMs made with spec.cloneFrom"),
      arg("--stop-after", "--halt", dest="stop_after", action="store_true",
          help="--copy: leave the VM stopped (saved) afterwards"),
      arg("--reuse-external", action="store_true", help="every --diskspec with file= reuses that pre-created file"),
      arg("--no-metadata", action="store_true", help="accepted for the handbook's command lines: libvirt never "
          "keeps snapshot metadata here (the VMSnapshot is the record)"),
      arg("--print-yaml", action="store_true", help="print the VMSnapshot and create nothing"))
def snapshot_create_as(vm: dict, args: argparse.Namespace) -> Plan:
    body, notes = snapshot_body(vm, args)
    if args.print_yaml:
        return Plan(output=yaml.safe_dump(body, sort_keys=False).rstrip())
    name = body["metadata"]["name"]
    return Plan(f"{_name(vm)}: snapshot {name} requested ({describe_snapshot(body['spec'])})",
                actions=[CreateObject(SNAPSHOTS, body)], check=snapshot_ready, note="\n".join(notes))


@verb("save", "save the VM's memory to FILE and copy its disks, leaving it stopped (a VMSnapshot of method "
      "Copy with stopAfter: the handbook's raw snapshot); 'restore FILE' brings it back",
      arg("file", metavar="FILE", help="host path of the memory image (under a storage root of the node)"),
      arg("--name", dest="snapshot", metavar="SNAPSHOT", help="the VMSnapshot's name (default: VM-save-TIMESTAMP)"),
      arg("--running", dest="keep_running", action="store_true",
          help="restore the VM from the image right after the copy (no stopAfter)"))
def save(vm: dict, args: argparse.Namespace) -> Plan:
    ns = argparse.Namespace(snapshot=args.snapshot or generated_name(_name(vm), "save"), memspec=f"file={args.file}",
                            diskspec=[], disk_only=False, copy=True, for_clone=False,
                            stop_after=not args.keep_running, reuse_external=False)
    body, notes = snapshot_body(vm, ns)
    name = body["metadata"]["name"]
    return Plan(f"{_name(vm)}: save to {body['spec']['memoryPath']} requested (snapshot {name}, "
                f"{describe_snapshot(body['spec'])})", actions=[CreateObject(SNAPSHOTS, body)],
                check=snapshot_ready, note="\n".join(notes))


# -- revert / restore ----------------------------------------------------------------------------

def revert_plan(vm: dict, snapshot: dict, args: argparse.Namespace) -> Plan:
    """spec.revert {id, snapshot} with a new id (and powerState with --running/--paused), after checking
    that the snapshot is one this VM can go back to."""
    name, snap = _name(vm), snapshot["metadata"]["name"]
    s_spec, st = snapshot.get("spec") or {}, snapshot.get("status") or {}
    if s_spec.get("vmName") != name:
        raise Refused(f"snapshot {snap} is a snapshot of VM {s_spec.get('vmName')}, not of {name}")
    if st.get("vmUid") and st["vmUid"] != vm["metadata"].get("uid"):
        raise Refused(f"snapshot {snap} was taken of an earlier VM named {name} (uid {st['vmUid']}): "
                      "it cannot be reverted to (SnapshotOfAnotherVM)")
    if s_spec.get("forClone"):
        raise Refused(f"snapshot {snap} is a clone source (forClone): make a VM with spec.cloneFrom instead "
                      "(NotRevertible)")
    if snapshot["metadata"].get("deletionTimestamp"):
        raise Refused(f"snapshot {snap} is being deleted")
    if st.get("phase") != "Ready":
        ready = condition(snapshot, "Ready")
        why = f": {ready['reason']}" + (f" - {ready['message']}" if ready.get("message") else "") \
            if ready.get("reason") else ""
        raise Refused(f"snapshot {snap} is not Ready (phase {st.get('phase') or 'none yet'}{why}): "
                      "nothing to revert to (SnapshotNotReady)")
    request = {"id": args.request_id or new_request_id(), "snapshot": snap}
    body: dict[str, Any] = {"spec": {"revert": request}}
    after = power_after(args)
    power = power_state(vm)
    if after and after != power:
        body["spec"]["powerState"] = after
    then = after or power
    what = {"Running": "running", "Paused": "paused", "Stopped": "stopped"}.get(then, then)
    note = ""
    if power != "Stopped":
        note = f"{name}: the VM is stopped for the revert (the snapshot's state replaces its own), then left {what}"
    return Plan(f"{name}: revert to snapshot {snap} requested (id {request['id']}; then {what})",
                actions=[PatchVM(body)], check=reverted(request["id"]), note=note)


def power_after(args: argparse.Namespace) -> str | None:
    """--running / --paused (virsh's snapshot-revert and restore flags) as the powerState to set."""
    if args.running and args.paused:
        raise Refused("--running and --paused exclude each other")
    return "Running" if args.running else "Paused" if args.paused else None


def reverted(request_id: str):
    """status.lastRevert for this id: Succeeded or Failed (the steps reached are printed meanwhile)."""
    inner = request_done("lastRevert", request_id)

    def for_update(updated: dict) -> Check:
        decide = inner(updated)
        last = {"step": None}

        def check(vm: dict) -> Result | None:
            lr = (vm.get("status") or {}).get("lastRevert") or {}
            if lr.get("id") == request_id and lr.get("step") and lr["step"] != last["step"]:
                last["step"] = lr["step"]
                print(f"  {_name(vm)}: revert step {lr['step']}", file=sys.stderr)
            outcome = decide(vm)
            if outcome is not None:
                return Result(outcome.ok, f"revert {request_id} {outcome.message}")
            return None

        return check

    return for_update


def _carry_out(vms: VMClient, args: argparse.Namespace, vm_name: str, p: Plan) -> int:
    """What virsh.run does with a plan, for the verbs here that read more than the VM first."""
    if p.note:
        print(p.note, file=sys.stderr)
    last = vms.apply(vm_name, p)
    print(p.summary)
    if not args.wait or p.check is None or last is None:
        return 0
    plural, updated = last
    outcome = wait(vms, updated["metadata"]["name"], p.check(updated), args.timeout, start=updated, plural=plural)
    print(f"{vm_name}: {outcome.message}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


REQUEST_ID = arg("--id", dest="request_id", help="request id (default: a new one)")


@command("snapshot-revert", "revert the VM to a VMSnapshot (spec.revert with a new id); a running VM is stopped, "
         "reverted and brought back to its powerState",
         arg("name", metavar="NAME", help="VirtualMachine name"),
         arg("snapshot", metavar="SNAPSHOT", help="a Ready VMSnapshot of this VM"),
         *POWER_AFTER, REQUEST_ID, WAIT, TIMEOUT)
def snapshot_revert(vms: VMClient, args: argparse.Namespace) -> int:
    vm = vms.get(args.name)
    snapshot = vms.get(args.snapshot, SNAPSHOTS)
    return _carry_out(vms, args, args.name, revert_plan(vm, snapshot, args))


def _memory_file(snapshot: dict) -> str | None:
    st, s_spec = snapshot.get("status") or {}, snapshot.get("spec") or {}
    found = st.get("memoryFile") or s_spec.get("memoryPath")
    return os.path.normpath(found) if found else None


def find_saved(snapshots: list[dict], file: str) -> dict:
    """The VMSnapshot whose memory file is `file` (Ready ones first; refused when it is ambiguous)."""
    file = _path(file, "FILE")
    found = [s for s in snapshots if _memory_file(s) == file]
    if not found:
        raise Refused(f"no VMSnapshot in this namespace holds the memory file {file} "
                      "(see 'kubectl virsh snapshot-list VM')")
    ready = [s for s in found if (s.get("status") or {}).get("phase") == "Ready"] or found
    if len(ready) > 1:
        names = ", ".join(f"{s['metadata']['name']} (VM {s['spec']['vmName']})" for s in ready)
        raise Refused(f"{len(ready)} snapshots hold {file}: {names}; use 'kubectl virsh snapshot-revert VM SNAPSHOT'")
    return ready[0]


def _list_snapshots(vms: VMClient) -> list[dict]:
    return vms.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, vms.namespace, SNAPSHOTS) \
        .get("items", [])


@command("restore", "revert the VM saved in FILE ('save VM FILE', or any snapshot with that memory file) to "
         "that snapshot (spec.revert with a new id)",
         arg("file", metavar="FILE", help="the memory image of a VMSnapshot of this namespace"),
         *POWER_AFTER, REQUEST_ID, WAIT, TIMEOUT)
def restore(vms: VMClient, args: argparse.Namespace) -> int:
    snapshot = find_saved(_list_snapshots(vms), args.file)
    vm_name = snapshot["spec"]["vmName"]
    vm = vms.get(vm_name)
    if not args.paused and power_state(vm) == "Stopped":
        args.running = True  # virsh restore starts the domain
    return _carry_out(vms, args, vm_name, revert_plan(vm, snapshot, args))


# -- list ----------------------------------------------------------------------------------------

def _created_at(s: dict) -> str:
    return (s.get("status") or {}).get("creationTime") or s["metadata"].get("creationTimestamp") or ""


def files_of(snapshot: dict) -> str:
    st = snapshot.get("status") or {}
    out = [f"memory={st['memoryFile']}"] if st.get("memoryFile") else []
    out += [f"{d['name']}={d['snapshotFile']}" for d in st.get("disks") or [] if d.get("snapshotFile")]
    return " ".join(out)


def method_of(snapshot: dict) -> str:
    s_spec = snapshot.get("spec") or {}
    method = s_spec.get("method", "External")
    if s_spec.get("forClone"):
        method += ",forClone"
    if s_spec.get("stopAfter"):
        method += ",stopAfter"
    return method


def snapshot_table(vm_name: str, snapshots: list[dict], wide: bool = False) -> str:
    mine = sorted((s for s in snapshots if (s.get("spec") or {}).get("vmName") == vm_name),
                  key=lambda s: (_created_at(s), s["metadata"]["name"]))
    header = ["NAME", "PHASE", "METHOD", "MEMORY", "CREATED", "FILES"]
    if wide:
        header += ["REASON", "KEPT"]
    rows = []
    for s in mine:
        st = s.get("status") or {}
        phase = st.get("phase") or ("Deleting" if s["metadata"].get("deletionTimestamp") else "Pending")
        row = [s["metadata"]["name"], phase, method_of(s), "yes" if (s.get("spec") or {}).get("memory") else "no",
               st.get("creationTime") or "", files_of(s)]
        if wide:
            ready = condition(s, "Ready")
            row += [ready.get("reason", "") if ready.get("status") != "True" else "",
                    " ".join(f"{f} ({why})" for f, why in (st.get("keptFiles") or {}).items())]
        rows.append(row)
    return table(header, rows)


def revert_footer(vm: dict) -> str:
    lr = (vm.get("status") or {}).get("lastRevert") or {}
    asked = spec(vm).get("revert") or {}
    if not lr and not asked:
        return ""
    line = f"last revert: id {lr.get('id') or asked.get('id')}, snapshot {asked.get('snapshot', '?')}"
    if lr:
        line += f": {lr.get('result')}" + (f" ({lr['message']})" if lr.get("message") else "")
    return line


@command("snapshot-list", "list the VM's VMSnapshots: phase, method, memory, creation time and files",
         arg("name", metavar="NAME", help="VirtualMachine name (its snapshots are listed even when it is gone)"),
         arg("-o", "--output", choices=["wide"], help="wide: also the reason and the files a delete keeps"))
def snapshot_list(vms: VMClient, args: argparse.Namespace) -> int:
    snapshots = _list_snapshots(vms)
    try:
        vm = vms.get(args.name)
    except Refused:
        vm = None
    if not any((s.get("spec") or {}).get("vmName") == args.name for s in snapshots):
        if vm is None:
            raise Refused(f'virtualmachine "{args.name}" not found in namespace "{vms.namespace}", nor any '
                          "snapshot of it")
        print(f"No VMSnapshots of {args.name} in namespace {vms.namespace}.", file=sys.stderr)
        return 0
    print(snapshot_table(args.name, snapshots, args.output == "wide"))
    if vm is not None and (footer := revert_footer(vm)):
        print(footer)
    if vm is None:
        print(f"(VirtualMachine {args.name} no longer exists)", file=sys.stderr)
    return 0


# -- delete --------------------------------------------------------------------------------------

def deletion_check(name: str, say=None):
    """While the delete is held: the files kept and why (printed when they change); never decides (the
    object disappearing ends the wait)."""
    say = say or (lambda line: print(line, file=sys.stderr))
    seen = {"held": None}

    def check(obj: dict) -> Result | None:
        st = obj.get("status") or {}
        kept = st.get("keptFiles") or {}
        conds = [f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}".rstrip(": ")
                 for c in st.get("conditions") or [] if c.get("status") != "True" or c.get("type") != "Ready"]
        now = (tuple(sorted(kept.items())), tuple(conds))
        if (kept or conds) and now != seen["held"]:
            seen["held"] = now
            for f, why in sorted(kept.items()):
                say(f"  {name}: kept {f}: {why}")
            for c in conds:
                say(f"  {name}: {c}")
        return None

    return check


def delete_plan(vm_name: str, snapshot: dict) -> str:
    """What the delete of `snapshot` does; refused when it is another VM's."""
    snap, owner = snapshot["metadata"]["name"], (snapshot.get("spec") or {}).get("vmName")
    if owner != vm_name:
        raise Refused(f"snapshot {snap} is a snapshot of VM {owner}, not of {vm_name}")
    return f"{vm_name}: delete of snapshot {snap} requested (files nothing else uses are removed, or merged)"


@command("snapshot-delete", "delete a VMSnapshot; the node agent removes (or merges) the files that nothing "
         "else uses, and keeps, saying why, those a VM, another snapshot or a clone still uses",
         arg("name", metavar="NAME", help="VirtualMachine name"),
         arg("snapshot", metavar="SNAPSHOT", help="the VMSnapshot"),
         WAIT, TIMEOUT)
def snapshot_delete(vms: VMClient, args: argparse.Namespace) -> int:
    snapshot = vms.get(args.snapshot, SNAPSHOTS)
    summary = delete_plan(args.name, snapshot)
    try:
        vms.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, vms.namespace, SNAPSHOTS, args.snapshot)
    except ApiException as exc:
        if exc.status != 404:
            raise
    print(summary)
    if not args.wait:
        return 0
    try:
        now = vms.get(args.snapshot, SNAPSHOTS)
    except Refused:
        print(f"{args.name}: snapshot {args.snapshot} deleted")
        return 0
    outcome = wait(vms, args.snapshot, deletion_check(args.snapshot), args.timeout, start=now, plural=SNAPSHOTS)
    try:
        held = vms.get(args.snapshot, SNAPSHOTS)
    except Refused:
        print(f"{args.name}: snapshot {args.snapshot} deleted")
        return 0
    kept = (held.get("status") or {}).get("keptFiles") or {}
    extra = "; kept: " + ", ".join(f"{f} ({why})" for f, why in kept.items()) if kept else ""
    print(f"{args.name}: snapshot {args.snapshot} still there: {outcome.message}{extra}", file=sys.stderr)
    return 1

