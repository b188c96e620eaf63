"""agent/snapshots/plan.py: which disks a snapshot takes, the paths it generates and what it refuses,
as tables (real files in a temporary storage root: existence and symlinks are part of the decision)."""

from __future__ import annotations

import os

import pytest

from libvirt_operator.agent.snapshots.plan import (
    DiskState,
    Refusal,
    plan_clone,
    plan_create,
    plan_revert,
    system_disk,
)
from libvirt_operator.storage import Chain


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    r.mkdir()
    (r / "sub").mkdir()
    return r


def vm(root, disks=None, **spec):
    disks = disks if disks is not None else [
        {"name": "root", "path": f"{root}/web-root.qcow2"},
        {"name": "data", "path": f"{root}/web-data.qcow2"},
        {"name": "cd", "device": "cdrom", "path": f"{root}/x.iso"},
        {"name": "ro", "path": f"{root}/ro.qcow2", "readOnly": True},
    ]
    return {"metadata": {"name": "web", "namespace": "default", "uid": "u-1"},
            "spec": {"memory": {"size": "64Mi"}, "disks": disks, **spec}}


def snap(name="s1", status=None, **spec):
    spec.setdefault("vmName", "web")
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec, "status": status or {}}


def states(root, **active):
    """Domain disks by name; `active` overrides a disk's active file (a recorded leaf)."""
    base = {"root": ("vda", f"{root}/web-root.qcow2"), "data": ("vdb", f"{root}/web-data.qcow2")}
    out = {}
    for name, (target, path) in base.items():
        leaf = active.get(name)
        chain = Chain.of((leaf, "qcow2"), (path, "qcow2")) if leaf else Chain.of((path, "qcow2"))
        out[name] = DiskState(name, target, chain)
    return out


@pytest.mark.parametrize("disks,expected", [
    ([{"name": "a", "path": "/x"}, {"name": "b", "path": "/y"}], "a"),
    ([{"name": "c", "device": "cdrom"}, {"name": "b", "path": "/y"}], "b"),
    ([{"name": "a", "path": "/x", "bootOrder": 2}, {"name": "b", "path": "/y", "bootOrder": 1}], "b"),
    ([{"name": "a", "path": "/x"}, {"name": "b", "path": "/y", "bootOrder": 3}], "b"),
    ([{"name": "c", "device": "cdrom"}], None),
])
def test_system_disk(disks, expected):
    assert system_disk({"disks": disks}) == expected


def test_external_with_memory_takes_every_writable_file_disk_with_generated_paths(root):
    plan = plan_create(vm(root), snap(memory=True), states(root), (str(root),), running=True)
    assert [(d.name, d.target, d.file) for d in plan.disks] == [
        ("root", "vda", f"{root}/web-root.s1.qcow2"), ("data", "vdb", f"{root}/web-data.s1.qcow2")]
    assert plan.memory_file == f"{root}/web.s1.mem"
    assert plan.status_disks()[1] == {"name": "data", "target": "vdb", "snapshotFile": f"{root}/web-data.qcow2",
                                      "snapshotFormat": "qcow2", "activeFile": f"{root}/web-data.s1.qcow2",
                                      "created": True}


def test_generated_paths_follow_the_recorded_leaf_not_the_spec_path(root):
    leaf = f"{root}/sub/web-data.s0.qcow2"
    plan = plan_create(vm(root), snap(disks=[{"name": "root", "snapshot": "no"}]), states(root, data=leaf),
                       (str(root),), running=True)
    (d,) = plan.disks
    assert d.file == f"{root}/sub/web-data.s1.qcow2" and d.snapshot_file == leaf and plan.memory_file is None


def test_copy_method_copies_beside_the_disk_in_its_format(root):
    raw = {name: DiskState(name, s.target, Chain.of((s.chain.active.path, "raw"))) for name, s in states(root).items()}
    plan = plan_create(vm(root), snap(method="Copy", memory=True, stopAfter=True), raw, (str(root),), running=True)
    assert plan.disks[0].status() == {
        "name": "root", "target": "vda", "snapshotFile": f"{root}/web-root.s1.copy", "snapshotFormat": "raw",
        "activeFile": f"{root}/web-root.qcow2", "created": False}
    assert plan.stop_after and plan.memory_file == f"{root}/web.s1.mem"


def test_for_clone_takes_the_system_disk_too(root):
    plan = plan_create(vm(root), snap(forClone=True), states(root), (str(root),), running=True)
    assert [d.name for d in plan.disks] == ["root", "data"] and plan.for_clone and plan.memory_file is None


def _exists_link_out(root, tmp_path):
    (root / "out").symlink_to(tmp_path)
    return f"{root}/out/leaf.qcow2"


