"""Disk image files on a node: chains of qcow2 overlays (chain), qemu-img operations confined to
the storage roots (images), and which files something still needs (references).

Imports the standard library only; never libvirt, kubernetes or the domain layer.
"""

from libvirt_operator.storage.chain import Chain, Layer, chain_from_qemu_img, chains_from_domain_xml
from libvirt_operator.storage.errors import StorageError
from libvirt_operator.storage.references import References

__all__ = ["Chain", "Layer", "References", "StorageError", "chain_from_qemu_img", "chains_from_domain_xml"]
