"""Host paths in a spec must resolve under the storage roots, symlinks included."""

from pathlib import Path

from libvirt_operator.agent.storage import missing_files, outside_roots
from libvirt_operator.api.virtualmachine import VirtualMachineSpec


def spec(**disks):
    return VirtualMachineSpec.model_validate({
        "memory": {"size": "64Mi"},
        "disks": [{"name": n, "path": p} for n, p in disks.items()],
    })


def test_paths_inside_roots_pass(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    assert outside_roots(spec(root=str(root / "a.qcow2")), (root,)) == []


def test_dotdot_and_symlink_escapes_are_caught(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    problems = outside_roots(spec(a=str(root / ".." / "x.qcow2"), b=str(root / "escape" / "passwd")), (root,))
    assert len(problems) == 2
    assert "disks[a].path" in problems[0] and "outside the storage roots" in problems[0]


def test_missing_files_are_named(tmp_path):
    (tmp_path / "there.qcow2").write_bytes(b"")
    problems = missing_files(spec(a=str(tmp_path / "there.qcow2"), b=str(tmp_path / "gone.qcow2")))
    assert problems == [f"disks[b].path {str(Path(tmp_path / 'gone.qcow2'))!r} does not exist"]
