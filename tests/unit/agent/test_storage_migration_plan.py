"""agent/migrations/storage_plan.py: what a Storage migration copies and creates, what it refuses, and the
decisions its steps take from the facts, as tables (real files in a temporary storage root: existence and
symlinks are part of the decision)."""

from __future__ import annotations

import os

import pytest

from libvirt_operator.agent.migrations.context import MigrationFailed
from libvirt_operator.agent.migrations.storage_plan import (
    BUSY,
    PIVOTED,
    START,
    WAIT,
    DiskState,
    copy_progress,
    disk_action,
    mirrors,
    ours_from_status,
    plan_storage,
    removal_order,
    walk_old_chain,
)
from libvirt_operator.storage import Chain


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    for d in ("old", "new", "other"):
        (r / d).mkdir(parents=True)
    return r


def touch(*paths) -> None:
    for p in paths:
        open(p, "w").close()


def live(root) -> dict[str, DiskState]:
    """root: leaf over a mid qcow2 over a raw base; data: a plain qcow2; raw: a raw disk; cd is not a file disk."""
    r = str(root)
    return {
        "root": DiskState("root", "vda", Chain.of((f"{r}/old/web-root.s1.qcow2", "qcow2"),
                                                  (f"{r}/old/web-root.qcow2", "qcow2"), (f"{r}/old/base.raw", "raw"))),
        "data": DiskState("data", "vdb", Chain.of((f"{r}/old/web-data.qcow2", "qcow2"))),
        "raw": DiskState("raw", "vdc", Chain.of((f"{r}/old/web-raw.img", "raw"))),
    }


VM_SPEC = {"disks": [{"name": "root", "path": "/x"}, {"name": "data", "path": "/y"}, {"name": "raw", "path": "/z"},
                     {"name": "ro", "path": "/r", "readOnly": True}]}


def plan(root, moves, **kw):
    states = kw.pop("live", None) or live(root)
    return plan_storage(moves, kw.pop("vm_spec", VM_SPEC), states, kw.pop("recorded", {}), (str(root),), **kw)


def test_leaf_over_copies_of_every_backing_file_next_to_the_destination(root):
    r = str(root)
    p = plan(root, [{"name": "root", "destinationPath": f"{r}/new/moved.qcow2"}])
    (d,) = p.disks
    assert d.target == "vda" and d.leaf == f"{r}/new/moved.qcow2" and d.leaf_format == "qcow2"
    assert d.new.paths == (f"{r}/new/moved.qcow2", f"{r}/new/web-root.qcow2", f"{r}/new/base.raw")
    assert [x.format for x in d.new] == ["qcow2", "qcow2", "raw"]
    # the middle copy's header names the base's copy; the base has none; bases come first
    assert [(c.source, c.dest, c.backing, c.backing_format) for c in p.copies] == [
        (f"{r}/old/base.raw", f"{r}/new/base.raw", None, ""),
        (f"{r}/old/web-root.qcow2", f"{r}/new/web-root.qcow2", f"{r}/new/base.raw", "raw")]
    assert d.old_files == d.old.paths
    assert d.status() == {"name": "root", "sourceFile": f"{r}/old/web-root.s1.qcow2",
                          "destinationFile": f"{r}/new/moved.qcow2",
                          "copiedFiles": [f"{r}/new/web-root.qcow2", f"{r}/new/base.raw"]}
    assert p.made == (f"{r}/new/base.raw", f"{r}/new/web-root.qcow2", f"{r}/new/moved.qcow2")


@pytest.mark.parametrize(("disk", "fmt"), [("data", "qcow2"), ("raw", "raw")])
def test_a_disk_without_backing_gets_an_empty_leaf_of_its_own_format_and_no_copies(root, disk, fmt):
    p = plan(root, [{"name": disk, "destinationPath": f"{root}/new/x"}])
    (d,) = p.disks
    assert d.parent is None and d.leaf_format == fmt and d.copies == () and p.copies == ()
    assert d.new.paths == (f"{root}/new/x",)


def test_a_backing_file_already_in_the_destination_directory_stays_with_everything_below_it(root):
    r = str(root)
    p = plan(root, [{"name": "root", "destinationPath": f"{r}/old/moved.qcow2"}])
    (d,) = p.disks
    assert d.copies == () and d.new.paths == (f"{r}/old/moved.qcow2", f"{r}/old/web-root.qcow2", f"{r}/old/base.raw")
    assert d.old_files == (f"{r}/old/web-root.s1.qcow2",)


