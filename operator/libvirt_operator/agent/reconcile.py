"""Level-based reconciliation of one VirtualMachine against this node's libvirt domain.

One pass: checks -> definition -> one-shot requests -> one power action -> live update ->
status. Each step lives in its own module; this one orders them and turns every error into
status (nothing fails in a loop without saying why)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from libvirt_operator.agent import (
    checks,
    define,
    disks,
    migration_jobs,
    power,
    power_actions,
    report,
    requests,
    teardown,
)
from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.agent.jobs import JobRunner
from libvirt_operator.agent.liveupdate.apply import LiveUpdater
from libvirt_operator.agent.liveupdate.plan import HostCaps, plan
from libvirt_operator.agent.qos import QosApplier
from libvirt_operator.agent.snapshots import clone
from libvirt_operator.agent.snapshots.plan import Refusal
from libvirt_operator.agent.store import Key, VMStore
from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.errors import RenderError
from libvirt_operator.domain.naming import default_domain_name
from libvirt_operator.hypervisor import tuning
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import events, resources
from libvirt_operator.metrics import agent as metrics
from libvirt_operator.storage.errors import StorageError

log = logging.getLogger(__name__)
COMPONENT = "libvirt-operator-agent"
LIVE_STATES = {"running", "paused", "blocked"}


class Reconciler:
    def __init__(self, cfg: AgentConfig, host: Host, store: VMStore):
        self.cfg = cfg
        self.host = host
        self.store = store
        self.has_kvm = False  # learned from the host's domain capabilities at startup
        self.caps = HostCaps(cpus=1)  # likewise
        self.live = LiveUpdater()
        self.qos = QosApplier(store)
        self.renders = define.RenderCache()
        self._domain_ids: dict[str, int | None] = {}  # the running domain's id (its cgroup's name)
        self._matched: dict[str, str] = {}  # live metadata to record once status is written
        self._oom: dict[str, int] = {}  # domain uuid -> generation at which the kernel killed its QEMU
        self._failures: dict[Key, int] = {}
        self._pending_events: set[asyncio.Task] = set()
        self.guests: dict[str, Guest] = {}  # uid -> the Guest last looked up (agent/teardown.known)
        self.snapshots = VMStore()  # this node's VMSnapshots (the agent's watch fills it)
        self.jobs = JobRunner(on_done=lambda uid: None)  # replaced by the agent's runner
        self.snapshot_jobs = None  # agent.snapshot_jobs.SnapshotJobs, set by the agent
        self.migration_jobs = None  # agent.migration_jobs.MigrationJobs, set by the agent

    async def __call__(self, key: Key) -> float | None:
        with metrics.reconcile() as outcome:
            return await self._handle(key, outcome)

    async def _handle(self, key: Key, outcome: metrics.Pass) -> float | None:
        obj = self.store.get(key)
        if obj is None:
            outcome.result = "gone"
            return None
        try:
            with self.jobs.pass_of(obj["metadata"]["uid"]):  # a job started meanwhile waits for this pass
                again = await self._reconcile(obj)
            self._failures.pop(key, None)
            return again
        except HypervisorError as exc:
            outcome.result = "libvirt_error"
            log.warning("%s/%s: %s: %s", *key, exc.reason, exc.message)
            await self._failed(obj, exc.reason, exc.message)
            return self._backoff(key, cap=5.0 if exc.reason == "ConnectionLost" else 60.0)
        except ApiException as exc:
            outcome.result = {404: "gone", 409: "conflict"}.get(exc.status, "api_error")
            if exc.status == 404:
                return None
            if exc.status == 409:
                return 0.2
            log.warning("%s/%s: API error %s: %s: %s", *key, exc.status, exc.reason, (exc.body or "")[:2000])
            return self._backoff(key)
        except Exception as exc:  # a bug: say so in status rather than loop silently
            outcome.result = "error"
            log.exception("%s/%s: reconcile failed", *key)
            await self._failed(obj, "InternalError", f"{type(exc).__name__}: {exc}")
            return self._backoff(key)

    def _backoff(self, key: Key, cap: float = 60.0) -> float:
        n = self._failures[key] = self._failures.get(key, 0) + 1
        return min(2.0 ** n, cap)

    # -- the pass ----------------------------------------------------------------------------

    async def _reconcile(self, obj: dict) -> float | None:
        md = obj["metadata"]
        deleting = bool(md.get("deletionTimestamp"))
        if deleting and meta.AGENT_FINALIZER not in (md.get("finalizers") or []):
            return None
        try:
            spec = VirtualMachineSpec.model_validate(obj["spec"])
        except ValidationError as exc:
            await self._failed(obj, "InvalidSpec", str(exc).replace("\n", " "), lookup=False)
            return None
        guest = teardown.known(self, md["uid"]) if deleting else None  # no lookup behind a burst's destroys
        guest = guest or await self.host.lookup(md["uid"])
        teardown.remember(self, md["uid"], guest)
        held = self.jobs.busy(md["uid"])
        if held is None and self.migration_jobs is not None:
            held = self.migration_jobs.holds(obj)
            if held is migration_jobs.SKIP:
                return None  # the domain runs on the migration's target: that agent takes the VM over
            landed = ((obj.get("status") or {}).get("migration") or {}).get("state") == "Landed"
            if guest is not None and held is None and landed:  # adopt acts on Landed only: no state call else
                await self.migration_jobs.adopt(obj, (await guest.state()).state == "running")
        if held is None and not deleting and self.snapshot_jobs is not None:
            held = self.snapshot_jobs.start_revert(obj)
        if held is not None:  # a snapshot or revert job owns the VM until it ends (then this VM is looked at again)
            if not deleting:
                await self.write(obj, report.busy(obj, guest, held))
            return None
        if deleting:
            done = await teardown.run(self, obj, spec, guest)
            if done is None:  # the domain is gone: so are its NICs, from the node's tc plan
                await self.qos.drop((md["namespace"], md["name"]))
            return done
        if meta.AGENT_FINALIZER not in (md.get("finalizers") or []):
            obj = await self.set_finalizer(obj, add=True)

        cloned: dict = {}
        if spec.clone_from is not None and guest is None:  # S7: this VM's leaves over a snapshot's files
            cloned = await self._clone_leaves(obj)
            if cloned is None:
                return 10.0
        stored = await define.stored_definition(guest)  # its disk record: the chains the disks run on
        problem = checks.paths(spec, self.cfg.storage_roots, disks.moved_disks(stored, obj))
        if problem is not None and not (problem.reason == "FileNotFound" and guest is not None):
            await self._failed(obj, problem.reason, problem.message, guest)
            return None if problem.reason == "PathNotAllowed" else 30.0
        unavailable = checks.host_devices(spec)
        runnable = checks.without(spec, set(unavailable))
        try:
            wanted = self.renders.render(obj, runnable, domain_type=self._domain_type(spec),
                                         console_log=str(self.cfg.console_log_dir / f"{self._name(obj)}.console.log"),
                                         without=frozenset(unavailable),
                                         disk_chains=disks.record_from(stored, obj) or cloned,
                                         disk_origins=disks.origins_from(stored, obj))
        except RenderError as exc:
            await self._failed(obj, "InvalidSpec", str(exc), guest)
            return None
        if guest is None:
            other = await self.host.lookup_by_name(self._name(obj))
            if other is not None:
                await self._failed(obj, "DomainNameConflict",
                                   f"domain {other.name} exists on this node with another uuid ({other.uuid})")
                return None
        defined = await define.ensure(self.host, guest, wanted, stored)
        guest = defined.guest
        if defined.verb:
            await self.event(obj, defined.verb, f"domain {guest.name} {defined.verb.lower()} on {self.cfg.node_name}")
        return await self._converge(obj, spec, runnable, defined, unavailable)

    async def _converge(self, obj, spec, runnable, defined: define.Defined, unavailable) -> float | None:
        guest = defined.guest
        outcomes = await self._run_requests(obj, guest)
        st = obj.get("status") or {}
        restarting = requests.restart_in_progress(obj["spec"], st)
        seen = await self.observe(guest)
        if seen.state not in power.ACTIVE_STATES:
            for grown in await define.grow_offline(runnable, defined.wanted.operator_metadata.disks):
                await self.event(obj, "DiskGrown", grown)
        want = self.desired(obj, spec, stopping=restarting is not None and seen.state in power.ACTIVE_STATES)
        decision = power.decide(want, seen, self.history(st))
        oom = await self._oom_killed(obj, guest, seen)
        if oom is not None:  # never restarted: it would be killed again
            decision = oom
        if restarting and seen.state not in power.ACTIVE_STATES:
            decision = power.Decision(power.Action.START_PAUSED if spec.power_state == "Paused" else power.Action.START,
                                      "Starting", False, "Restarting", "started again (restart request)")
        refused = await power_actions.act(obj, spec, guest, decision, self.eventer(obj))
        if restarting:
            outcomes.update(await self._restart_progress(obj, decision, refused, restarting))
        still_restarting = restarting is not None and outcomes["lastRestart"]["result"] == "InProgress"
        seen = await self.observe(guest)
        if spec.power_state == "Stopped" or still_restarting:
            live = report.Live(facts_xml=defined.stored, running=False)  # going down: nothing to update live
        else:
            live = await self._live_update(obj, guest, defined, runnable, seen)
        want = self.desired(obj, spec, stopping=still_restarting and seen.state in power.ACTIVE_STATES)
        after = power.reassess(want, seen, decision, self.history(st))
        stopping = seen.state in power.ACTIVE_STATES and (spec.power_state == "Stopped" or still_restarting)
        if oom is not None:
            after = replace(after, reason=oom.reason, message=oom.message, halt=oom.halt or after.halt)
        rep = report.for_pass(obj, spec, guest, after, stopping, outcomes, live, unavailable, refused)
        await self.write(obj, rep)
        matched = self._matched.pop(guest.uuid, None)
        if matched is not None:  # the running domain matches this generation: say so in its own metadata
            try:
                await guest.set_operator_metadata(matched, live=True)
            except HypervisorError as exc:  # stopped meanwhile: the next start records its own generation
                log.info("%s: live metadata not updated: %s", guest.name, exc.message)
        if after.halt and st.get("haltedGeneration") != obj["metadata"].get("generation", 1):
            await self.event(obj, after.reason, after.message, warning=True)
        requeue = [t for t in (after.requeue, decision.requeue, live.requeue) if t is not None]
        return min(requeue) if requeue else None

    async def _live_update(self, obj, guest: Guest, defined: define.Defined, runnable, seen) -> report.Live:
        """Plans and applies the live steps; the outcome, re-planned on the domain as it now is."""
        self._matched.pop(guest.uuid, None)
        if seen.state not in LIVE_STATES:
            await self.qos.drop((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            return report.Live(facts_xml=defined.stored, running=False)
        sizes = define.wanted_sizes(runnable)
        xml = await guest.xml()
        live = DomainConfig.from_xml(xml)
        self._domain_ids[guest.uuid] = live.id
        caps = await self._capacities(guest, live, sizes)
        p = plan(defined.wanted, live, defined.stored, caps=self.caps, sizes=sizes, capacities=caps)
        booted = live.operator_metadata.generation if live.operator_metadata else None
        gen = obj["metadata"].get("generation", 1)
        result = None
        if p.steps:
            result = await self.live.apply(guest, p.steps)
            if result.done:
                what = ", ".join(s.describe() for s in result.done)
                drift = booted == gen
                await self.event(obj, "DriftCorrected" if drift else "LiveUpdated",
                                 ("put back what changed behind the operator's back: " if drift else "") + what,
                                 warning=drift)
            xml = await guest.xml()
            live = DomainConfig.from_xml(xml)
            caps = await self._capacities(guest, live, sizes)
            p = plan(defined.wanted, live, defined.stored, caps=self.caps, sizes=sizes, capacities=caps)
        qos = await self.qos.apply(obj, guest, live)
        if p.converged and booted != gen and live.operator_metadata is not None:
            live.operator_metadata.generation = gen  # recorded in the live domain after the status write
            self._matched[guest.uuid] = live.operator_metadata.to_api_xml()
            booted = gen
        return report.Live(facts_xml=live, running=True, xml=xml, plan=p, result=result, matched_generation=booted,
                           capacities=caps, requeue=2.0 if result and result.waiting else None,
                           qos_condition=qos.condition, qos_applied=qos.applied)

    async def _oom_killed(self, obj: dict, guest: Guest, seen: power.Observed) -> power.Decision | None:
        """A QEMU the kernel killed for its memory cgroup's limit (QoS hardLimit): a halt with that reason."""
        gen = obj["metadata"].get("generation", 1)
        last_id = self._domain_ids.get(guest.uuid)
        if last_id is None or not (seen.state == "crashed" or seen.reason == "crashed"):
            return None
        killed_at = self._oom.get(guest.uuid)
        if killed_at is None:
            prefix = f"qemu-{last_id}-"
            kills = tuning.oom_kills(await asyncio.to_thread(tuning.read_kernel_log))
            if not any(k.memcg.rsplit("/", 1)[-1].startswith(prefix) for k in kills):
                return None
            killed_at = self._oom[guest.uuid] = gen
        if killed_at != gen:  # the spec changed since: start it again, as after any halt
            self._oom.pop(guest.uuid, None)
            self._domain_ids.pop(guest.uuid, None)
            return None
        limit = ((obj.get("status") or {}).get("qosApplied") or {}).get("memory", {}).get("hardLimitKib")
        st = obj.get("status") or {}
        return power.Decision(
            power.Action.NONE, "Stopped", False, "MemoryLimitExceeded",
            "the kernel killed QEMU: the guest used more memory than its hard limit"
            f"{f' ({limit} KiB)' if limit else ''}; it stays stopped until the spec changes",
            halt=st.get("haltedGeneration") != gen)

    async def _capacities(self, guest: Guest, live: DomainConfig, sizes: dict[str, int]) -> dict[str, int]:
        out = {}
        for disk in live.devices.disks:
            if disk.alias in sizes and disk.target_dev:
                out[disk.alias] = (await guest.block_info(disk.target_dev))[0]
        return out

    async def _clone_leaves(self, obj: dict) -> dict | None:
        """The clone's disk chains, its leaves made over the forClone snapshot (None: reported, not yet)."""
        ns, source = obj["metadata"]["namespace"], obj["spec"]["cloneFrom"]["snapshot"]
        snap = self.snapshots.get((ns, source))
        if snap is None or (snap.get("status") or {}).get("phase") != "Ready":
            await self._failed(obj, "CloneSourceNotReady", f"VMSnapshot {ns}/{source} is not Ready on node "
                               f"{self.cfg.node_name}")
            return None
        try:
            return await asyncio.to_thread(clone.leaves, obj["spec"], snap, tuple(map(str, self.cfg.storage_roots)))
        except (StorageError, Refusal) as exc:
            await self._failed(obj, exc.reason, exc.message)
            return None

    def _domain_type(self, spec: VirtualMachineSpec) -> str:
        if spec.domain_type != "auto":
            return spec.domain_type
        return "kvm" if self.has_kvm else "qemu"

    @staticmethod
    def _name(obj: dict) -> str:
        return default_domain_name(obj["metadata"]["namespace"], obj["metadata"]["name"])

    # -- one-shot requests ---------------------------------------------------------------------

    async def _run_requests(self, obj: dict, guest: Guest) -> dict[str, dict]:
        st = obj.get("status") or {}
        outcomes = requests.carried(st)
        todo, interrupted = requests.pending(obj["spec"], st)
        outcomes.update(interrupted)
        for req in todo:
            field = requests.REQUESTS[req.kind]
            seen = await self.observe(guest)
            if seen.state not in ("running", "blocked", "paused" if req.kind == "restart" else "running"):
                outcomes[field] = requests.outcome(req.id, "Failed", f"the VM is not running ({seen.state})")
                continue
            # Record the attempt first: a crash after the action must not repeat it.
            outcomes[field] = requests.outcome(req.id, "InProgress")
            await self.write(obj, report.now(obj, guest, seen, outcomes))
            if req.kind == "restart":
                obj.setdefault("status", {}).pop("shutdown", None)
                mode = obj["spec"].get("shutdown", {}).get("mode", "acpi")
                await self.event(obj, "Restarting", f"restart {req.id}: {mode} shutdown, then start")
                continue
            try:
                if req.kind == "reboot":
                    await guest.reboot(req.mode or "acpi")
                else:
                    await guest.reset()
                outcomes[field] = requests.outcome(req.id, "Succeeded")
                await self.event(obj, req.kind.capitalize(), f"{req.kind} {req.id} done")
            except HypervisorError as exc:
                outcomes[field] = requests.outcome(req.id, "Failed", f"{exc.reason}: {exc.message}")
                await self.event(obj, f"{req.kind.capitalize()}Failed", exc.message, warning=True)
        return outcomes

    async def _restart_progress(self, obj, decision: power.Decision, refused, id_: str) -> dict[str, dict]:
        if decision.action in (power.Action.START, power.Action.START_PAUSED):
            obj.setdefault("status", {}).pop("shutdown", None)
            await self.event(obj, "Restarted", f"restart {id_} done")
            return {"lastRestart": requests.outcome(id_, "Succeeded")}
        if decision.timed_out:
            obj.setdefault("status", {}).pop("shutdown", None)
            await self.event(obj, "RestartFailed", decision.message, warning=True)
            return {"lastRestart": requests.outcome(id_, "Failed", decision.message)}
        return {}

    # -- power ---------------------------------------------------------------------------------

    def desired(self, obj: dict, spec: VirtualMachineSpec, stopping: bool) -> power.Desired:
        return power.Desired(
            power_state="Stopped" if stopping else spec.power_state, restart_policy=spec.restart_policy,
            shutdown_mode=spec.shutdown.mode, shutdown_timeout=float(spec.shutdown.timeout_seconds),
            force_after_timeout=spec.shutdown.force_after_timeout,
            generation=obj["metadata"].get("generation", 1),
            deleting=bool(obj["metadata"].get("deletionTimestamp")),
        )

    @staticmethod
    def history(st: dict) -> power.History:
        shutdown = st.get("shutdown") or {}
        return power.History(phase=st.get("phase"), halted_generation=st.get("haltedGeneration"),
                             shutdown_elapsed=_since(shutdown.get("requestedAt")),
                             shutdown_sent_elapsed=_since(shutdown.get("lastSentAt")))

    async def observe(self, guest: Guest) -> power.Observed:
        ps = await guest.state()
        return power.Observed(ps.state, ps.reason)

    def eventer(self, obj: dict):
        async def post(reason: str, message: str, warning: bool = False) -> None:
            await self.event(obj, reason, message, warning)
        return post

    # -- status --------------------------------------------------------------------------------

    async def _failed(self, obj: dict, reason: str, message: str, guest: Guest | None = None,
                      lookup: bool = True) -> None:
        """Reports a failure; when libvirt is unreachable nothing more is asked of it."""
        active = None
        if reason != "ConnectionLost" and lookup:
            try:
                guest = guest or await self.host.lookup(obj["metadata"]["uid"])
                active = guest is not None and (await self.observe(guest)).state in power.ACTIVE_STATES
            except HypervisorError:
                guest, active = None, None
        st = obj.get("status") or {}
        fresh = report.previous_reason(st) != reason or (conditions_generation(st) != obj["metadata"].get("generation"))
        await self.write(obj, report.failure(obj, reason, message, guest, active, self.cfg))
        if fresh:
            await self.event(obj, reason, message, warning=True)

    async def write(self, obj: dict, rep: report.status.Report) -> None:
        updated = await report.status.apply(obj, rep, self.cfg.node_name)
        if updated is not None:
            self.store.put(updated)
            obj["status"] = updated.get("status", {})
            obj["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"]

    async def event(self, obj: dict, reason: str, message: str, warning: bool = False) -> None:
        """Post in the background: Events are advisory and must not slow a reconcile pass."""
        snapshot = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": dict(obj["metadata"])}
        task = asyncio.create_task(asyncio.to_thread(
            events.post, snapshot, reason, message, warning=warning, component=COMPONENT))
        self._pending_events.add(task)
        task.add_done_callback(self._pending_events.discard)

    async def set_finalizer(self, obj: dict, add: bool) -> dict:
        md = obj["metadata"]
        current = list(md.get("finalizers") or [])
        if not add and meta.AGENT_FINALIZER in current:
            # Conditional on the finalizer list alone: a status write since (ours, the controller's) does not
            # make the removal conflict and wait for another pass, as a resourceVersion precondition would.
            at = f"/metadata/finalizers/{current.index(meta.AGENT_FINALIZER)}"
            try:
                return await asyncio.to_thread(resources.json_patch, resources.VMS, md["namespace"], md["name"],
                                               [{"op": "test", "path": at, "value": meta.AGENT_FINALIZER},
                                                {"op": "remove", "path": at}])
            except ApiException as exc:
                if exc.status != 422:  # 422: the list changed meanwhile; below, on the version we know
                    raise
        wanted = ([*current, meta.AGENT_FINALIZER] if add
                  else [f for f in current if f != meta.AGENT_FINALIZER])
        patch = {"metadata": {"finalizers": wanted, "resourceVersion": md["resourceVersion"]}}
        updated = await asyncio.to_thread(resources.merge_patch, resources.VMS, md["namespace"], md["name"], patch)
        if add:
            self.store.put(updated)
        return updated


def conditions_generation(st: dict) -> int | None:
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return ready.get("observedGeneration")


def _since(stamp: str | None) -> float | None:
    if not stamp:
        return None
    started = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - started).total_seconds()
