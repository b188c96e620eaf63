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

from collections.abc import Iterable, Mapping

from libvirt_operator.domain.xmlbase import Attr, Children, Text, XMLElement


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
