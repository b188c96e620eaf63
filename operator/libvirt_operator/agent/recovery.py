"""After a (re)start, find this node's operator domains and account for each one."""

from __future__ import annotations

import asyncio
import logging

from libvirt_operator.agent.store import VMStore
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import resources

log = logging.getLogger(__name__)


async def rediscover(host: Host, store: VMStore, enqueue) -> list[str]:
    """Enqueue the VM of every operator domain; return domains whose VM is gone (kept, never destroyed)."""
    orphans = []
    for guest in await host.domains():
        md = DomainConfig.from_xml(await guest.xml(inactive=True)).operator_metadata
        if md is None:
            continue  # not ours
        key = store.key_for_uid(guest.uuid)
        if key is not None:
            enqueue(key)
            continue
        obj = await asyncio.to_thread(resources.get, resources.VMS, md.vm_namespace, md.vm_name)
        if obj is None or obj["metadata"]["uid"] != guest.uuid:
            orphans.append(guest.name)
            log.warning("domain %s belongs to %s/%s (uid %s), which no longer exists; left untouched",
                        guest.name, md.vm_namespace, md.vm_name, guest.uuid)
    return orphans
