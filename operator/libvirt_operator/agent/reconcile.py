"""Level-based reconciliation of one VirtualMachine against this node's libvirt domain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException

from libvirt_operator.agent import power, requests, status, storage
from libvirt_operator.agent.config import AgentConfig
from libvirt_operator.agent.store import Key, VMStore
from libvirt_operator.api import meta
from libvirt_operator.api.base import utcnow
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.addresses import carry_over_addresses
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.naming import default_domain_name
from libvirt_operator.domain.render import render_domain
from libvirt_operator.hypervisor.errors import HypervisorError
from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.kube import conditions, events, resources
from libvirt_operator.kube.conditions import Cond
from libvirt_operator.metrics import agent as metrics

log = logging.getLogger(__name__)
COMPONENT = "libvirt-operator-agent"


class Reconciler:
    def __init__(self, cfg: AgentConfig, host: Host, store: VMStore):
        self.cfg = cfg
        self.host = host
        self.store = store
        self.has_kvm = False  # learned from the host's domain capabilities at startup
        self._failures: dict[Key, int] = {}
        self._pending_events: set[asyncio.Task] = set()

    async def __call__(self, key: Key) -> float | None:
        with metrics.reconcile() as outcome:
            return await self._handle(key, outcome)

    async def _handle(self, key: Key, outcome: metrics.Pass) -> float | None:
        obj = self.store.get(key)
        if obj is None:
            outcome.result = "gone"
            return None
        try:
            again = await self._reconcile(obj)
            self._failures.pop(key, None)
            return again
        except HypervisorError as exc:
            outcome.result = "libvirt_error"
            log.warning("%s/%s: %s: %s", *key, exc.reason, exc.message)
            await self._report_failure(obj, exc.reason, exc.message)
            return self._backoff(key)
        except ApiException as exc:
            outcome.result = {404: "gone", 409: "conflict"}.get(exc.status, "api_error")
            if exc.status == 404:
                return None
            if exc.status == 409:
                return 0.2
            log.warning("%s/%s: API error %s: %s", *key, exc.status, exc.reason)
            return self._backoff(key)

    def _backoff(self, key: Key) -> float:
        n = self._failures[key] = self._failures.get(key, 0) + 1
        return min(2.0 ** n, 60.0)

    # -- the pass ----------------------------------------------------------------------------

    async def _reconcile(self, obj: dict) -> float | None:
        md = obj["metadata"]
        deleting = bool(md.get("deletionTimestamp"))
        if deleting and meta.AGENT_FINALIZER not in (md.get("finalizers") or []):
            return None
        spec = VirtualMachineSpec.model_validate(obj["spec"])
        guest = await self.host.lookup(md["uid"])
        if deleting:
            return await self._teardown(obj, spec, guest)
        if meta.AGENT_FINALIZER not in (md.get("finalizers") or []):
            obj = await self._set_finalizer(obj, add=True)

        problems = storage.outside_roots(spec, self.cfg.storage_roots)
        if problems:
            await self._report_failure(obj, "PathNotAllowed", "; ".join(problems), guest)
            return None
        guest = await self._ensure_defined(obj, spec, guest)
        if guest is None:
            return 30.0

        st = obj.get("status") or {}
        outcomes = await self._run_requests(obj, guest)
        seen = await self._observe(guest)
        decision = power.decide(self._desired(obj, spec), seen, self._history(st))
        await self._act(obj, spec, guest, decision)
        seen = await self._observe(guest)
        return await self._report(obj, spec, guest, seen, decision, outcomes)

    async def _ensure_defined(self, obj: dict, spec: VirtualMachineSpec, guest: Guest | None) -> Guest | None:
        md = obj["metadata"]
        name = default_domain_name(md["namespace"], md["name"])
        if guest is None:
            missing = storage.missing_files(spec)
            if missing:
                await self._report_failure(obj, "FileNotFound", "; ".join(missing))
                return None
            other = await self.host.lookup_by_name(name)
            if other is not None:
                await self._report_failure(obj, "DomainNameConflict",
                                           f"domain {name} exists on this node with another uuid ({other.uuid})")
                return None
        wanted = self._render(obj, spec, name)
        if guest is not None:
            stored = DomainConfig.from_xml(await guest.xml(inactive=True))
            if not stored.is_stale(wanted):
                return guest
            carry_over_addresses(wanted, stored)  # devices keep their PCI slots (and guest names)
        verb = "Redefined" if guest is not None else "Defined"
        guest = await self.host.define(wanted.to_xml())
        await self._event(obj, verb, f"domain {name} {verb.lower()} on {self.cfg.node_name}")
        return guest

    def _render(self, obj: dict, spec: VirtualMachineSpec, name: str) -> DomainConfig:
        md = obj["metadata"]
        return render_domain(
            spec, name=name, uuid=md["uid"], namespace=md["namespace"], vm_name=md["name"],
            generation=md.get("generation", 1), domain_type=self._resolve_domain_type(spec),
            console_log=str(self.cfg.console_log_dir / f"{name}.console.log"),
        )

    def _resolve_domain_type(self, spec: VirtualMachineSpec) -> str:
        if spec.domain_type != "auto":
            return spec.domain_type
        return "kvm" if self.has_kvm else "qemu"

    # -- one-shot requests ---------------------------------------------------------------------

    async def _run_requests(self, obj: dict, guest: Guest) -> dict[str, dict]:
        st = obj.get("status") or {}
        outcomes = requests.carried(st)
        todo, interrupted = requests.pending(obj["spec"], st)
        outcomes.update(interrupted)
        for req in todo:
            field = requests.REQUESTS[req.kind]
            seen = await self._observe(guest)
            if seen.state not in ("running", "blocked"):
                outcomes[field] = requests.outcome(req.id, "Failed", f"the VM is not running ({seen.state})")
                continue
            # Record the attempt first: a crash after the action must not repeat it.
            outcomes[field] = requests.outcome(req.id, "InProgress")
            await self._write(obj, await self._report_now(obj, guest, outcomes))
            try:
                if req.kind == "reboot":
                    await guest.reboot(req.mode or "acpi")
                else:
                    await guest.reset()
                outcomes[field] = requests.outcome(req.id, "Succeeded")
                await self._event(obj, req.kind.capitalize(), f"{req.kind} {req.id} done")
            except HypervisorError as exc:
                outcomes[field] = requests.outcome(req.id, "Failed", f"{exc.reason}: {exc.message}")
                await self._event(obj, f"{req.kind.capitalize()}Failed", exc.message, warning=True)
        return outcomes

    async def _report_now(self, obj: dict, guest: Guest, outcomes: dict) -> status.Report:
        st = obj.get("status") or {}
        seen = await self._observe(guest)
        phase = st.get("phase") or "Running"
        ready = Cond("Ready", seen.state == "running", "Running" if seen.state == "running" else "NotRunning")
        return status.Report(phase=phase, ready=ready, generation=obj["metadata"].get("generation", 1),
                             domain={"name": guest.name, "uuid": guest.uuid},
                             halted_generation=st.get("haltedGeneration"), shutdown=st.get("shutdown"),
                             requests=outcomes)

    # -- power ---------------------------------------------------------------------------------

    def _desired(self, obj: dict, spec: VirtualMachineSpec) -> power.Desired:
        return power.Desired(
            power_state=spec.power_state, restart_policy=spec.restart_policy,
            shutdown_mode=spec.shutdown.mode, shutdown_timeout=float(spec.shutdown.timeout_seconds),
            force_after_timeout=spec.shutdown.force_after_timeout,
            generation=obj["metadata"].get("generation", 1),
            deleting=bool(obj["metadata"].get("deletionTimestamp")),
        )

    @staticmethod
    def _history(st: dict) -> power.History:
        elapsed = None
        if st.get("shutdown", {}).get("requestedAt"):
            started = datetime.fromisoformat(st["shutdown"]["requestedAt"].replace("Z", "+00:00"))
            elapsed = (datetime.now(UTC) - started).total_seconds()
        return power.History(phase=st.get("phase"), halted_generation=st.get("haltedGeneration"),
                             shutdown_elapsed=elapsed)

    async def _observe(self, guest: Guest) -> power.Observed:
        ps = await guest.state()
        return power.Observed(ps.state, ps.reason)

    async def _act(self, obj: dict, spec: VirtualMachineSpec, guest: Guest, d: power.Decision) -> None:
        A = power.Action
        if d.action is A.NONE:
            return
        log.info("%s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], d.action.value)
        if d.action in (A.START, A.START_PAUSED):
            await guest.start(paused=d.action is A.START_PAUSED)
            await self._event(obj, "Started", d.message or f"started on {self.cfg.node_name}")
        elif d.action is A.RESUME:
            await guest.resume()
            await self._event(obj, "Resumed", "vCPUs resumed")
        elif d.action is A.SUSPEND:
            await guest.suspend()
            await self._event(obj, "Paused", "vCPUs paused")
        elif d.action is A.SHUTDOWN:
            if (await guest.state()).state == "paused":
                await guest.resume()
            await guest.shutdown(spec.shutdown.mode)
            obj.setdefault("status", {})["shutdown"] = {
                "mode": spec.shutdown.mode, "requestedAt": utcnow()}
            await self._event(obj, "ShuttingDown", f"{spec.shutdown.mode} shutdown requested")
        elif d.action is A.DESTROY:
            await guest.destroy()
            await self._event(obj, "PoweredOff", d.message or "powered off", warning=bool(d.message))

    # -- status --------------------------------------------------------------------------------

    async def _report(self, obj, spec, guest, seen, d: power.Decision, outcomes) -> float | None:
        st = obj.get("status") or {}
        gen = obj["metadata"].get("generation", 1)
        deleting = bool(obj["metadata"].get("deletionTimestamp"))
        active = seen.state in power.ACTIVE_STATES
        was_halted = st.get("haltedGeneration") == gen
        after = power.reassess(self._desired(obj, spec), seen, d, self._history(st))
        halted = gen if was_halted or after.halt else None
        stopping = active and (spec.power_state == "Stopped" or deleting)
        failure = Cond("Failure", True, "ShutdownTimeout", after.message) if after.timed_out else None
        report = status.Report(
            phase=after.phase, generation=gen,
            ready=Cond("Ready", after.converged and failure is None, after.reason, after.message),
            domain={"name": guest.name, "uuid": guest.uuid},
            agent_connected=await self._agent_condition(spec, guest, active),
            failure=failure, halted_generation=halted,
            shutdown=st.get("shutdown") if stopping else None, requests=outcomes,
        )
        await self._write(obj, report)
        if after.halt and not was_halted:
            await self._event(obj, after.reason, after.message, warning=True)
        return after.requeue if after.requeue is not None else d.requeue

    async def _agent_condition(self, spec: VirtualMachineSpec, guest: Guest, active: bool) -> Cond | None:
        if not spec.guest_agent:
            return None
        if not active:
            return Cond("AgentConnected", False, "DomainNotRunning")
        connected = await guest.agent_connected()
        return Cond("AgentConnected", connected, "Connected" if connected else "NotConnected",
                    "" if connected else "qemu-guest-agent has not connected on its channel")

    async def _report_failure(self, obj: dict, reason: str, message: str, guest: Guest | None = None) -> None:
        st = obj.get("status") or {}
        gen = obj["metadata"].get("generation", 1)
        previous = conditions.find(st, "Failure") or {}
        fresh = st.get("observedGeneration") != gen or previous.get("reason") != reason
        spec = VirtualMachineSpec.model_validate(obj["spec"])
        guest = guest or await self.host.lookup(obj["metadata"]["uid"])
        active = guest is not None and (await self._observe(guest)).state in power.ACTIVE_STATES
        report = status.Report(
            phase=(st.get("phase") or "Failed") if active else "Failed",
            generation=gen, ready=Cond("Ready", False, reason, message),
            domain={"name": guest.name, "uuid": guest.uuid} if guest else None,
            agent_connected=await self._agent_condition(spec, guest, active) if guest else None,
            failure=Cond("Failure", True, reason, message),
            halted_generation=st.get("haltedGeneration"), shutdown=st.get("shutdown"),
            requests=requests.carried(st),
        )
        await self._write(obj, report)
        if fresh:
            await self._event(obj, reason, message, warning=True)

    async def _write(self, obj: dict, report: status.Report) -> None:
        updated = await status.apply(obj, report)
        if updated is not None:
            self.store.put(updated)
            obj["status"] = updated.get("status", {})
            obj["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"]

    async def _event(self, obj: dict, reason: str, message: str, warning: bool = False) -> None:
        """Post in the background: Events are advisory and must not slow a reconcile pass."""
        snapshot = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": dict(obj["metadata"])}
        task = asyncio.create_task(asyncio.to_thread(
            events.post, snapshot, reason, message, warning=warning, component=COMPONENT))
        self._pending_events.add(task)
        task.add_done_callback(self._pending_events.discard)

    # -- deletion ------------------------------------------------------------------------------

    async def _teardown(self, obj: dict, spec: VirtualMachineSpec, guest: Guest | None) -> float | None:
        if guest is not None:
            seen = await self._observe(guest)
            if seen.state in power.ACTIVE_STATES:
                d = power.decide(self._desired(obj, spec), seen, self._history(obj.get("status") or {}))
                await self._act(obj, spec, guest, d)
                seen = await self._observe(guest)
                if seen.state in power.ACTIVE_STATES:
                    return await self._report(obj, spec, guest, seen, d, requests.carried(obj.get("status") or {}))
            await guest.undefine()
            await self._event(obj, "Undefined", f"domain {guest.name} removed from {self.cfg.node_name}")
        if spec.disk_deletion_policy == "Delete":
            await self._delete_disks(obj, spec)
        await self._set_finalizer(obj, add=False)
        return None

    async def _delete_disks(self, obj: dict, spec: VirtualMachineSpec) -> None:
        if storage.outside_roots(spec, self.cfg.storage_roots):
            return  # never delete anything outside the storage roots
        for disk in spec.disks:
            if disk.device == "disk" and not disk.read_only and disk.path:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(os.remove, disk.path)
                    await self._event(obj, "DiskDeleted", f"deleted {disk.path} (diskDeletionPolicy: Delete)")

    async def _set_finalizer(self, obj: dict, add: bool) -> dict:
        md = obj["metadata"]
        current = list(md.get("finalizers") or [])
        wanted = ([*current, meta.AGENT_FINALIZER] if add
                  else [f for f in current if f != meta.AGENT_FINALIZER])
        patch = {"metadata": {"finalizers": wanted, "resourceVersion": md["resourceVersion"]}}
        updated = await asyncio.to_thread(resources.merge_patch, resources.VMS, md["namespace"], md["name"], patch)
        if add:
            self.store.put(updated)
        return updated