@pytest.mark.parametrize("case,reason", [
    ("stopped", "VMNotRunning"),
    ("hostdev_memory", "PassthroughDevice"),
    ("system_disk_only", "SystemDiskSnapshot"),
    ("unknown_disk", "DiskNotFound"),
    ("disk_not_in_domain", "DiskNotFound"),
    ("nothing_left", "NoDisks"),
    ("outside_roots", "PathNotAllowed"),
    ("symlink_out", "PathNotAllowed"),
    ("overlay_exists", "FileExists"),
    ("memory_exists", "FileExists"),
    ("reuse_missing", "FileNotFound"),
    ("same_path_twice", "FileExists"),
    ("overlay_is_in_chain", "FileExists"),
])
def test_create_refusals(root, tmp_path, case, reason):
    v, s, d, running = vm(root), snap(memory=True), states(root), True
    if case == "stopped":
        running = False
    elif case == "hostdev_memory":
        v["spec"]["hostDevices"] = [{"name": "gpu", "type": "pci", "address": "0000:01:00.0"}]
    elif case == "system_disk_only":
        s = snap()
    elif case == "unknown_disk":
        s = snap(memory=True, disks=[{"name": "nope"}])
    elif case == "disk_not_in_domain":
        del d["data"]
    elif case == "nothing_left":
        s = snap(memory=True, disks=[{"name": "root", "snapshot": "no"}, {"name": "data", "snapshot": "no"}])
    elif case == "outside_roots":
        s = snap(memory=True, disks=[{"name": "data", "overlayPath": str(tmp_path / "x.qcow2")}])
    elif case == "symlink_out":
        s = snap(memory=True, disks=[{"name": "data", "overlayPath": _exists_link_out(root, tmp_path)}])
    elif case == "overlay_exists":
        (root / "web-data.s1.qcow2").write_bytes(b"x")
    elif case == "memory_exists":
        (root / "web.s1.mem").write_bytes(b"x")
    elif case == "reuse_missing":
        s = snap(memory=True, disks=[{"name": "data", "overlayPath": f"{root}/pre.qcow2", "reuseExisting": True}])
    elif case == "same_path_twice":
        s = snap(memory=True, disks=[{"name": "data", "overlayPath": f"{root}/o.qcow2"},
                                     {"name": "root", "overlayPath": f"{root}/o.qcow2"}])
    elif case == "overlay_is_in_chain":
        s = snap(memory=True, disks=[{"name": "data", "overlayPath": f"{root}/web-data.qcow2"}])
    with pytest.raises(Refusal) as caught:
        plan_create(v, s, d, (str(root),), running=running)
    assert caught.value.reason == reason, caught.value


def test_reuse_existing_is_accepted_when_the_file_exists(root):
    (root / "pre.qcow2").write_bytes(b"")
    plan = plan_create(vm(root), snap(disks=[{"name": "root", "snapshot": "no"},
                                             {"name": "data", "overlayPath": f"{root}/pre.qcow2",
                                              "reuseExisting": True}]),
                       states(root), (str(root),), running=True)
    assert plan.disks[0].reuse and not plan.disks[0].created and plan.disks[0].file == f"{root}/pre.qcow2"


def _ready(root, **spec):
    (root / "web.s1.mem").write_bytes(b"m")
    status = {"phase": "Ready", "vmUid": "u-1", "memoryFile": f"{root}/web.s1.mem", "disks": [
        {"name": "data", "target": "vdb", "snapshotFile": f"{root}/web-data.qcow2", "snapshotFormat": "qcow2",
         "activeFile": f"{root}/web-data.s1.qcow2", "created": True}]}
    (root / "web-data.qcow2").write_bytes(b"d")
    return snap(status=status, memory=True, **spec)


def test_revert_plans_new_leaves_beside_the_snapshot_file(root):
    plan = plan_revert(vm(root), _ready(root), "r/1", states(root, data=f"{root}/web-data.s1.qcow2"), (str(root),))
    (d,) = plan.disks
    assert d.new_file == f"{root}/web-data.s1.r-r-1.qcow2" and d.snapshot_file == f"{root}/web-data.qcow2"
    assert plan.memory_file == f"{root}/web.s1.mem" and plan.leaves == {"vdb": d.new_file}


def test_copy_revert_puts_the_copy_back_on_the_running_file_with_a_safety_copy(root):
    s = _ready(root, method="Copy")
    s["status"]["disks"][0].update(snapshotFile=f"{root}/web-data.qcow2", activeFile=f"{root}/web-data.qcow2")
    (d,) = plan_revert(vm(root), s, "r1", states(root), (str(root),)).disks
    assert d.new_file == f"{root}/web-data.qcow2" and d.safety == f"{root}/web-data.s1.r-r1.safety"


