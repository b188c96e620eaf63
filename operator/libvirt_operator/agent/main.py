"""Agent entry point: kopf watches this node's VMs server-side; a work queue reconciles them."""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import kopf

from libvirt_operator.agent import health, heartbeat, recovery
from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.agent.jobs import JobRunner
from libvirt_operator.agent.liveupdate.plan import HostCaps
from libvirt_operator.agent.migration_jobs import MigrationJobs
from libvirt_operator.agent.reconcile import Reconciler
from libvirt_operator.agent.snapshot_jobs import SnapshotJobs
from libvirt_operator.agent.store import VMStore, key_of
from libvirt_operator.agent.workqueue import WorkQueue
from libvirt_operator.api import meta
from libvirt_operator.hypervisor import tuning
from libvirt_operator.hypervisor.events import ConnectionEvent, DomainEvent
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import client as kube_client
from libvirt_operator.kube import events, resources
from libvirt_operator.metrics import agent as metrics

log = logging.getLogger("libvirt_operator.agent")


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.store = VMStore()
        # One libvirt thread per reconcile worker (plus spares for event-driven lookups), so a
        # burst of VM starts is not queued behind a smaller thread pool.
        # libvirtd runs 5 calls per client connection at a time: a pool of connections lets a burst
        # of starts (each createWithFlags holds its call for the whole boot) proceed side by side.
        self.host = Host(cfg.libvirt_uri, workers=cfg.workers + 8, connections=cfg.libvirt_connections)
        self.reconciler = Reconciler(cfg, metrics.timed_host(self.host), self.store)
        self.queue = WorkQueue(self.reconciler, workers=cfg.workers)
        self.snapshots = self.reconciler.snapshots
        self.jobs = self.reconciler.jobs = JobRunner(on_done=self._job_done)
        self.snapshot_jobs = self.reconciler.snapshot_jobs = SnapshotJobs(cfg, self.host, self.store,
                                                                          self.snapshots, self.jobs)
        self.migration_jobs = self.reconciler.migration_jobs = MigrationJobs(cfg, self.host, self.store,
                                                                             self.snapshots, self.jobs)
        metrics.track(cfg.node_name, self.queue)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=kube_client.POOL_SIZE, thread_name_prefix="blocking"))
        self.host.subscribe(self._on_libvirt_event)
        await self.host.connect()
        info = await self.host.info()
        self.reconciler.has_kvm = info.has_kvm
        # QEMU 7.2/libvirt 9.0 (TCG, q35): a live vCPU unplug times out in libvirt and leaves its vCPU
        # count stale, and a later DIMM attach can crash QEMU. A lower vCPU count waits for a restart.
        self.reconciler.caps = HostCaps(cpus=info.cpus, vcpu_unplug=False, dimm_unplug=True)
        try:
            self.reconciler.qos.caps = await asyncio.to_thread(tuning.detect, info.cpus)
            caps = self.reconciler.qos.caps
            log.info("QoS on %s: cgroup v%d, NIC shaping %s", self.cfg.node_name, caps.cgroup_version,
                     caps.network_mechanism or "unavailable")
        except Exception:
            log.exception("probing the node's QoS capabilities failed; QoS is reported HostUnsupported")
        await self._prime()
        self.queue.start()
        self._tasks = [
            asyncio.create_task(heartbeat.run(self.cfg.namespace, self.cfg.node_name,
                                              self.cfg.heartbeat_seconds, lambda: self.host.connected)),
            asyncio.create_task(self._resync()),
            asyncio.create_task(self._recover()),
        ]

    async def _prime(self) -> None:
        """Fills the VMSnapshot and VMMigration stores with one listing of this node's before any VM is
        reconciled: the watches start apart, and a VM's teardown must not judge a file unreferenced
        before the snapshots holding it are known. The watches' events follow and keep the newest
        copies. (VMs are not primed: a job that misses its VM asks the API server, watched.vm_on_node.)"""
        selector = f"{meta.NODE_LABEL}={self.cfg.node_name}"
        stores = ((resources.SNAPSHOTS, self.snapshots), (resources.MIGRATIONS, self.migration_jobs.migrations))
        for plural, store in stores:
            while True:
                try:
                    items = await asyncio.to_thread(resources.list_all, plural, selector)
                    break
                except Exception as exc:  # the API server starting (429) or away: the agent waits for it
                    log.warning("listing %s of node %s: %s; trying again", plural, self.cfg.node_name, exc)
                    await asyncio.sleep(1.0)
            for obj in items:
                store.put(obj)

    async def stop(self) -> None:
        self.snapshot_jobs.stop()
        self.migration_jobs.stop()
        await self.jobs.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.stop()
        await self.host.close()

    def on_vm_event(self, event: dict) -> None:
        metrics.vm_event(event)
        obj = event["object"]
        if event.get("type") == "DELETED":
            self.store.remove(obj)  # gone from this node's view: the domain is left alone
            return
        self.store.put(obj)
        self.queue.add(key_of(obj))

    def on_snapshot_event(self, event: dict) -> None:
        self.snapshot_jobs.on_event(event)

    def on_migration_event(self, event: dict) -> None:
        self.migration_jobs.on_event(event)

    def _job_done(self, vm_uid: str) -> None:
        key = self.store.key_for_uid(vm_uid)
        if key is not None:
            self.queue.add(key)
            self.snapshot_jobs.handle_for_vm(key)
            self.migration_jobs.handle_for_vm(key)
        else:
            self.snapshot_jobs.handle_all()
            self.migration_jobs.handle_all()

    def _on_libvirt_event(self, event) -> None:
        if isinstance(event, ConnectionEvent):
            # Lost: every VM reports that libvirt is unreachable; restored: every VM is looked at again.
            self._enqueue_all()
            self._node_event(event)
            return
        if isinstance(event, DomainEvent):
            key = self.store.key_for_uid(event.uuid)
            if key is not None:
                self.queue.add(key)

    def _node_event(self, event: ConnectionEvent) -> None:
        lost = event.state == "lost"
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.cfg.node_name, "namespace": "default",
                                                                 "uid": self.cfg.node_name}}
        message = (f"libvirt at {self.cfg.libvirt_uri} unreachable ({event.reason}); its VMs report LibvirtUnavailable"
                   if lost else f"libvirt at {self.cfg.libvirt_uri} reachable again")
        asyncio.get_running_loop().run_in_executor(None, functools.partial(
            events.post, node, "LibvirtUnavailable" if lost else "LibvirtRestored", message, warning=lost,
            component="libvirt-operator-agent"))

    def _enqueue_all(self) -> None:
        for key in self.store.all_keys():
            self.queue.add(key)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resync_seconds)
            for key in self.store.all_keys():  # behind event-driven passes, a few at a time (agent/workqueue.py)
                self.queue.add_background(key)
            self.snapshot_jobs.handle_all()
            self.migration_jobs.handle_all()

    async def _recover(self) -> None:
        await asyncio.sleep(3)  # let the initial listing fill the store first
        orphans = await recovery.rediscover(self.host, self.store, self.queue.add)
        if orphans:
            log.warning("orphaned domains on %s: %s", self.cfg.node_name, ", ".join(orphans))


