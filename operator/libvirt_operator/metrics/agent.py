"""The node agent's metrics: reconcile passes, its work queue, libvirt calls, and this node's VMs.

libvirt calls are measured in one place: `timed_host(host)` wraps the Host the reconciler
uses, and every Guest it hands out, in a proxy that times each coroutine method under the
method's name (`start`, `shutdown`, `define`, `lookup`, ...). The proxied objects themselves
are unchanged, and calls made inside them (Guest -> Host.run) are not counted twice.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from libvirt_operator.metrics.common import PREFIX, Pass, PhaseCounter, reconcile_pass, serve

__all__ = ["Pass", "reconcile", "serve", "timed_host", "track", "vm_event"]

COMPONENT = "agent"

LIBVIRT_SECONDS = Histogram(
    f"{PREFIX}libvirt_operation_duration_seconds", "Duration of libvirt operations by operation (Host/Guest method).",
    ["operation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
LIBVIRT_ERRORS = Counter(
    f"{PREFIX}libvirt_operation_errors", "Failed libvirt operations by operation and reason (the condition reason).",
    ["operation", "reason"])
QUEUE_DEPTH = Gauge(f"{PREFIX}workqueue_depth", "VMs waiting in the agent's work queue for a worker.")
QUEUE_IN_PROGRESS = Gauge(f"{PREFIX}workqueue_in_progress", "VMs being reconciled right now.")
QUEUE_DELAYED = Gauge(f"{PREFIX}workqueue_delayed", "VMs scheduled to be reconciled again later (requeue timers).")

# Migrations, after KubeVirt's kubevirt_vmi_migration_* (the source agent's job reports them).
MIGRATIONS = Counter(f"{PREFIX}vm_migrations", "Finished migrations by type and result (Succeeded, Failed, Aborted).",
                     ["node", "type", "result"])
MIGRATION_SECONDS = Histogram(f"{PREFIX}vm_migration_duration_seconds", "Duration of migration jobs on the source.",
                              ["node", "type"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
MIGRATIONS_RUNNING = Gauge(f"{PREFIX}vm_migrations_running", "Migration jobs running on this node (source).",
                           ["node"])
_MIGRATION_LABELS = ["node", "namespace", "name"]
MIGRATION_GAUGES = {
    field: Gauge(f"{PREFIX}vm_migration_{metric}", help_, _MIGRATION_LABELS)
    for field, metric, help_ in (
        ("dataTotalBytes", "data_total_bytes", "Data to migrate (memory and copied disks), bytes."),
        ("dataProcessedBytes", "data_processed_bytes", "Data migrated so far, bytes."),
        ("dataRemainingBytes", "data_remaining_bytes", "Data still to migrate, bytes."),
        ("memoryDirtyRateBytesPerSecond", "dirty_memory_rate_bytes", "Guest memory dirtied per second, bytes."),
        ("memoryBytesPerSecond", "memory_transfer_rate_bytes", "Memory transferred per second, bytes."),
        ("iteration", "iteration", "Pre-copy iteration."),
        ("percent", "percent", "Progress in percent."),
    )}


def migration_started(node: str, kind: str) -> None:
    MIGRATIONS_RUNNING.labels(node).inc()


def migration_finished(node: str, kind: str, result: str, seconds: float) -> None:
    MIGRATIONS_RUNNING.labels(node).dec()
    MIGRATIONS.labels(node, kind, result).inc()
    MIGRATION_SECONDS.labels(node, kind).observe(seconds)


def migration_progress(node: str, key: tuple[str, str], progress: dict) -> None:
    for field, gauge in MIGRATION_GAUGES.items():
        if progress.get(field) is not None:
            gauge.labels(node, *key).set(progress[field])


# Host methods whose result is a Guest (or None, or a list of Guests): those get proxied too.
GUEST_FACTORIES = frozenset({"lookup", "lookup_by_name", "define", "domains"})

_node_vms: PhaseCounter | None = None


class QueueStats(Protocol):
    @property
    def depth(self) -> int: ...
    @property
    def in_progress(self) -> int: ...
    @property
    def delayed(self) -> int: ...


def track(node: str, queue: QueueStats) -> None:
    """Export this node's VMs by phase and the work queue's gauges (call once per process)."""
    global _node_vms
    if _node_vms is None:
        _node_vms = PhaseCounter(f"{PREFIX}node_vms", "VirtualMachines on this node by status.phase.",
                                 {"node": node})
        REGISTRY.register(_node_vms)
    QUEUE_DEPTH.set_function(lambda: queue.depth)
    QUEUE_IN_PROGRESS.set_function(lambda: queue.in_progress)
    QUEUE_DELAYED.set_function(lambda: queue.delayed)


def vm_event(event: dict) -> None:
    """Feed one watch event of this node's VMs (kopf's raw event)."""
    if _node_vms is not None:
        _node_vms.observe(event)


def reconcile():
    """Context manager around one reconcile pass; set `.result` on what it yields."""
    return reconcile_pass(COMPONENT)


# -- libvirt calls -------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    # HypervisorError carries a condition-style reason; anything else is named by its type.
    return getattr(exc, "reason", None) or type(exc).__name__


def _timed(operation: str, method: Callable[..., Any], wrap: Callable[[Any], Any] | None) -> Callable[..., Any]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await method(*args, **kwargs)
        except Exception as exc:
            LIBVIRT_ERRORS.labels(operation, _reason(exc)).inc()
            raise
        finally:
            LIBVIRT_SECONDS.labels(operation).observe(time.perf_counter() - start)
        return wrap(result) if wrap is not None else result

    return call


class _Timed:
    """Proxy that times every coroutine method of its target; other attributes pass through."""

    def __init__(self, target: Any, factories: frozenset[str] = frozenset()):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_factories", factories)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return _timed(name, attr, _wrap_guests if name in self._factories else None)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __repr__(self) -> str:
        return f"timed({self._target!r})"


def _wrap_guests(result: Any) -> Any:
    if result is None:
        return None
    if isinstance(result, list):
        return [_Timed(g) for g in result]
    return _Timed(result)


def timed_host(host: Any) -> Any:
    """The Host, with its calls and those of the Guests it returns timed (see module doc)."""
    return _Timed(host, GUEST_FACTORIES)
