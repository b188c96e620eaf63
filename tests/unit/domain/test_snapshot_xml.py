"""<domainsnapshot> element classes: what the hypervisor layer sends to snapshotCreateXML."""

import xml.etree.ElementTree as ET

import pytest

from libvirt_operator.domain.snapshot import DomainSnapshot, SnapshotDisk, external_snapshot, retarget_disks
from libvirt_operator.domain.xmlbase import canonical_xml

# The shape libvirt documents (and prints back in snapshot XML), with parts we do not model.
WITH_MEMORY = """<domainsnapshot>
  <name>s1</name>
  <description>before the upgrade</description>
  <memory snapshot='external' file='/img/web.s1.mem'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/img/web.s1.qcow2'><seclabel model='dac' relabel='no'/></source>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
</domainsnapshot>"""


def test_parse_reads_every_modelled_part():
    snap = DomainSnapshot.from_xml(WITH_MEMORY)
    assert (snap.name, snap.description, snap.memory_snapshot, snap.memory_file) == (
        "s1", "before the upgrade", "external", "/img/web.s1.mem")
    vda, vdb = snap.disks
    assert (vda.name, vda.snapshot, vda.type, vda.driver_type, vda.source_file) == (
        "vda", "external", "file", "qcow2", "/img/web.s1.qcow2")
    assert (vdb.name, vdb.snapshot, vdb.source_file) == ("vdb", "no", None)
    assert snap.overlays == {"vda": "/img/web.s1.qcow2"}
    assert snap.disk("vdb").snapshot == "no" and snap.disk("vdz") is None


def test_round_trip_keeps_everything_including_unmodelled_children():
    text = DomainSnapshot.from_xml(WITH_MEMORY).to_xml()
    assert canonical_xml(text) == canonical_xml(WITH_MEMORY)
    assert DomainSnapshot.from_xml(text).to_xml() == text


def test_built_snapshot_equals_the_documented_shape():
    snap = external_snapshot({"vda": "/img/web.s1.qcow2"}, "/img/web.s1.mem", skip=["vdb"], name="s1")
    snap.description = "before the upgrade"
    expected = DomainSnapshot.from_xml(WITH_MEMORY)
    expected.disks[0].element.find("source").clear()  # drop the seclabel and the file
    expected.disks[0].source_file = "/img/web.s1.qcow2"
    assert canonical_xml(snap.to_xml()) == canonical_xml(expected.to_xml())


def test_disk_only_snapshot_says_memory_no_and_skips_given_targets_once():
    snap = external_snapshot({"vdb": "/img/data.s1.qcow2"}, skip=["vda", "vdb", "sda"])
    assert snap.memory_snapshot == "no" and snap.memory_file is None
    assert [(d.name, d.snapshot) for d in snap.disks] == [("vdb", "external"), ("vda", "no"), ("sda", "no")]
    assert snap.name is None and "<name" not in snap.to_xml()
    again = DomainSnapshot.from_xml(snap.to_xml())
    assert again.overlays == {"vdb": "/img/data.s1.qcow2"}


def test_children_are_written_in_libvirts_order():
    disk = SnapshotDisk(source_file="/x.qcow2")
    disk.driver_type = "qcow2"
    assert [child.tag for child in disk.element] == ["driver", "source"]
    snap = DomainSnapshot()
    snap.disks.append(disk)
    snap.memory_file = "/x.mem"
    snap.name = "n"
    assert [child.tag for child in snap.element] == ["name", "memory", "disks"]


def test_a_snapshot_needs_a_disk():
    with pytest.raises(ValueError, match="at least one disk"):
        external_snapshot({}, "/img/m")


SAVED_DOMAIN = """<domain type='qemu'>
  <name>web</name>
  <metadata><lvo:vm xmlns:lvo="https://libvirt-operator.io/xmlns/vm/1" name="web"/></metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/img/web.raw' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-disk-root'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def test_retarget_points_disks_at_new_leaves_and_drops_their_backing_store():
    out = retarget_disks(SAVED_DOMAIN, {"vda": "/img/web.r1.qcow2"})
    root = ET.fromstring(out)
    vda, vdb = root.iterfind("./devices/disk")
    assert vda.find("source").attrib == {"file": "/img/web.r1.qcow2"}
    assert vda.find("driver").attrib == {"name": "qemu", "type": "qcow2"}
    assert vda.find("backingStore") is None and vda.find("alias").get("name") == "ua-disk-root"
    assert [c.tag for c in vda] == ["driver", "source", "target", "alias"]
    assert ET.tostring(vdb) == ET.tostring(ET.fromstring(SAVED_DOMAIN).findall("./devices/disk")[1])
    assert "<lvo:vm" in out  # foreign namespaces keep their prefix


def test_retarget_refuses_an_unknown_target():
    with pytest.raises(KeyError, match="vdz"):
        retarget_disks(SAVED_DOMAIN, {"vdz": "/img/x.qcow2"})
