"""The operator's own ``<metadata>`` child: which VirtualMachine a domain renders.

An agent lists its domains after a restart and recognises its own by this
element; comparing ``config_hash`` with that of a fresh rendering tells
whether the domain's definition is stale (``generation`` alone cannot: many
spec changes, e.g. powerState, do not touch the domain).
"""

from __future__ import annotations

import copy
import hashlib
import json
import xml.etree.ElementTree as ET

from libvirt_operator.domain.xmlbase import IntText, Text, XMLElement, canonical_xml
from libvirt_operator.storage.chain import Chain

NAMESPACE = "https://virt.libvirt-operator.io/domain/v1alpha1"
PREFIX = "lvo"
ET.register_namespace(PREFIX, NAMESPACE)


def _q(tag: str) -> str:
    return f"{{{NAMESPACE}}}{tag}"


class OperatorMetadata(XMLElement):
    """``<lvo:vm>``. Also readable and writable alone through virDomainGetMetadata /
    SetMetadata(VIR_DOMAIN_METADATA_ELEMENT, uri=NAMESPACE, key=PREFIX), which
    exchange the element without its namespace: see from_api_xml / to_api_xml."""

    TAG = _q("vm")
    CHILD_ORDER = tuple(map(_q, ("namespace", "name", "uid", "generation", "configHash", "bootFields", "disks",
                                        "diskOrigins")))

    vm_namespace = Text(_q("namespace"))
    vm_name = Text(_q("name"))
    vm_uid = Text(_q("uid"))
    generation = IntText(_q("generation"))  # metadata.generation of the spec rendered
    config_hash = Text(_q("configHash"))
    # JSON of the spec fields that only a (re)start applies; in the live XML: those it booted with.
    boot_fields_json = Text(_q("bootFields"))
    # JSON {disk name: [{"path", "format"}, ...]}: each disk's chain, the active file first.
    disks_json = Text(_q("disks"))
    # JSON {disk name: spec path}: a disk whose files a migration moved; its chain stands for that spec path.
    disk_origins_json = Text(_q("diskOrigins"))

    @property
    def boot_fields(self) -> dict:
        return json.loads(self.boot_fields_json) if self.boot_fields_json else {}

    @boot_fields.setter
    def boot_fields(self, value: dict) -> None:
        self.boot_fields_json = json.dumps(value, sort_keys=True, separators=(",", ":"))

    @property
    def disks(self) -> dict[str, Chain]:
        """The recorded chain of each file-backed disk, by disk name ({} when none is recorded)."""
        if not self.disks_json:
            return {}
        return {name: Chain.from_list(layers) for name, layers in json.loads(self.disks_json).items()}

    @disks.setter
    def disks(self, value: dict[str, Chain] | None) -> None:
        self.disks_json = (json.dumps({name: chain.to_list() for name, chain in sorted(value.items())},
                                      separators=(",", ":")) if value else None)

    @property
    def disk_origins(self) -> dict[str, str]:
        return json.loads(self.disk_origins_json) if self.disk_origins_json else {}

    @disk_origins.setter
    def disk_origins(self, value: dict[str, str] | None) -> None:
        self.disk_origins_json = json.dumps(dict(sorted(value.items())), separators=(",", ":")) if value else None

    @classmethod
    def from_api_xml(cls, text: str) -> OperatorMetadata:
        """Parses what virDomainGetMetadata returns (``<vm><name>..``, no namespace)."""
        root = ET.fromstring(text)
        for node in root.iter():
            if not node.tag.startswith("{"):
                node.tag = _q(node.tag)
        return cls(root)

    def to_api_xml(self) -> str:
        """The element as virDomainSetMetadata wants it (libvirt adds the namespace)."""
        plain = copy.deepcopy(self.element)
        for node in plain.iter():
            node.tag = node.tag.removeprefix(f"{{{NAMESPACE}}}")
        return ET.tostring(plain, encoding="unicode")


def config_hash(domain: ET.Element) -> str:
    """sha256 of a domain's canonical XML without the operator metadata (which holds the hash)."""
    stripped = copy.deepcopy(domain)
    for holder in stripped.iter("metadata"):
        for own in holder.findall(OperatorMetadata.TAG):
            holder.remove(own)
    return "sha256:" + hashlib.sha256(canonical_xml(stripped).encode()).hexdigest()
