"""The controller's metrics: placement passes and decisions, and VMs by phase cluster-wide."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge

from libvirt_operator.metrics.common import (
    PREFIX,
    RECONCILE_SECONDS,
    RECONCILES,
    PhaseCounter,
    serve,
)

__all__ = ["placed", "serve", "timed_reconcile", "track_waiting", "vm_event"]

COMPONENT = "controller"
T = TypeVar("T")

PLACEMENTS = Counter(f"{PREFIX}placement_decisions", "Placement decisions by result (the Scheduled reason: "
                     "Scheduled, NoNodeAvailable, InsufficientMemory, NodeNotFound, DiskConflict, MacAddressInUse).",
                     ["result"])
WAITING = Gauge(f"{PREFIX}placement_waiting", "VMs that could not be placed yet and wait for a retry.")
CLUSTER_VMS = PhaseCounter(f"{PREFIX}cluster_vms", "VirtualMachines in the watched namespaces by status.phase.")
REGISTRY.register(CLUSTER_VMS)


def vm_event(event: dict) -> None:
    CLUSTER_VMS.observe(event)


def placed(decision: Any) -> None:
    """Count one placement decision (anything with a `reason`)."""
    PLACEMENTS.labels(decision.reason).inc()


def track_waiting(count: Callable[[], int]) -> None:
    WAITING.set_function(count)


def timed_reconcile(fn: Callable[..., Awaitable[tuple[float | None, T]]]):
    """Decorates Scheduler.reconcile, which returns (retry delay or None, generation).

    Results: `success` (nothing left to do), `requeue` (tried again later: not placeable yet,
    or a conflicting write), `exception` (raised).
    """

    @functools.wraps(fn)
    async def timed(*args: Any, **kwargs: Any) -> tuple[float | None, T]:
        start = time.perf_counter()
        result = "exception"
        try:
            out = await fn(*args, **kwargs)
            result = "success" if out[0] is None else "requeue"
            return out
        finally:
            RECONCILE_SECONDS.labels(COMPONENT).observe(time.perf_counter() - start)
            RECONCILES.labels(COMPONENT, result).inc()

    return timed
