"""Checks a spec must pass on this node before anything of it reaches libvirt.

Each returns problems with a condition reason; none of them touches a domain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from libvirt_operator.agent import storage
from libvirt_operator.api.virtualmachine import VirtualMachineSpec


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase condition reason
    message: str


def paths(spec: VirtualMachineSpec, roots: tuple[Path, ...], moved: frozenset[str] = frozenset()) -> Problem | None:
    """Every host path under a storage root, and present; `moved`: disks a migration moved off their spec
    path (their recorded files count, not the spec's)."""
    if moved:
        spec = spec.model_copy(update={"disks": [d for d in spec.disks if d.name not in moved]})
    outside = storage.outside_roots(spec, roots)
    if outside:
        return Problem("PathNotAllowed", "; ".join(outside))
    missing = storage.missing_files(spec)
    if missing:
        return Problem("FileNotFound", "; ".join(missing))
    return None


def host_devices(spec: VirtualMachineSpec, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> dict[str, str]:
    """Passed-through devices this host cannot provide: spec field -> why. The VM runs without them."""
    missing: dict[str, str] = {}
    vfio = (dev / "vfio" / "vfio").exists()
    pci = [(f"interfaces[{n.name}]", n.pci_address) for n in spec.interfaces if n.type == "hostdev"]
    pci += [(f"hostDevices[{h.name}]", h.address) for h in spec.host_devices if h.type == "pci"]
    for field, address in pci:
        if not (sysfs / "bus" / "pci" / "devices" / address).exists():
            missing[field] = f"PCI device {address} does not exist on this node"
        elif not vfio:
            missing[field] = f"PCI device {address}: this node has no VFIO (/dev/vfio/vfio) for passthrough"
    present = _usb_ids(sysfs)
    for h in spec.host_devices:
        if h.type == "usb" and (h.vendor, h.product) not in present:
            missing[f"hostDevices[{h.name}]"] = f"no USB device {h.vendor}:{h.product} on this node"
    return missing


def _usb_ids(sysfs: Path) -> set[tuple[str, str]]:
    ids = set()
    root = sysfs / "bus" / "usb" / "devices"
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            vendor = (entry / "idVendor").read_text().strip()
            product = (entry / "idProduct").read_text().strip()
        except OSError:
            continue
        ids.add((f"0x{vendor}", f"0x{product}"))
    return ids


def without(spec: VirtualMachineSpec, fields: set[str]) -> VirtualMachineSpec:
    """The spec minus the host devices named by ``fields`` (what the node can run now)."""
    if not fields:
        return spec
    return spec.model_copy(update={
        "interfaces": [n for n in spec.interfaces if f"interfaces[{n.name}]" not in fields],
        "host_devices": [h for h in spec.host_devices if f"hostDevices[{h.name}]" not in fields],
    })
