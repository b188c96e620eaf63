"""``<domainsnapshot>``: the XML of an external snapshot (snapshotCreateXML).

    <domainsnapshot>
      <name>s1</name>
      <memory snapshot='external' file='/img/web.s1.mem'/>      (or snapshot='no' for disk-only)
      <disks>
        <disk name='vda' snapshot='external' type='file'>
          <driver type='qcow2'/>
          <source file='/img/web.s1.qcow2'/>                  (the new leaf the VM runs on)
        </disk>
        <disk name='sda' snapshot='no'/>
      </disks>
    </domainsnapshot>
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

from libvirt_operator.domain.xmlbase import Attr, Children, Text, XMLElement, parse_element


class SnapshotDisk(XMLElement):
    TAG = "disk"
    CHILD_ORDER = ("driver", "source")

    name = Attr("name")  # the domain disk's target (vda) or source path
    snapshot = Attr("snapshot")  # external | no | internal | manual
    type = Attr("type")  # file
    driver_type = Attr("type", path="driver")  # the overlay's format: qcow2
    source_file = Attr("file", path="source")  # the overlay (new leaf)


class DomainSnapshot(XMLElement):
    TAG = "domainsnapshot"
    CHILD_ORDER = ("name", "description", "state", "creationTime", "memory", "disks", "domain")

    name = Text("name")
    description = Text("description")
    memory_snapshot = Attr("snapshot", path="memory")  # external | no | internal
    memory_file = Attr("file", path="memory")
    disks = Children(SnapshotDisk, path="disks")

    def disk(self, name: str) -> SnapshotDisk | None:
        return self.disks.find(lambda d: d.name == name)

    @property
    def overlays(self) -> dict[str, str]:
        """{disk name: overlay file} of the disks taken externally."""
        return {d.name: d.source_file for d in self.disks if d.snapshot == "external" and d.source_file}


def external_snapshot(overlays: Mapping[str, str], memory_file: str | None = None, *,
                      skip: Iterable[str] = (), name: str | None = None) -> DomainSnapshot:
    """A snapshot of the disks in `overlays` ({target: new leaf file}, qcow2), with the memory saved to
    `memory_file` (None: disk-only, memory snapshot='no'); the disks in `skip` are named snapshot='no'
    (libvirt would otherwise apply its default to them)."""
    skip = [target for target in skip if target not in overlays]
    if not overlays:
        raise ValueError("an external snapshot needs at least one disk")
    snap = DomainSnapshot(name=name)
    if memory_file is not None:
        snap.memory_snapshot, snap.memory_file = "external", memory_file
    else:
        snap.memory_snapshot = "no"
    for target, path in overlays.items():
        snap.disks.append(SnapshotDisk(name=target, snapshot="external", type="file", driver_type="qcow2",
                                       source_file=path))
    for target in skip:
        snap.disks.append(SnapshotDisk(name=target, snapshot="no"))
    return snap


def retarget_disks(domain_xml: str, leaves: Mapping[str, str], fmt: str = "qcow2") -> str:
    """`domain_xml` with each disk in `leaves` ({target: file}) pointed at its new file of format `fmt`
    and its <backingStore> dropped (libvirt reads the chain from the file itself). For a revert: the
    XML embedded in a memory snapshot names the pre-snapshot files, which are now backing files; a
    restore must run on new leaves over them. KeyError names a target the XML lacks."""
    root = parse_element(domain_xml)
    missing = set(leaves)
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in leaves:
            continue
        missing.discard(dev)
        disk.set("type", "file")
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", fmt)
        source = disk.find("source")
        if source is None:
            source = ET.Element("source")
            disk.insert(list(disk).index(driver) + 1, source)
        for attr in ("dev", "dir", "pool", "volume", "index"):
            source.attrib.pop(attr, None)
        source.set("file", leaves[dev])
        for store in disk.findall("backingStore"):
            disk.remove(store)
    if missing:
        raise KeyError(f"the domain has no disk {', '.join(sorted(missing))}")
    return ET.tostring(root, encoding="unicode")
