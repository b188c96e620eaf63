import pytest

from libvirt_operator.domain.errors import RenderError
from libvirt_operator.domain.targets import assign_targets, target_index, target_name


@pytest.mark.parametrize(("index", "name"), [(0, "vda"), (1, "vdb"), (25, "vdz"), (26, "vdaa"), (27, "vdab"),
                                             (701, "vdzz")])
def test_names_follow_libvirts_scheme(index, name):
    assert target_name("vd", index) == name
    assert target_index(name) == ("vd", index)


def test_target_index_rejects_garbage():
    with pytest.raises(ValueError):
        target_index("nvme0")


def test_assigned_per_prefix_in_order():
    disks = [("virtio", None), ("sata", None), ("virtio", None), ("scsi", None), ("usb", None), ("ide", None)]
    assert assign_targets(disks) == ["vda", "sda", "vdb", "sdb", "sdc", "hda"]


def test_explicit_targets_are_kept_and_skipped():
    disks = [("virtio", None), ("virtio", "vda"), ("virtio", None), ("sata", "sdb"), ("scsi", None), ("scsi", None)]
    assert assign_targets(disks) == ["vdb", "vda", "vdc", "sdb", "sda", "sdc"]


def test_explicit_target_must_fit_the_bus():
    with pytest.raises(RenderError, match="does not fit bus 'virtio'"):
        assign_targets([("virtio", "sda")])


def test_explicit_targets_must_be_unique():
    with pytest.raises(RenderError, match="used twice"):
        assign_targets([("sata", "sda"), ("scsi", "sda")])
