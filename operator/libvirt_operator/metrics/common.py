"""What both components expose, and the /metrics endpoint (LVO_METRICS_PORT, LVO_METRICS_ADDRESS)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import Phase

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: counters and histograms start with the process

PREFIX = "libvirt_operator_"
DEFAULT_PORT = 8080
DEFAULT_ADDRESS = "0.0.0.0"
# VMs whose status has no phase yet (just created, not placed) count as Pending.
NO_PHASE = "Pending"
PHASES: tuple[str, ...] = get_args(Phase)

BUILD_INFO = Gauge(f"{PREFIX}build_info", "Always 1; labels say which component and version this process runs.",
                   ["component", "version"])
RECONCILES = Counter(f"{PREFIX}reconcile", "Reconcile passes by component and result.", ["component", "result"])
WATCH_EVENTS = Counter(
    f"{PREFIX}vm_watch_events", "VirtualMachine watch events received. scope: own (a VM placed on this agent's "
    "node), other (a VM of another node or unplaced: an agent's server-side selector keeps this at 0), "
    "cluster (the controller, which watches every VM).", ["scope"])
RECONCILE_SECONDS = Histogram(f"{PREFIX}reconcile_duration_seconds", "Duration of one reconcile pass.",
                              ["component"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


# -- reconcile passes ----------------------------------------------------------------------------

@dataclass
class Pass:
    """One reconcile pass; the code under measurement sets `result` when it is not `success`."""

    result: str = "success"


@contextmanager
def reconcile_pass(component: str) -> Iterator[Pass]:
    """Times the block and counts it under its result (`exception` when the block raises)."""
    outcome = Pass()
    start = time.perf_counter()
    try:
        yield outcome
    except Exception:
        outcome.result = "exception"
        raise
    finally:
        RECONCILE_SECONDS.labels(component).observe(time.perf_counter() - start)
        RECONCILES.labels(component, outcome.result).inc()


# -- VMs by phase --------------------------------------------------------------------------------

class PhaseCounter(Collector):
    """Counts VirtualMachines by `status.phase`, fed with the component's watch events.

    Every phase of the API is exported, zeros included, so a phase that empties shows 0
    rather than vanishing.
    """

    def __init__(self, name: str, documentation: str, labels: Mapping[str, str] | None = None):
        self.name = name
        self.documentation = documentation
        self.labels = dict(labels or {})
        self._phase_by_uid: dict[str, str] = {}
        self._node = self.labels.get("node")  # an agent's: events are counted as own or other
        for scope in ("own", "other") if self._node else ("cluster",):
            WATCH_EVENTS.labels(scope)  # exported from the start, zeros included

    def observe(self, event: Mapping) -> None:
        """A kopf/Kubernetes watch event ({"type": ..., "object": ...})."""
        obj = event.get("object") or {}
        md = obj.get("metadata") or {}
        if self._node is None:
            WATCH_EVENTS.labels("cluster").inc()
        else:
            own = (md.get("labels") or {}).get(meta.NODE_LABEL) == self._node
            WATCH_EVENTS.labels("own" if own else "other").inc()
        uid = md.get("uid")
        if not uid:
            return
        if event.get("type") == "DELETED":
            self._phase_by_uid.pop(uid, None)
        else:
            self._phase_by_uid[uid] = (obj.get("status") or {}).get("phase") or NO_PHASE

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(PHASES, 0)
        for phase in list(self._phase_by_uid.values()):
            out[phase] = out.get(phase, 0) + 1
        return out

    def collect(self):
        family = GaugeMetricFamily(self.name, self.documentation, labels=[*self.labels, "phase"])
        for phase, n in self.counts().items():
            family.add_metric([*self.labels.values(), phase], n)
        yield family


# -- the endpoint --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointConfig:
    port: int = DEFAULT_PORT  # 0: no endpoint
    address: str = DEFAULT_ADDRESS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EndpointConfig:
        env = os.environ if env is None else env
        raw = env.get("LVO_METRICS_PORT", "").strip()
        port = DEFAULT_PORT
        if raw:
            try:
                port = int(raw)
            except ValueError:
                raise SystemExit(f"LVO_METRICS_PORT must be a port number (0 disables), not {raw!r}") from None
            if not 0 <= port <= 65535:
                raise SystemExit(f"LVO_METRICS_PORT must be between 0 and 65535, not {port}")
        return cls(port=port, address=env.get("LVO_METRICS_ADDRESS", "").strip() or DEFAULT_ADDRESS)


def serve(component: str, env: Mapping[str, str] | None = None) -> int | None:
    """Start the /metrics endpoint in a daemon thread; returns the bound port, None when disabled.

    A port already in use is fatal, as it should be: two processes must not share one.
    """
    cfg = EndpointConfig.from_env(env)
    BUILD_INFO.labels(component, _version()).set(1)
    if cfg.port == 0:
        log.info("metrics endpoint disabled (LVO_METRICS_PORT=0)")
        return None
    try:
        server, _thread = start_http_server(cfg.port, addr=cfg.address, registry=REGISTRY)
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {cfg.address}:{cfg.port}: {exc.strerror or exc}; "
                         "set LVO_METRICS_PORT to a free port, or to 0 to disable the endpoint") from exc
    port = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", cfg.address, port)
    return port


def _version() -> str:
    try:
        return metadata.version("libvirt-operator")
    except metadata.PackageNotFoundError:
        return "unknown"
