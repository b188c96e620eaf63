"""Controller entry point (`libvirt-operator-controller`, `python -m libvirt_operator.controller`)."""

from __future__ import annotations

import logging

import kopf

from libvirt_operator.api import meta
from libvirt_operator.controller import health, migrations, qos_handlers, snapshots, vm_scheduling
from libvirt_operator.controller.config import ControllerConfig
from libvirt_operator.metrics import controller as metrics

log = logging.getLogger("libvirt_operator.controller")


def settings() -> kopf.OperatorSettings:
    """kopf state under the controller's own prefix, never the agent's or kopf's default."""
    s = kopf.OperatorSettings()
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=meta.CONTROLLER_PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=meta.CONTROLLER_PREFIX, key="last-handled-configuration")
    s.persistence.finalizer = f"{meta.CONTROLLER_PREFIX}/kopf"
    s.peering.standalone = True
    s.posting.level = logging.WARNING  # our own Events say what happened; kopf only reports failures
    # kopf holds each event this long for a newer one of the same object (default 0.1 s, a tenth of
    # a second on every placement); the placement handler is cheap on events that need nothing.
    s.batching.batch_window = 0.01
    return s


def build(cfg: ControllerConfig) -> tuple[kopf.OperatorRegistry, vm_scheduling.Scheduler]:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(id="kubernetes-client", registry=registry)
    def login(**kwargs):  # in-cluster service account, else KUBECONFIG (as kube.client does)
        return kopf.login_via_client(**kwargs)

    scheduler = vm_scheduling.Scheduler(cfg.namespace, cfg.retry_seconds)
    vm_scheduling.register(registry, scheduler)
    qos_handlers.register(registry)
    snapshots.register(registry)
    migrations.register(registry, cfg, scheduler.index)
    return registry, scheduler


def main() -> None:
    cfg = ControllerConfig.from_env()
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.log_level != "DEBUG":  # kopf says "Handler ... succeeded" for every watch event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    registry, _ = build(cfg)
    metrics.serve("controller")
    health.serve()  # /livez, /readyz when LVO_HEALTH_PORT is set
    scope = ", ".join(cfg.watch_namespaces) or "all namespaces"
    log.info("controller watching %s; agent leases in %s", scope, cfg.namespace)
    kopf.run(
        registry=registry,
        settings=settings(),
        standalone=True,
        clusterwide=not cfg.watch_namespaces,
        namespaces=cfg.watch_namespaces,
        # Hook for the health endpoint: kopf serves it, @kopf.on.probe handlers can add checks.
        liveness_endpoint=cfg.liveness_endpoint,
    )
