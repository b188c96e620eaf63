"""attach/detach-disk, attach/detach-interface, change-media, blockresize: spec.disks and
spec.interfaces edits, each element edit guarded by a test of the element, and the refusals."""

from __future__ import annotations

import copy

import jsonpatch
import pytest
from virsh_cases import applied_status, apply, make_vm, plan

from libvirt_operator.cli.plan import Refused

IMG = "/var/lib/libvirt/images"


def test_attach_disk_appends_with_defaults_from_the_target():
    vm = make_vm()
    p = plan(f"attach-disk web {IMG}/data.qcow2 vdb", vm)
    after = apply(vm, p)
    assert after["spec"]["disks"][:2] == vm["spec"]["disks"]
    assert after["spec"]["disks"][2] == {"name": "vdb", "device": "disk", "path": f"{IMG}/data.qcow2",
                                         "bus": "virtio", "target": "vdb"}
    assert p.check(after)(applied_status(after)).ok
    with pytest.raises(jsonpatch.JsonPatchTestFailed):  # guarded by the generation
        apply(make_vm(generation=9), p)


def test_attach_disk_with_every_option():
    vm = make_vm()
    after = apply(vm, plan(f"attach-disk web {IMG}/u.raw sdb --name usb1 --targetbus usb --driver-type raw "
                           "--mode readonly", vm))
    assert after["spec"]["disks"][-1] == {"name": "usb1", "device": "disk", "path": f"{IMG}/u.raw", "bus": "usb",
                                          "target": "sdb", "format": "raw", "readOnly": True}
    after = apply(vm, plan(f"attach-disk web {IMG}/b.iso sdc --type cdrom", vm))
    assert after["spec"]["disks"][-1]["bus"] == "sata" and after["spec"]["disks"][-1]["device"] == "cdrom"
    after = apply(vm, plan(f"attach-disk web {IMG}/s.qcow2 sdd", vm))
    assert after["spec"]["disks"][-1]["bus"] == "scsi"


def test_attach_disk_to_a_vm_without_a_disks_list():
    vm = make_vm()
    del vm["spec"]["disks"]
    after = apply(vm, plan(f"attach-disk web {IMG}/d.qcow2 vda", vm))
    assert [d["name"] for d in after["spec"]["disks"]] == ["vda"]


@pytest.mark.parametrize(("argv", "message"), [
    (f"attach-disk web {IMG}/d.qcow2 vdb --targetbus sata", "does not fit bus sata"),
    (f"attach-disk web {IMG}/d.qcow2 sdb --targetbus virtio", "does not fit bus virtio"),
    (f"attach-disk web {IMG}/d.iso vdc --type cdrom", "a cdrom must be on bus"),
    (f"attach-disk web {IMG}/d.qcow2 xda", "not a disk target"),
    ("attach-disk web d.qcow2 vdb", "absolute host path"),
    (f"attach-disk web {IMG}/d.qcow2 vdb --name root", "already has a disk named 'root'"),
    (f"attach-disk web {IMG}/d.qcow2 vdb --name Data_1", "not a DNS label"),
    (f"attach-disk web {IMG}/web.qcow2 vdb", "already attached as disk 'root'"),
    (f"attach-disk web {IMG}/d.qcow2 vda", "target vda is taken by disk 'root'"),
])
def test_attach_disk_refusals(argv, message):
    vm = make_vm(status={"disks": [{"name": "root", "target": "vda", "bus": "virtio", "device": "disk"}]})
    with pytest.raises(Refused, match=message):
        plan(argv, vm)


def test_detach_disk_by_target_name_or_path_removes_only_that_element():
    vm = make_vm(status={"disks": [{"name": "iso", "target": "sda", "bus": "sata", "device": "cdrom"}]})
    for key in ("sda", "iso", f"{IMG}/a.iso"):
        p = plan(["detach-disk", "web", key], vm)
        after = apply(vm, p)
        assert [d["name"] for d in after["spec"]["disks"]] == ["root"]
        assert p.actions[0].body[0] == {"op": "test", "path": "/spec/disks/1", "value": vm["spec"]["disks"][1]}
    # The element changed meanwhile (another detach moved the list): the patch does not apply.
    moved = copy.deepcopy(vm)
    moved["spec"]["disks"].reverse()
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(moved, plan("detach-disk web iso", vm))


