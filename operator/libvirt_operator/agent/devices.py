"""Device facts for status, read from the domain's XML (live when running, else the definition)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from libvirt_operator.domain import naming
from libvirt_operator.domain.config import DomainConfig

_MiB = 1024


def memory_text(kib: int) -> str:
    return f"{kib // _MiB}Mi" if kib % _MiB == 0 else f"{kib}Ki"


def backing_chain(disk: ET.Element) -> list[str]:
    """Backing files of a live <disk>, nearest first (libvirt nests <backingStore>)."""
    chain, node = [], disk.find("backingStore")
    while node is not None and node.find("source") is not None:
        source = node.find("source")
        chain.append(source.get("file") or source.get("dev") or source.get("name") or "")
        node = node.find("backingStore")
    return chain


def device_facts(domain: DomainConfig, capacities: dict[str, int] | None = None) -> dict[str, Any]:
    """status.vcpus, memory, disks and interfaces of ``domain``; capacities by disk alias."""
    capacities = capacities or {}
    # an inactive definition has no <backingStore>: its chains are in the disk record (agent/disks)
    record = domain.operator_metadata.disks if domain.operator_metadata is not None else {}
    disks = []
    for d in domain.devices.disks:
        name = naming.disk_name_from_alias(d.alias)
        if name is None:
            continue
        chain = backing_chain(d.element)
        if not chain and name in record and record[name].active.path == d.source_file:
            chain = [layer.path for layer in record[name].backing]
        entry = {"name": name, "target": d.target_dev, "bus": d.target_bus, "device": d.device,
                 "path": d.source_file, "format": d.driver_type, "backingChain": chain}
        if d.alias in capacities:
            entry["capacityBytes"] = capacities[d.alias]
        disks.append({k: v for k, v in entry.items() if v is not None})
    nics = []
    for n in domain.devices.interfaces:
        name = naming.nic_name_from_alias(n.alias)
        if name is None:
            continue
        entry = {"name": name, "type": n.type, "source": n.source, "model": n.model_type, "mac": n.mac_address,
                 "hostDevice": n.target_dev}
        nics.append({k: v for k, v in entry.items() if v is not None})
    return {"vcpus": domain.vcpus_online, "memory": memory_text(domain.memory_kib or 0),
            "disks": disks, "interfaces": nics}