def register(cfg: AgentConfig, registry: kopf.OperatorRegistry) -> Agent:
    agent = Agent(cfg)

    @kopf.on.login(id="kubernetes-client", registry=registry)
    def login(**kwargs):  # in-cluster service account, else KUBECONFIG
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_):
        # Only this node's VMs ever reach this process (server-side label selector).
        settings.watching.label_selectors[meta.GROUP, "virtualmachines"] = f"{meta.NODE_LABEL}={cfg.node_name}"
        settings.watching.label_selectors[meta.GROUP, "vmsnapshots"] = f"{meta.NODE_LABEL}={cfg.node_name}"
        settings.watching.label_selectors[meta.GROUP, "vmmigrations"] = f"{meta.NODE_LABEL}={cfg.node_name}"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=meta.AGENT_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=meta.AGENT_PREFIX, key="last-handled-configuration")
        settings.persistence.finalizer = f"{meta.AGENT_PREFIX}/kopf"
        settings.peering.standalone = True
        settings.posting.level = logging.WARNING
        settings.batching.batch_window = 0.01  # kopf's 0.1 s default delays every reaction to a change
        await agent.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_):
        await agent.stop()

    @kopf.on.event(meta.GROUP, meta.VERSION, "virtualmachines", registry=registry)
    async def vm_event(event, **_):  # in the loop: kopf runs a sync handler in a thread, and the work
        agent.on_vm_event(event)  # queue (asyncio.Queue, timers) is not thread-safe

    @kopf.on.event(meta.GROUP, meta.VERSION, "vmsnapshots", registry=registry)
    async def snapshot_event(event, **_):  # in the loop: on_event spawns tasks (a sync handler runs in a thread)
        agent.on_snapshot_event(event)

    @kopf.on.event(meta.GROUP, meta.VERSION, "vmmigrations", registry=registry)
    async def migration_event(event, **_):  # in the loop, like the others
        agent.on_migration_event(event)

    return agent


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AgentConfig.from_env()
    registry = kopf.OperatorRegistry()
    agent = register(cfg, registry)
    metrics.serve("agent")
    health.serve(cfg, lambda: agent.host.connected)  # /livez, /readyz when LVO_HEALTH_PORT is set
    log.info("agent for node %s on %s, storage roots %s", cfg.node_name, cfg.libvirt_uri,
             ":".join(map(str, cfg.storage_roots)))
    kopf.run(registry=registry, clusterwide=True, standalone=True)