def test_detach_disk_refusals():
    with pytest.raises(Refused, match=r"has no disk 'vdz' \(disks: root"):
        plan("detach-disk web vdz", make_vm())
    only = make_vm(disks=[{"name": "root", "device": "disk", "path": f"{IMG}/r.qcow2"}])
    with pytest.raises(Refused, match="only disk"):
        plan("detach-disk web root", only)
    kernel = make_vm(disks=[{"name": "root", "device": "disk", "path": f"{IMG}/r.qcow2"}],
                     boot={"kernel": {"kernel": f"{IMG}/vmlinuz"}})
    assert apply(kernel, plan("detach-disk web root", kernel))["spec"]["disks"] == []


def test_change_media_update_insert_eject():
    vm = make_vm()
    after = apply(vm, plan(f"change-media web iso {IMG}/b.iso", vm))
    assert after["spec"]["disks"][1]["path"] == f"{IMG}/b.iso"
    ejected = apply(after, plan("change-media web iso --eject", after))
    assert "path" not in ejected["spec"]["disks"][1] and ejected["spec"]["disks"][1]["device"] == "cdrom"
    inserted = apply(ejected, plan(f"change-media web iso {IMG}/c.iso --insert", ejected))
    assert inserted["spec"]["disks"][1]["path"] == f"{IMG}/c.iso"
    # --update without a source ejects; on an empty drive it is a no-op
    assert "path" not in apply(inserted, plan("change-media web iso --update", inserted))["spec"]["disks"][1]
    assert plan("change-media web iso", ejected).actions == []
    assert plan(f"change-media web iso {IMG}/a.iso", vm).actions == []  # already holds it


@pytest.mark.parametrize(("argv", "message"), [
    (f"change-media web root {IMG}/b.iso", "not a cdrom"),
    (f"change-media web iso {IMG}/b.iso --insert", "already has media"),
    ("change-media web iso --insert", "--insert needs a SOURCE"),
    (f"change-media web iso {IMG}/b.iso --eject", "--eject takes no SOURCE"),
    ("change-media web iso --eject --update", "one of --eject"),
    ("change-media web iso b.iso", "absolute host path"),
    ("change-media web hdc --eject", "has no disk 'hdc'"),
])
def test_change_media_refusals(argv, message):
    with pytest.raises(Refused, match=message):
        plan(argv, make_vm())
    empty = make_vm()
    del empty["spec"]["disks"][1]["path"]
    with pytest.raises(Refused, match="no media to eject"):
        plan("change-media web iso --eject", empty)


def test_blockresize_grows_and_refuses_a_shrink_with_the_safe_way():
    vm = make_vm()
    after = apply(vm, plan("blockresize web root 2Gi", vm))
    assert after["spec"]["disks"][0]["size"] == "2Gi"
    assert apply(vm, plan("blockresize web root 3145728", vm))["spec"]["disks"][0]["size"] == "3145728Ki"
    with pytest.raises(Refused, match=r"smaller than disk root's 2Gi: disks never shrink.*virt-resize.*README"):
        plan("blockresize web root 1Gi", after)
    assert plan("blockresize web root 2048Mi", after).actions == []  # the same size


def test_blockresize_judges_a_shrink_by_the_reported_capacity_when_the_spec_has_no_size():
    vm = make_vm(status={"disks": [{"name": "root", "target": "vda", "bus": "virtio", "device": "disk",
                                    "capacityBytes": 2 * 2**30}]})
    with pytest.raises(Refused, match="smaller than disk root's 2Gi"):
        plan("blockresize web vda 1Gi", vm)
    assert apply(vm, plan("blockresize web vda 4Gi", vm))["spec"]["disks"][0]["size"] == "4Gi"


def test_blockresize_refuses_a_cdrom():
    with pytest.raises(Refused, match="is a cdrom"):
        plan("blockresize web iso 1Gi", make_vm())


