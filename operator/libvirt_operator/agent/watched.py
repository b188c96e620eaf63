"""The watch side shared by the agent's VMSnapshot and VMMigration handling: a store of this node's
objects, one task per event (outside the VM work queue), and retries after API errors and bugs.

A subclass sets KIND (for logs) and implements `_handle(key)`, which reads the object (`read`) and
acts; a 404 ends the handling (the object is gone), a 409 is tried again soon, another error later."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from libvirt_operator.agent.store import Key, VMStore, key_of
from libvirt_operator.api import meta
from libvirt_operator.kube import resources

log = logging.getLogger(__name__)
CONFLICT_RETRY_SECONDS = 0.5
API_ERROR_RETRY_SECONDS = 5.0
BUG_RETRY_SECONDS = 10.0


class WatchedObjects:
    KIND = "object"

    def __init__(self, vms: VMStore, node: str, store: VMStore | None = None):
        self.vms, self.node = vms, node  # this node's VMs (the agent's store)
        self.objects = store if store is not None else VMStore()
        self._tasks: set[asyncio.Task] = set()
        self._retries: dict[Key, asyncio.TimerHandle] = {}

    def on_event(self, event: dict) -> None:
        obj = event["object"]
        if event.get("type") == "DELETED":
            self.objects.remove(obj)
            return
        self.objects.put(obj)
        self._spawn(key_of(obj))

    def handle_all(self) -> None:
        for key in self.objects.all_keys():
            self._spawn(key)

    def handle_for_vm(self, vm_key: Key) -> None:
        """After something on the VM ended: its objects may be waiting for it."""
        for key in self.objects.all_keys():
            obj = self.objects.get(key)
            if obj is not None and key[0] == vm_key[0] and obj["spec"]["vmName"] == vm_key[1]:
                self._spawn(key)

    def _spawn(self, key: Key) -> None:
        task = asyncio.ensure_future(self.handle(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, key: Key) -> None:
        try:
            await self._handle(key)
        except ApiException as exc:
            if exc.status == 404:
                return
            if exc.status != 409:
                log.warning("%s %s/%s: API error %s: %s", self.KIND, *key, exc.status, exc.reason)
            self._retry(key, CONFLICT_RETRY_SECONDS if exc.status == 409 else API_ERROR_RETRY_SECONDS)
        except Exception:
            log.exception("%s %s/%s: handling failed", self.KIND, *key)
            self._retry(key, BUG_RETRY_SECONDS)

    async def _handle(self, key: Key) -> None:
        raise NotImplementedError

    async def read(self, key: Key, vm_matters: Callable[[dict], bool]) -> dict | None:
        """The object from the store. When `vm_matters(obj)` and the VM it names is missing from the VM
        store, the API server is asked for that VM first (kept when it is on this node: its watch event may
        come after this object's, so a VM missing from the store is no proof that it is gone), and the
        object is read again, as other tasks ran during the call."""
        obj = self.objects.get(key)
        if obj is None or not vm_matters(obj):
            return obj
        namespace, name = obj["metadata"]["namespace"], obj["spec"]["vmName"]
        if self.vms.get((namespace, name)) is not None:
            return obj
        vm = await asyncio.to_thread(resources.get, resources.VMS, namespace, name)
        if vm is not None and ((vm.get("metadata") or {}).get("labels") or {}).get(meta.NODE_LABEL) == self.node:
            self.vms.put(vm)
        return self.objects.get(key)

    def _retry(self, key: Key, delay: float) -> None:
        old = self._retries.pop(key, None)
        if old:
            old.cancel()
        self._retries[key] = asyncio.get_running_loop().call_later(delay, lambda: self._spawn(key))

    def stop(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
