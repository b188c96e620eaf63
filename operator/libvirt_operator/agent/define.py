"""The persistent definition: render the spec (with the disks' recorded chains, agent/disks), (re)define
the domain when it is stale, grow disk images of a domain that is not running."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from libvirt_operator.api.quantity import to_bytes
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import naming
from libvirt_operator.domain.addresses import carry_over_addresses
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.render import render_domain
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.storage.chain import Chain

log = logging.getLogger(__name__)


@dataclass
class Defined:
    guest: Guest
    wanted: DomainConfig  # the render, with the stored definition's addresses carried over
    stored: DomainConfig  # libvirt's persistent definition after this pass
    verb: str | None  # "Defined" / "Redefined" when this pass wrote it


class RenderCache:
    """Rendered XML by what it depends on: a pass that finds the same spec parses, not renders
    (rendering and its canonical-XML hash are the costly part of a pass)."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._xml: dict[tuple, str] = {}

    def render(self, obj: dict, spec: VirtualMachineSpec, *, domain_type: str, console_log: str,
               without: frozenset[str] = frozenset(), disk_chains: Mapping[str, Chain] | None = None,
               disk_origins: Mapping[str, str] | None = None) -> DomainConfig:
        md = obj["metadata"]
        # a changed record renders again
        record = (tuple(sorted((disk_chains or {}).items())), tuple(sorted((disk_origins or {}).items())))
        key = (md["uid"], md.get("generation", 1), domain_type, console_log, without, record)
        text = self._xml.get(key)
        if text is None:
            text = render(obj, spec, domain_type=domain_type, console_log=console_log,
                          disk_chains=disk_chains, disk_origins=disk_origins).to_xml()
            if len(self._xml) >= self._size:
                self._xml.pop(next(iter(self._xml)))
            self._xml[key] = text
        return DomainConfig.from_xml(text)


def render(obj: dict, spec: VirtualMachineSpec, *, domain_type: str, console_log: str,
           disk_chains: Mapping[str, Chain] | None = None,
           disk_origins: Mapping[str, str] | None = None) -> DomainConfig:
    """The domain for this object's spec, its disks on their recorded chains (RenderError on a spec
    no domain can express)."""
    md = obj["metadata"]
    return render_domain(spec, name=naming.default_domain_name(md["namespace"], md["name"]), uuid=md["uid"],
                         namespace=md["namespace"], vm_name=md["name"], generation=md.get("generation", 1),
                         domain_type=domain_type, console_log=console_log, disk_chains=disk_chains,
                         disk_origins=disk_origins)


async def stored_definition(guest: Guest | None) -> DomainConfig | None:
    """libvirt's persistent definition of the guest (None without a guest)."""
    return None if guest is None else DomainConfig.from_xml(await guest.xml(inactive=True))


async def ensure(host: Host, guest: Guest | None, wanted: DomainConfig,
                 stored: DomainConfig | None = None) -> Defined:
    """Defines the domain, or redefines it when its definition was rendered from another spec.
    ``stored``: the guest's persistent definition when the caller has just read it."""
    if guest is not None:
        if stored is None:
            stored = DomainConfig.from_xml(await guest.xml(inactive=True))
        if not stored.is_stale(wanted):
            return Defined(guest, wanted, stored, None)
        carry_over_addresses(wanted, stored)  # devices keep their PCI slots (and guest names)
    verb = "Redefined" if guest is not None else "Defined"
    log.info("%s %s", wanted.name, verb.lower())
    # A VM's first definition is checked against libvirt's schema (renders of every field are, in
    # tests/world); redefining it with a new generation is on the path of every live change.
    guest = await host.define(wanted.to_xml(), validate=guest is None)
    stored = DomainConfig.from_xml(await guest.xml(inactive=True))
    return Defined(guest, wanted, stored, verb)


def wanted_sizes(spec: VirtualMachineSpec) -> dict[str, int]:
    """Disk alias -> bytes, for the disks whose spec sets a size."""
    return {naming.disk_alias(d.name): to_bytes(d.size) for d in spec.disks if d.size and d.device == "disk"}


async def grow_offline(spec: VirtualMachineSpec, chains: Mapping[str, Chain] | None = None) -> list[str]:
    """Grows the images of a domain that is not running up to their spec size (never shrinks);
    returns what was grown. A disk with a recorded chain grows its active file (the guest sees the
    leaf's size; its backing files are read-only)."""
    grown = []
    for disk in spec.disks:
        if not (disk.size and disk.path and disk.device == "disk"):
            continue
        chain = (chains or {}).get(disk.name)
        path, fmt = disk.path, disk.format or "qcow2"
        if chain is not None:
            path, fmt = chain.active.path, chain.active.format or fmt
        want = to_bytes(disk.size)
        have = await asyncio.to_thread(_virtual_size, path)
        if have is not None and want > have:
            await asyncio.to_thread(_resize, path, fmt, want)
            grown.append(f"{disk.name}: {have} -> {want} bytes")
    return grown


def _virtual_size(path: str) -> int | None:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], capture_output=True, text=True)
    return json.loads(out.stdout)["virtual-size"] if out.returncode == 0 else None


def _resize(path: str, fmt: str, size: int) -> None:
    subprocess.run(["qemu-img", "resize", "-f", fmt, path, str(size)], check=True, capture_output=True, text=True)