def test_attach_interface_network_bridge_user_hostdev():
    vm = make_vm()
    after = apply(vm, plan("attach-interface web bridge br0 --mac 52:54:00:AA:BB:CC --model e1000", vm))
    assert after["spec"]["interfaces"][-1] == {"name": "nic1", "type": "bridge", "source": "br0",
                                               "model": "e1000", "mac": "52:54:00:aa:bb:cc"}
    after = apply(after, plan("attach-interface web user", after))
    assert after["spec"]["interfaces"][-1] == {"name": "nic2", "type": "user"}
    after = apply(after, plan("attach-interface web network default --name lan", after))
    assert after["spec"]["interfaces"][-1] == {"name": "lan", "type": "network", "source": "default"}
    after = apply(after, plan("attach-interface web hostdev 0000:03:00.1", after))
    assert after["spec"]["interfaces"][-1] == {"name": "nic3", "type": "hostdev", "pciAddress": "0000:03:00.1"}


@pytest.mark.parametrize(("argv", "message"), [
    ("attach-interface web network", "needs a SOURCE"),
    ("attach-interface web user default", "takes no SOURCE"),
    ("attach-interface web network default --mac 52:54:00:00:00:01", "already used by interface 'nic0'"),
    ("attach-interface web network default --mac 52-54-00-00-00-02", "not a MAC address"),
    ("attach-interface web network default --name nic0", "already has an interface named 'nic0'"),
    ("attach-interface web hostdev 03:00.1", "not a PCI address"),
    ("attach-interface web hostdev 0000:03:00.1 --model virtio", "has no model"),
])
def test_attach_interface_refusals(argv, message):
    with pytest.raises(Refused, match=message):
        plan(argv, make_vm())


def test_detach_interface_by_type_mac_or_name():
    vm = make_vm(interfaces=[
        {"name": "nic0", "type": "network", "source": "default", "model": "virtio", "mac": "52:54:00:00:00:01"},
        {"name": "nic1", "type": "network", "source": "other", "model": "virtio"},
        {"name": "nic2", "type": "user", "model": "virtio"}],
        status={"interfaces": [{"name": "nic1", "type": "network", "mac": "52:54:00:00:00:02"}]})
    after = apply(vm, plan("detach-interface web user", vm))
    assert [i["name"] for i in after["spec"]["interfaces"]] == ["nic0", "nic1"]
    # the MAC the agent reports counts for an interface whose spec has none
    after = apply(vm, plan("detach-interface web network --mac 52:54:00:00:00:02", vm))
    assert [i["name"] for i in after["spec"]["interfaces"]] == ["nic0", "nic2"]
    after = apply(vm, plan("detach-interface web network --name nic0", vm))
    assert [i["name"] for i in after["spec"]["interfaces"]] == ["nic1", "nic2"]
    with pytest.raises(Refused, match=r"2 interfaces of type network .*--mac or --name"):
        plan("detach-interface web network", vm)
    with pytest.raises(Refused, match="no interface of type bridge"):
        plan("detach-interface web bridge", vm)
    with pytest.raises(Refused, match="with MAC 52:54:00:00:00:09"):
        plan("detach-interface web network --mac 52:54:00:00:00:09", vm)
    with pytest.raises(Refused, match="not both"):
        plan("detach-interface web network --mac 52:54:00:00:00:01 --name nic0", vm)


def test_attach_disk_knows_the_targets_the_agent_will_assign():
    """Disks without a target and not yet reported get theirs by bus order: vda is root's."""
    with pytest.raises(Refused, match="target vda is taken by disk 'root'"):
        plan(f"attach-disk web {IMG}/d.qcow2 vda", make_vm())
    with pytest.raises(Refused, match="target sda is taken by disk 'iso'"):
        plan(f"attach-disk web {IMG}/d.qcow2 sda --targetbus sata", make_vm())
    assert [d["name"] for d in apply(make_vm(), plan("detach-disk web sda", make_vm()))["spec"]["disks"]] == ["root"]