@pytest.mark.parametrize("case,reason", [
    ("other_vm_uid", "SnapshotOfAnotherVM"),
    ("other_vm_name", "SnapshotOfAnotherVM"),
    ("not_ready", "SnapshotNotReady"),
    ("failed", "SnapshotNotReady"),
    ("for_clone", "NotRevertible"),
    ("memory_gone", "FileNotFound"),
    ("snapshot_file_gone", "FileNotFound"),
    ("copy_chain_changed", "ChainChanged"),
    ("disk_gone", "DiskNotFound"),
])
def test_revert_refusals(root, case, reason):
    s, d = _ready(root), states(root)
    if case == "other_vm_uid":
        s["status"]["vmUid"] = "u-2"
    elif case == "other_vm_name":
        s["spec"]["vmName"] = "db"
    elif case == "not_ready":
        s["status"]["phase"] = "InProgress"
    elif case == "failed":
        s["status"]["phase"] = "Failed"
    elif case == "for_clone":
        s["spec"]["forClone"] = True
    elif case == "memory_gone":
        os.unlink(root / "web.s1.mem")
    elif case == "snapshot_file_gone":
        os.unlink(root / "web-data.qcow2")
    elif case == "copy_chain_changed":
        s["spec"]["method"] = "Copy"
        s["status"]["disks"][0]["activeFile"] = f"{root}/web-data.qcow2"
        d = states(root, data=f"{root}/web-data.later.qcow2")
    elif case == "disk_gone":
        del d["data"]
    with pytest.raises(Refusal) as caught:
        plan_revert(vm(root), s, "r1", d, (str(root),))
    assert caught.value.reason == reason, caught.value


def test_clone_leaves_over_the_snapshot_files(root):
    s = _ready(root, forClone=True)
    clone = {"disks": [{"name": "data", "path": f"{root}/web2-data.qcow2"}, {"name": "extra", "path": f"{root}/e"},
                       {"name": "cd", "device": "cdrom"}]}
    (leaf,) = plan_clone(clone, s, (str(root),))
    assert (leaf.name, leaf.path, leaf.backing, leaf.backing_format) == (
        "data", f"{root}/web2-data.qcow2", f"{root}/web-data.qcow2", "qcow2")


@pytest.mark.parametrize("case,reason", [
    ("not_for_clone", "NotForClone"), ("not_ready", "SnapshotNotReady"), ("no_common_disk", "NoDisks"),
    ("own_file", "FileExists"), ("outside", "PathNotAllowed"),
])
def test_clone_refusals(root, tmp_path, case, reason):
    s = _ready(root, forClone=True)
    clone = {"disks": [{"name": "data", "path": f"{root}/web2-data.qcow2"}]}
    if case == "not_for_clone":
        s["spec"]["forClone"] = False
    elif case == "not_ready":
        s["status"]["phase"] = "Failed"
    elif case == "no_common_disk":
        clone["disks"][0]["name"] = "other"
    elif case == "own_file":
        clone["disks"][0]["path"] = f"{root}/web-data.qcow2"
    elif case == "outside":
        clone["disks"][0]["path"] = str(tmp_path / "x.qcow2")
    with pytest.raises(Refusal) as caught:
        plan_clone(clone, s, (str(root),))
    assert caught.value.reason == reason, caught.value


@pytest.mark.parametrize("vm_status,vm_revert,meta,status,expected", [
    ({}, None, {}, {}, "create"),
    ({}, None, {}, {"phase": "InProgress"}, "create"),
    ({}, None, {}, {"phase": "Ready"}, None),
    ({}, None, {}, {"phase": "Failed"}, None),
    ({}, None, {"deletionTimestamp": "t"}, {"phase": "Ready"}, "delete"),
    ({}, None, {}, {"phase": "Deleting"}, "delete"),
    ({"lastRevert": {"id": "r1", "result": "InProgress"}}, {"id": "r1", "snapshot": "s1"}, {}, {"phase": "Ready"},
     "revert"),
    ({"lastRevert": {"id": "r1", "result": "InProgress"}}, {"id": "r1", "snapshot": "other"}, {},
     {"phase": "Ready"}, None),
    ({"lastRevert": {"id": "r1", "result": "Succeeded"}}, {"id": "r1", "snapshot": "s1"}, {}, {"phase": "Ready"},
     None),
])
def test_recover_owes_the_entry_point_the_status_names(vm_status, vm_revert, meta, status, expected):
    from libvirt_operator.agent.snapshots.recover import owed

    vm_obj = {"spec": {"revert": vm_revert} if vm_revert else {}, "status": vm_status}
    snapshot = {"metadata": {"name": "s1", **meta}, "spec": {"vmName": "web"}, "status": status}
    assert owed(vm_obj, snapshot) == expected
