"""Long operations (snapshot create, revert, delete): one job per VM at a time, each an asyncio task
outside the reconcile work queue, so the VM is still observed (and reported) meanwhile.

A job's work starts only once no reconcile pass of its VM is under way (`pass_of`): a pass that began
before the job could otherwise act on what it read before the job changed the domain (redefine it
over a chain the job has just recorded). A pass that starts while a job holds the VM sees `busy`.

A job writes its state before each step it takes (in the object it works for), which is how a
restarted agent finds it again: the same entry point is called once more and carries on, or fails
cleanly, from the recorded step. The runner itself keeps nothing that must survive a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from libvirt_operator.hypervisor.guest import Guest
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.storage.chain import Chain
from libvirt_operator.storage.references import References

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    host: Host
    roots: tuple[str, ...]
    vm: dict | None  # the VM object (None when it is gone: delete only)
    snapshot: dict  # the VMSnapshot object
    guest: Guest | None
    write: Callable[[dict], Awaitable[None]]  # VMSnapshot status fields to merge and apply
    write_revert: Callable[[dict], Awaitable[None]]  # the VM's status.lastRevert outcome
    references: Callable[[], References]
    record: Callable[[Guest, dict[str, Chain]], Awaitable[None]]
    event: Callable[[str, str, bool], Awaitable[None]]
    scratch: dict = field(default_factory=dict)  # what one step of a job hands on to the next


@dataclass(frozen=True)
class Running:
    kind: str  # SnapshotInProgress | RevertInProgress | SnapshotDeleting
    what: str  # e.g. "snapshot default/s1"


class JobRunner:
    def __init__(self, on_done: Callable[[str], None]):
        """`on_done(vm_uid)` runs when a job ends (the VM's key is reconciled again)."""
        self._jobs: dict[str, tuple[Running, asyncio.Task]] = {}
        self._on_done = on_done
        self._passes: dict[str, int] = {}  # vm uid -> reconcile passes under way
        self._pass_ended: dict[str, asyncio.Event] = {}  # set when the VM's last pass ends

    @contextlib.contextmanager
    def pass_of(self, vm_uid: str):
        """Marks a reconcile pass of the VM as under way: a job started meanwhile waits for it to end."""
        self._passes[vm_uid] = self._passes.get(vm_uid, 0) + 1
        try:
            yield
        finally:
            left = self._passes.pop(vm_uid) - 1
            if left:
                self._passes[vm_uid] = left
            else:
                ended = self._pass_ended.pop(vm_uid, None)
                if ended is not None:
                    ended.set()

    async def _after_passes(self, vm_uid: str) -> None:
        while vm_uid in self._passes:
            await self._pass_ended.setdefault(vm_uid, asyncio.Event()).wait()

    def busy(self, vm_uid: str) -> Running | None:
        held = self._jobs.get(vm_uid)
        return held[0] if held else None

    def start(self, vm_uid: str, running: Running, work: Callable[[], Awaitable[None]]) -> bool:
        """Starts `work` for the VM unless a job holds it already (False then)."""
        if vm_uid in self._jobs:
            return False
        task = asyncio.create_task(self._run(vm_uid, running, work), name=f"job-{running.kind}-{vm_uid}")
        self._jobs[vm_uid] = (running, task)
        return True

    async def _run(self, vm_uid: str, running: Running, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await self._after_passes(vm_uid)
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:  # the job reports its own failures; a bug is logged and retried by recovery
            log.exception("%s (%s) crashed", running.what, running.kind)
        finally:
            self._jobs.pop(vm_uid, None)
            self._on_done(vm_uid)

    async def stop(self) -> None:
        tasks = [t for _, t in self._jobs.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
