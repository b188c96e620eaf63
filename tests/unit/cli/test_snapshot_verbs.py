"""Snapshot verbs of kubectl-virsh: the command line to the VMSnapshot (or the VM's spec.revert) it makes,
the refusals, and the outcomes --wait follows. Pure: a VM dict in, the objects out; every VMSnapshot made is
checked against the API's own model (VMSnapshotSpec), and the examples/ manifests of snapshots too."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from virsh_cases import make_vm, plan

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.api.vmsnapshot import VMSnapshotSpec
from libvirt_operator.cli import virsh
from libvirt_operator.cli.plan import CreateObject, PatchVM, Refused
from libvirt_operator.cli.verbs import snapshots as s

IMG = "/var/lib/libvirt/images"
REPO = Path(__file__).resolve().parents[3]


def vm3(**spec) -> dict:
    """root (system disk), data (qcow2), scratch (raw), a read-only disk and a cdrom."""
    disks = [{"name": "root", "device": "disk", "path": f"{IMG}/web.qcow2", "readOnly": False},
             {"name": "data", "device": "disk", "path": f"{IMG}/web-data.qcow2", "readOnly": False},
             {"name": "scratch", "device": "disk", "path": f"{IMG}/web-scratch.img", "format": "raw",
              "readOnly": False},
             {"name": "ro", "device": "disk", "path": f"{IMG}/shared.qcow2", "readOnly": True},
             {"name": "iso", "device": "cdrom", "path": f"{IMG}/a.iso", "readOnly": False}]
    vm = make_vm(disks=disks, **spec)
    vm["metadata"]["uid"] = "uid-web"
    return vm


def created(argv: str, vm: dict | None = None) -> tuple[dict, object]:
    """The one VMSnapshot the verb creates (validated by the API model), and the plan."""
    p = plan(argv, vm or vm3())
    (action,) = p.actions
    assert isinstance(action, CreateObject) and action.plural == "vmsnapshots"
    body = action.body
    assert body["kind"] == "VMSnapshot" and body["apiVersion"] == "virt.libvirt-operator.io/v1alpha1"
    VMSnapshotSpec.model_validate(body["spec"])  # the API's model (extra fields forbidden)
    return body, p


# -- snapshot-create-as ---------------------------------------------------------------------------

def test_the_handbooks_external_snapshot_with_memory():
    body, p = created(f"snapshot-create-as web s1 --memspec file={IMG}/web.s1.mem "
                      f"--diskspec vda,file={IMG}/web-root.s1.qcow2 --diskspec data,snapshot=external,driver=qcow2,"
                      f"file={IMG}/web-data.s1.qcow2 --no-metadata")
    assert body["metadata"]["name"] == "s1"
    assert body["spec"] == {
        "vmName": "web", "method": "External", "memory": True, "memoryPath": f"{IMG}/web.s1.mem",
        "disks": [{"name": "root", "overlayPath": f"{IMG}/web-root.s1.qcow2"},
                  {"name": "data", "overlayPath": f"{IMG}/web-data.s1.qcow2"}]}
    assert p.summary == "web: snapshot s1 requested (external, memory)"


def test_memory_by_default_and_memspec_spellings():
    body, _ = created("snapshot-create-as web s1")
    assert body["spec"] == {"vmName": "web", "method": "External", "memory": True}  # every disk, generated paths
    for spelling in (f"{IMG}/m", f"file={IMG}/m", f"{IMG}/m,snapshot=external", f"snapshot=external,file={IMG}/m"):
        assert created(f"snapshot-create-as web s1 --memspec {spelling}")[0]["spec"]["memoryPath"] == f"{IMG}/m"
    assert created("snapshot-create-as web s1 --memspec snapshot=external")[0]["spec"] == \
        {"vmName": "web", "method": "External", "memory": True}


def test_disks_by_name_target_or_path_and_reuse():
    vm = vm3()
    vm["spec"]["disks"][1]["target"] = "vdb"
    body, _ = created(f"snapshot-create-as web s1 --diskspec vdb,file={IMG}/leaf.qcow2,reuse "
                      f"--diskspec {IMG}/web-scratch.img,snapshot=no", vm)
    assert body["spec"]["disks"] == [{"name": "data", "overlayPath": f"{IMG}/leaf.qcow2", "reuseExisting": True},
                                     {"name": "scratch", "snapshot": "no"}]
    body, _ = created(f"snapshot-create-as web s1 --reuse-external --diskspec data,file={IMG}/leaf.qcow2 "
                      "--diskspec root")
    assert body["spec"]["disks"] == [{"name": "root"},
                                     {"name": "data", "overlayPath": f"{IMG}/leaf.qcow2", "reuseExisting": True}]


def test_disk_only_leaves_the_system_disk_out_and_says_so():
    body, p = created(f"snapshot-create-as web d1 --disk-only --diskspec data,file={IMG}/d.qcow2")
    assert body["spec"] == {"vmName": "web", "method": "External", "memory": False,
                            "disks": [{"name": "root", "snapshot": "no"},
                                      {"name": "data", "overlayPath": f"{IMG}/d.qcow2"}]}
    assert "system disk root is left out" in p.note
    assert "external, disk-only" in p.summary
    # --memspec snapshot=no is virsh's other way to say "no memory"
    assert created("snapshot-create-as web d1 --memspec snapshot=no")[0]["spec"]["memory"] is False


def test_a_disk_only_snapshot_of_the_system_disk_is_refused():
    for argv in ("snapshot-create-as web d1 --disk-only --diskspec root",
                 "snapshot-create-as web d1 --disk-only --diskspec vda"):
        with pytest.raises(Refused, match="SystemDiskSnapshot"):
            plan(argv, vm3())
    # only the system disk (the others left out): nothing to snapshot
    with pytest.raises(Refused, match="no disk to snapshot besides the system disk root"):
        plan("snapshot-create-as web d1 --disk-only --diskspec data,snapshot=no --diskspec scratch,snapshot=no",
             vm3())


def test_the_system_disk_is_the_first_disk_or_the_lowest_boot_order():
    vm = vm3()
    assert s.system_disk(vm) == "root"
    vm["spec"]["disks"].insert(0, {"name": "cd0", "device": "cdrom"})
    assert s.system_disk(vm) == "root"  # cdroms never
    vm["spec"]["disks"][2]["bootOrder"] = 2  # data
    vm["spec"]["disks"][3]["bootOrder"] = 1  # scratch
    assert s.system_disk(vm) == "scratch"
    assert s.system_disk(make_vm(disks=[])) is None


def test_copy_method_for_raw_disks():
    body, p = created(f"snapshot-create-as web c1 --copy --memspec file={IMG}/c1.mem "
                      f"--diskspec scratch,file={IMG}/scratch.c1.copy,driver=raw --stop-after")
    assert body["spec"] == {"vmName": "web", "method": "Copy", "memory": True, "memoryPath": f"{IMG}/c1.mem",
                            "disks": [{"name": "scratch", "copyPath": f"{IMG}/scratch.c1.copy"}], "stopAfter": True}
    assert "copy with memory, VM left stopped" in p.summary
    assert created("snapshot-create-as web c1 --copy --halt")[0]["spec"]["stopAfter"] is True  # virsh's --halt


@pytest.mark.parametrize(("argv", "message"), [
    ("--copy --disk-only", "does not go with --disk-only"),
    ("--copy --for-clone", "does not go with --disk-only or --for-clone"),
    ("--copy --memspec snapshot=no", "--copy needs the memory"),
    ("--copy --reuse-external", "a copy never reuses"),
    ("--copy --diskspec data,file=/x,reuse", "a copy never reuses"),
    ("--copy --diskspec scratch,driver=qcow2", "keeps the disk's format (raw)"),
    ("--stop-after", "applies to --copy"),
    ("--disk-only --memspec /m", "does not go with --disk-only"),
    ("--diskspec data,driver=raw", "new leaf is qcow2"),
    ("--diskspec data,reuse", "reuse needs file="),
    ("--diskspec data,reuse=yes,file=/x", "reuse takes no value"),
    ("--diskspec data,snapshot=internal", "snapshot=internal"),
    ("--diskspec data,snapshot=no,file=/x", "snapshot=no leaves the disk out"),
    ("--diskspec data,stype=block", "stype=block"),
    ("--diskspec data,bogus=1", "unknown bogus"),
    ("--diskspec data,file=relative.qcow2", "absolute host path"),
    ("--diskspec data --diskspec vdb", "given twice"),
    ("--diskspec iso", "is a cdrom"),
    ("--diskspec ro", "is read-only"),
    ("--diskspec nope", "has no disk 'nope'"),
    ("--memspec snapshot=internal", "are external"),
    ("--memspec file=/m,bogus=1", "unknown bogus"),
])
def test_bad_command_lines_are_refused_with_the_reason(argv, message):
    with pytest.raises(Refused, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(f"snapshot-create-as web s1 {argv}", vm3())


def test_a_snapshot_needs_a_running_vm_and_one_with_memory_no_passthrough():
    for argv in ("snapshot-create-as web s1", "snapshot-create-as web s1 --disk-only"):
        with pytest.raises(Refused, match="VMNotRunning"):
            plan(argv, vm3(powerState="Stopped"))
    stopped_by_itself = vm3(status={"phase": "Stopped"})
    with pytest.raises(Refused, match="VMNotRunning"):
        plan("snapshot-create-as web s1", stopped_by_itself)
    gpu = vm3(hostDevices=[{"name": "gpu", "type": "pci", "address": "0000:01:00.0"}])
    with pytest.raises(Refused, match="PassthroughDevice"):
        plan("snapshot-create-as web s1", gpu)
    created("snapshot-create-as web s1 --disk-only", gpu)  # no memory: fine
    created("snapshot-create-as web s1", vm3(powerState="Paused"))


def test_a_vm_without_a_disk_to_snapshot_is_refused():
    kernel_only = make_vm(disks=[{"name": "iso", "device": "cdrom", "path": f"{IMG}/a.iso"}])
    with pytest.raises(Refused, match="no disk to snapshot \\(cdroms"):
        plan("snapshot-create-as web s1", kernel_only)


def test_for_clone_takes_every_disk():
    body, p = created("snapshot-create-as web golden --for-clone")
    assert body["spec"] == {"vmName": "web", "method": "External", "memory": False, "forClone": True}
    assert "clone source" in p.summary and not p.note


def test_snapshot_names():
    with pytest.raises(Refused, match="not a DNS label"):
        plan("snapshot-create-as web Bad_Name", vm3())
    body, _ = created("snapshot-create-as web")
    assert body["metadata"]["name"].startswith("web-snap-")
    long = vm3()
    long["metadata"]["name"] = "v" * 63
    body, _ = created(f"snapshot-create-as {'v' * 63}", long)
    assert len(body["metadata"]["name"]) <= 63


def test_print_yaml_creates_nothing():
    p = plan("snapshot-create-as web s1 --disk-only --print-yaml", vm3())
    assert p.actions == [] and p.check is None
    doc = yaml.safe_load(p.output)
    assert doc["kind"] == "VMSnapshot" and doc["spec"]["memory"] is False


def test_create_waits_for_ready_or_failed():
    _, p = created("snapshot-create-as web s1")
    check = p.check({"metadata": {"name": "s1"}})
    assert check({"status": {}}) is None
    assert check({"status": {"phase": "InProgress", "job": {"step": "memory", "startedAt": "t"}}}) is None
    ok = check({"status": {"phase": "Ready", "memoryFile": "/m", "downtimeMs": 120, "durationMs": 4000,
                           "disks": [{"name": "root", "snapshotFile": "/a"}]}})
    assert ok.ok and ok.message == "snapshot s1 Ready: 1 disk(s), memory /m, downtime 120 ms, took 4000 ms"
    failed = check({"status": {"phase": "Failed", "conditions": [
        {"type": "Ready", "status": "False", "reason": "FileExists", "message": "/x exists"}]}})
    assert not failed.ok and failed.message == "snapshot s1 Failed: FileExists: /x exists"


# -- save -----------------------------------------------------------------------------------------

def test_save_is_a_copy_snapshot_with_the_memory_in_the_file_leaving_the_vm_stopped():
    body, p = created(f"save web {IMG}/web.save --name sv1")
    assert body["metadata"]["name"] == "sv1"
    assert body["spec"] == {"vmName": "web", "method": "Copy", "memory": True, "memoryPath": f"{IMG}/web.save",
                            "stopAfter": True}
    assert p.summary.startswith(f"web: save to {IMG}/web.save requested (snapshot sv1")
    body, _ = created(f"save web {IMG}/web.save --running")
    assert "stopAfter" not in body["spec"] and body["metadata"]["name"].startswith("web-save-")
    with pytest.raises(Refused, match="absolute host path"):
        plan("save web web.save", vm3())
    with pytest.raises(Refused, match="VMNotRunning"):
        plan(f"save web {IMG}/x", vm3(powerState="Stopped"))


# -- revert / restore -----------------------------------------------------------------------------

def snap(name: str = "s1", vm: str = "web", phase: str = "Ready", **spec) -> dict:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"vmName": vm, "method": "External", "memory": True, **spec},
            "status": {"phase": phase, "vmUid": "uid-web", "memoryFile": f"{IMG}/{vm}.{name}.mem"}}


def args_for(argv: str) -> argparse.Namespace:
    return virsh._parser().parse_args(argv.split())


def revert(argv: str, vm: dict, snapshot: dict):
    return s.revert_plan(vm, snapshot, args_for(argv))


def test_revert_sets_spec_revert_with_a_new_id_and_follows_last_revert():
    vm = vm3()
    p = revert("snapshot-revert web s1", vm, snap())
    (action,) = p.actions
    assert isinstance(action, PatchVM) and action.content_type == "application/merge-patch+json"
    rid = action.body["spec"]["revert"]["id"]
    assert action.body == {"spec": {"revert": {"id": rid, "snapshot": "s1"}}} and rid.startswith("kv-")
    VirtualMachineSpec.model_validate({**vm["spec"], **action.body["spec"]})
    assert f"(id {rid}; then running)" in p.summary and "stopped for the revert" in p.note
    again = revert("snapshot-revert web s1", vm, snap()).actions[0].body["spec"]["revert"]["id"]
    assert again != rid  # a second revert to the same snapshot is a new request
    check = p.check(vm)
    base = {"id": rid, "time": "t"}
    assert check({"metadata": {"name": "web"}, "status": {"lastRevert": {**base, "id": "old",
                                                                          "result": "Succeeded"}}}) is None
    assert check({"metadata": {"name": "web"}, "status": {"lastRevert": {**base, "result": "InProgress",
                                                                          "step": "restore"}}}) is None
    assert check({"metadata": {"name": "web"}, "status": {"lastRevert": {**base, "result": "Succeeded"}}}).ok
    failed = check({"metadata": {"name": "web"}, "status": {"lastRevert": {**base, "result": "Failed",
                                                                           "message": "SnapshotNotReady: x"}}})
    assert not failed.ok and failed.message == f"revert {rid} Failed: SnapshotNotReady: x"


def test_revert_flags_id_and_power_state():
    vm = vm3()
    p = revert("snapshot-revert web s1 --id r1 --paused", vm, snap())
    assert p.actions[0].body == {"spec": {"revert": {"id": "r1", "snapshot": "s1"}, "powerState": "Paused"}}
    assert "then paused" in p.summary
    stopped = vm3(powerState="Stopped")
    p = revert("snapshot-revert web s1 --id r1", stopped, snap())
    assert "powerState" not in p.actions[0].body["spec"] and "then stopped" in p.summary and not p.note
    assert revert("snapshot-revert web s1 --running", stopped, snap()).actions[0].body["spec"]["powerState"] == \
        "Running"
    assert "powerState" not in revert("snapshot-revert web s1 --running", vm, snap()).actions[0].body["spec"]
    with pytest.raises(Refused, match="exclude each other"):
        revert("snapshot-revert web s1 --running --paused", vm, snap())


@pytest.mark.parametrize(("snapshot", "message"), [
    (snap(vm="db"), "is a snapshot of VM db, not of web"),
    ({**snap(), "status": {**snap()["status"], "vmUid": "uid-old"}}, "SnapshotOfAnotherVM"),
    (snap(phase="Failed"), r"not Ready \(phase Failed"),
    (snap(phase="InProgress"), "SnapshotNotReady"),
    (snap(memory=False, forClone=True), "NotRevertible"),
    ({**snap(), "metadata": {"name": "s1", "deletionTimestamp": "t"}}, "being deleted"),
])
def test_revert_refusals(snapshot, message):
    with pytest.raises(Refused, match=message):
        revert("snapshot-revert web s1", vm3(), snapshot)


def test_a_failed_snapshot_is_refused_with_its_reason():
    failed = snap(phase="Failed")
    failed["status"]["conditions"] = [{"type": "Ready", "status": "False", "reason": "FileExists", "message": "/x"}]
    with pytest.raises(Refused, match=r"phase Failed: FileExists - /x\)"):
        revert("snapshot-revert web s1", vm3(), failed)


def test_restore_finds_the_snapshot_by_its_memory_file():
    saved = snap("sv1", method="Copy", stopAfter=True)
    saved["spec"]["memoryPath"] = f"{IMG}/web.save"
    saved["status"]["memoryFile"] = f"{IMG}/web.save"
    others = [snap("s1"), snap("s2", vm="db"), saved]
    assert s.find_saved(others, f"{IMG}/./web.save") is saved
    with pytest.raises(Refused, match="no VMSnapshot in this namespace holds"):
        s.find_saved(others, f"{IMG}/none.save")
    failed = snap("sv0", phase="Failed")
    failed["status"]["memoryFile"] = f"{IMG}/web.save"
    assert s.find_saved([failed, saved], f"{IMG}/web.save") is saved  # Ready ones first
    twin = {**saved, "metadata": {"name": "sv2"}}
    with pytest.raises(Refused, match="2 snapshots hold"):
        s.find_saved([saved, twin], f"{IMG}/web.save")


# -- list -----------------------------------------------------------------------------------------

def test_snapshot_list_table():
    a = snap("a")
    a["status"].update(creationTime="2026-12-01T15:00:00Z",
                       disks=[{"name": "root", "snapshotFile": f"{IMG}/web.qcow2", "activeFile": f"{IMG}/l.qcow2"}])
    b = {"metadata": {"name": "b", "creationTimestamp": "2026-12-01T16:00:00Z"},
         "spec": {"vmName": "web", "method": "Copy", "memory": True, "stopAfter": True}}
    c = snap("c", phase="Deleting", memory=False, forClone=True)
    c["status"].update(creationTime="2026-12-01T14:00:00Z", memoryFile=None,
                       keptFiles={f"{IMG}/web.qcow2": "backing file of vm/default/clone"},
                       conditions=[{"type": "Ready", "status": "False", "reason": "FilesInUse", "message": "m"}])
    other = snap("z", vm="db")
    lines = [line.split() for line in s.snapshot_table("web", [a, b, c, other]).splitlines()]
    assert lines == [["NAME", "PHASE", "METHOD", "MEMORY", "CREATED", "FILES"],
                     ["c", "Deleting", "External,forClone", "no", "2026-12-01T14:00:00Z", "-"],
                     ["a", "Ready", "External", "yes", "2026-12-01T15:00:00Z", f"memory={IMG}/web.a.mem",
                      f"root={IMG}/web.qcow2"],
                     ["b", "Pending", "Copy,stopAfter", "yes", "-", "-"]]
    wide = s.snapshot_table("web", [c], wide=True).splitlines()
    assert wide[0].split()[-2:] == ["REASON", "KEPT"]
    assert "FilesInUse" in wide[1] and f"{IMG}/web.qcow2 (backing file of vm/default/clone)" in wide[1]


def test_the_list_footer_names_the_last_revert():
    vm = vm3()
    assert s.revert_footer(vm) == ""
    vm["spec"]["revert"] = {"id": "r1", "snapshot": "s1"}
    assert s.revert_footer(vm) == "last revert: id r1, snapshot s1"
    vm["status"] = {"lastRevert": {"id": "r1", "result": "Failed", "message": "boom", "time": "t"}}
    assert s.revert_footer(vm) == "last revert: id r1, snapshot s1: Failed (boom)"


# -- delete ---------------------------------------------------------------------------------------

def test_delete_of_another_vms_snapshot_is_refused():
    assert "delete of snapshot s1 requested" in s.delete_plan("web", snap())
    with pytest.raises(Refused, match="is a snapshot of VM db"):
        s.delete_plan("web", snap(vm="db"))


def test_while_a_delete_is_held_the_kept_files_and_the_reason_are_said_once_each():
    said: list[str] = []
    check = s.deletion_check("s1", said.append)
    held = {"status": {"phase": "Deleting", "keptFiles": {"/a": "backing file of vm/default/clone"},
                       "conditions": [{"type": "Ready", "status": "False", "reason": "FilesInUse",
                                       "message": "a clone uses /a"}]}}
    assert check({"status": {"phase": "Ready"}}) is None and said == []
    assert check(held) is None and check(held) is None
    assert said == ["  s1: kept /a: backing file of vm/default/clone",
                    "  s1: Ready=False FilesInUse: a clone uses /a"]


# -- the examples ---------------------------------------------------------------------------------

EXAMPLES = ["vmsnapshot-memory.yaml", "vmsnapshot-data-disks.yaml", "vmsnapshot-raw-copy.yaml", "vm-clone.yaml",
            "vm-revert.yaml"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_snapshot_examples_fit_the_api(name):
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / name).read_text().replace("@STORAGE@", "/srv"))
            if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "virt.libvirt-operator.io/v1alpha1"
        model = {"VMSnapshot": VMSnapshotSpec, "VirtualMachine": VirtualMachineSpec}[doc["kind"]]
        model.model_validate(doc["spec"])
