"""The controller's metrics: placement passes and decisions, VMs by phase cluster-wide, VMMigrations."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from libvirt_operator.api.vmmigration import MigrationPhase
from libvirt_operator.metrics.common import (
    PREFIX,
    RECONCILE_SECONDS,
    RECONCILES,
    PhaseCounter,
    serve,
)

__all__ = ["migration_finished", "placed", "serve", "timed_reconcile", "track_migrations", "track_waiting",
           "vm_event"]

COMPONENT = "controller"
T = TypeVar("T")

PLACEMENTS = Counter(f"{PREFIX}placement_decisions", "Placement decisions by result (the Scheduled reason: "
                     "Scheduled, NoNodeAvailable, InsufficientMemory, NodeNotFound, DiskConflict, MacAddressInUse).",
                     ["result"])
WAITING = Gauge(f"{PREFIX}placement_waiting", "VMs that could not be placed yet and wait for a retry.")
CLUSTER_VMS = PhaseCounter(f"{PREFIX}cluster_vms", "VirtualMachines in the watched namespaces by status.phase.")
REGISTRY.register(CLUSTER_VMS)
MIGRATIONS_FINISHED = Counter(f"{PREFIX}migrations_finished", "VMMigrations the controller ended, by type and "
                              "result (Succeeded, or the reason it refused one: VMNotRunning, SameNode, ...).",
                              ["type", "result"])
MIGRATION_SECONDS = Histogram(f"{PREFIX}migration_duration_seconds", "Start to Succeeded of a VMMigration.",
                              ["type"], buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))


class _MigrationPhases(Collector):
    """VMMigrations by status.phase (every phase exported, zeros included), from the controller's watch."""

    def __init__(self) -> None:
        self.count: Callable[[], dict[str, int]] = dict

    def collect(self):
        family = GaugeMetricFamily(f"{PREFIX}migrations", "VMMigrations in the watched namespaces by status.phase "
                                   "(none yet counts as Pending).", labels=["phase"])
        counts = self.count()
        for phase in get_args(MigrationPhase):
            family.add_metric([phase], counts.get(phase, 0))
        yield family


MIGRATION_PHASES = _MigrationPhases()
REGISTRY.register(MIGRATION_PHASES)


def track_migrations(count: Callable[[], dict[str, int]]) -> None:
    MIGRATION_PHASES.count = count


def migration_finished(kind: str, result: str, seconds: float | None = None) -> None:
    MIGRATIONS_FINISHED.labels(kind, result).inc()
    if seconds is not None:
        MIGRATION_SECONDS.labels(kind).observe(seconds)


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