def test_two_disks_over_one_backing_file_share_its_copy(root):
    r = str(root)
    states = {"a": DiskState("a", "vda", Chain.of((f"{r}/old/a.qcow2", "qcow2"), (f"{r}/old/base.raw", "raw"))),
              "b": DiskState("b", "vdb", Chain.of((f"{r}/old/b.qcow2", "qcow2"), (f"{r}/old/base.raw", "raw")))}
    p = plan(root, [{"name": "a", "destinationPath": f"{r}/new/a.qcow2"},
                    {"name": "b", "destinationPath": f"{r}/new/b.qcow2"}], live=states, vm_spec={})
    assert [c.dest for c in p.copies] == [f"{r}/new/base.raw"]
    assert [d.parent.path for d in p.disks] == [f"{r}/new/base.raw"] * 2


@pytest.mark.parametrize(("moves", "files", "reason"), [
    ([], [], "DiskNotFound"),
    ([{"name": "nope", "destinationPath": "{r}/new/x"}], [], "DiskNotFound"),
    ([{"name": "cd", "destinationPath": "{r}/new/x"}], [], "DiskNotFound"),  # not a file-backed disk
    ([{"name": "data", "destinationPath": "{r}/new/x"}, {"name": "data", "destinationPath": "{r}/new/y"}], [],
     "DuplicateDisk"),
    ([{"name": "data", "destinationPath": "/etc/x.qcow2"}], [], "PathNotAllowed"),
    ([{"name": "data", "destinationPath": "relative.qcow2"}], [], "PathNotAllowed"),
    ([{"name": "data", "destinationPath": "{r}/new/../../escape.qcow2"}], [], "PathNotAllowed"),
    ([{"name": "data", "destinationPath": "{r}/link/x.qcow2"}], [], "PathNotAllowed"),  # a symlink out of the roots
    ([{"name": "data", "destinationPath": "{r}/missing/x.qcow2"}], [], "DirectoryNotFound"),
    ([{"name": "data", "destinationPath": "{r}/old/web-data.qcow2"}], [], "SamePath"),
    ([{"name": "data", "destinationPath": "{r}/old/base.raw"}], ["old/base.raw"], "FileExists"),  # another's file
    ([{"name": "data", "destinationPath": "{r}/new/taken"}], ["new/taken"], "FileExists"),
    ([{"name": "root", "destinationPath": "{r}/new/x"}], ["new/base.raw"], "FileExists"),  # a parent copy's path
    ([{"name": "data", "destinationPath": "{r}/new/x"}, {"name": "raw", "destinationPath": "{r}/new/x"}], [],
     "FileExists"),  # planned twice
    ([{"name": "data", "destinationPath": "{r}/new/web-root.qcow2"}, {"name": "root", "destinationPath": "{r}/new/y"}],
     [], "FileExists"),  # one disk's leaf would be another's parent copy
])
def test_refusals(root, tmp_path, moves, files, reason):
    r = str(root)
    touch(*(f"{r}/{f}" for f in files))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, f"{r}/link")
    moves = [{k: v.format(r=r) for k, v in m.items()} for m in moves]
    with pytest.raises(MigrationFailed) as err:
        plan(root, moves)
    assert err.value.reason == reason, err.value


def test_read_only_and_drifted_and_unsupported_format(root):
    r = str(root)
    states = {**live(root), "ro": DiskState("ro", "vdd", Chain.of((f"{r}/old/ro.qcow2", "qcow2"))),
              "v": DiskState("v", "vde", Chain.of((f"{r}/old/v.vmdk", "vmdk")))}
    for name, reason, recorded in (("ro", "DiskReadOnly", {}), ("v", "UnsupportedFormat", {}),
                                   ("data", "DiskDrifted", {"data": Chain.of((f"{r}/old/elsewhere.qcow2", "qcow2"))})):
        with pytest.raises(MigrationFailed) as err:
            plan(root, [{"name": name, "destinationPath": f"{r}/new/x"}], live=states, recorded=recorded)
        assert err.value.reason == reason
    # a record on the file the disk runs on is fine
    plan(root, [{"name": "data", "destinationPath": f"{r}/new/x"}], live=states,
         recorded={"data": Chain.of((f"{r}/old/web-data.qcow2", "qcow2"))})


