"""Renew this node's agent Lease so the controller knows the agent is alive."""

from __future__ import annotations

import asyncio
import logging

from libvirt_operator.kube import leases

log = logging.getLogger(__name__)


async def run(namespace: str, node: str, every: float, is_healthy) -> None:
    while True:
        if is_healthy():
            try:
                await asyncio.to_thread(leases.renew, namespace, node)
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)
        await asyncio.sleep(every)