def test_files_of_an_earlier_interrupted_run_are_ours(root):
    r = str(root)
    moves = [{"name": "root", "destinationPath": f"{r}/new/moved.qcow2"}]
    first = plan(root, moves)
    status = {"disks": first.status_disks()}
    touch(f"{r}/new/moved.qcow2", f"{r}/new/base.raw")
    with pytest.raises(MigrationFailed):
        plan(root, moves)
    assert ours_from_status(status) == {f"{r}/new/moved.qcow2", f"{r}/new/web-root.qcow2", f"{r}/new/base.raw"}
    assert plan(root, moves, ours=ours_from_status(status)) == first
    assert ours_from_status({}) == set()
    assert ours_from_status({"disks": [{"name": "x", "copiedFiles": ["rel"]}]}) == set()


LIVE_XML = """<domain><devices>
<disk type='file' device='disk'><source file='/i/a.qcow2'/><target dev='vda'/>
  <mirror type='file' job='copy' ready='yes'><format type='qcow2'/><source file='/i/new/../new/a.qcow2'/>
  </mirror></disk>
<disk type='file' device='disk'><source file='/i/b.qcow2'/><target dev='vdb'/>
  <mirror type='file' file='/i/b2.qcow2' job='copy'/></disk>
<disk type='file' device='disk'><source file='/i/c.qcow2'/><target dev='vdc'/></disk>
</devices></domain>"""


def test_mirrors_from_the_live_xml():
    assert mirrors(LIVE_XML) == {"vda": ("/i/new/a.qcow2", True), "vdb": ("/i/b2.qcow2", False)}


@pytest.mark.parametrize(("active", "job", "mirror", "action"), [
    ("/n/leaf", None, None, PIVOTED),
    ("/n/leaf", "copy", "/n/leaf", PIVOTED),
    ("/o/leaf", None, None, START),
    ("/o/leaf", "copy", "/n/leaf", WAIT),
    ("/o/leaf", "copy", "/elsewhere", BUSY),
    ("/o/leaf", "active-commit", None, BUSY),
    ("/o/leaf", "pull", None, BUSY),
])
def test_disk_action(active, job, mirror, action):
    assert disk_action("/n/leaf", active, job, mirror) == action


def test_removal_order_is_base_first_without_the_files_in_use():
    assert removal_order(["/o/leaf", "/o/mid", "/o/base"], keep=["/o/base"]) == ["/o/mid", "/o/leaf"]
    assert removal_order(["/o/leaf"], keep=[]) == ["/o/leaf"]
    assert removal_order([], keep=["/x"]) == []


def test_walk_old_chain_finds_what_a_base_first_cleanup_left():
    headers = {"/o/leaf": "/o/mid", "/o/mid": "/o/base", "/o/base": None}
    present = set(headers)

    def backing_of(path):
        return headers[path] if path in present else None

    assert walk_old_chain("/o/leaf", backing_of, stop=[]) == ["/o/leaf", "/o/mid", "/o/base"]
    assert walk_old_chain("/o/leaf", backing_of, stop=["/o/base"]) == ["/o/leaf", "/o/mid"]  # kept in place
    for gone in removal_order(["/o/leaf", "/o/mid", "/o/base"], keep=[])[:1]:  # killed after the base went
        present.discard(gone)
    assert walk_old_chain("/o/leaf", backing_of, stop=[]) == ["/o/leaf", "/o/mid", "/o/base"]  # base: gone, harmless
    present.discard("/o/mid")
    assert walk_old_chain("/o/leaf", backing_of, stop=[]) == ["/o/leaf", "/o/mid"]
    headers["/o/loop"] = "/o/loop"
    present.add("/o/loop")
    assert walk_old_chain("/o/loop", backing_of, stop=[]) == ["/o/loop"]


@pytest.mark.parametrize(("jobs", "pending", "expected"), [
    ([], 0, {"dataTotalBytes": 0, "dataProcessedBytes": 0, "dataRemainingBytes": 0}),
    ([(0, 0)], 0, {"percent": 100, "dataTotalBytes": 0, "dataProcessedBytes": 0, "dataRemainingBytes": 0}),
    ([(50, 100)], 0, {"percent": 50, "dataTotalBytes": 100, "dataProcessedBytes": 50, "dataRemainingBytes": 50}),
    ([(100, 100), (0, 300)], 0, {"percent": 25, "dataTotalBytes": 400, "dataProcessedBytes": 100,
                                 "dataRemainingBytes": 300}),
    ([(100, 100)], 100, {"percent": 50, "dataTotalBytes": 200, "dataProcessedBytes": 100, "dataRemainingBytes": 100}),
    ([(120, 100)], 0, {"percent": 100, "dataTotalBytes": 100, "dataProcessedBytes": 120, "dataRemainingBytes": 0}),
])
def test_copy_progress(jobs, pending, expected):
    assert copy_progress(jobs, pending) == expected
