"""Every VirtualMachine as placement sees it, kept current by the controller's watch (no listing per decision).

The index answers in O(1) what a decision needs: the memory used on each node, the VMs on a
node (for disk conflicts), and who holds a MAC. It is fed three ways:

- watch events (`update` / `remove`), as kopf delivers them;
- the controller's own decisions (`reserve`), at once, before the label patch is even sent, so
  the next decision counts them; `release` takes a reservation back if the patch fails;
- a full listing (`seed`), before the first decision and then now and again: the watch may
  have missed a deletion (a 410 re-list says nothing of objects gone meanwhile).

A VM's node never reverts to "unplaced" on a watch event: an event older than our own label
patch may arrive after it. Only `release` (our patch failed) and `remove` clear it.
"""

from __future__ import annotations

from collections.abc import Iterable

from libvirt_operator.controller.placement import VMRef


class VMIndex:
    def __init__(self) -> None:
        self._refs: dict[str, VMRef] = {}
        self._touched: dict[str, float] = {}  # uid -> monotonic time of its last event
        self._gone: dict[str, float] = {}  # uid -> when its DELETED arrived (until the next seed)
        self._used: dict[str, int] = {}  # node -> bytes reserved by the VMs on it
        self._on: dict[str, dict[str, VMRef]] = {}  # node -> uid -> VM
        self._macs: dict[str, set[str]] = {}  # mac -> uids
        self.seeded_at: float | None = None  # monotonic time the last seed's listing started

    # -- reads

    def __len__(self) -> int:
        return len(self._refs)

    def get(self, uid: str) -> VMRef | None:
        return self._refs.get(uid)

    def used(self, node: str) -> int:
        return self._used.get(node, 0)

    def on(self, node: str) -> Iterable[VMRef]:
        return self._on.get(node, {}).values()

    def holders(self, macs: Iterable[str]) -> list[VMRef]:
        uids = set().union(*(self._macs.get(m, ()) for m in macs))
        return [self._refs[u] for u in uids]

    # -- writes

    def update(self, ref: VMRef, at: float) -> None:
        """A watch event's view of a VM (never un-places it)."""
        old = self._refs.get(ref.uid)
        if old is not None and old.node and not ref.node:
            ref = _with_node(ref, old.node)
        self._touched[ref.uid] = at
        self._gone.pop(ref.uid, None)
        self._put(ref)

    def remove(self, uid: str, at: float) -> None:
        self._drop(uid)
        self._touched.pop(uid, None)
        self._gone[uid] = at

    def reserve(self, ref: VMRef, node: str) -> VMRef | None:
        """Count `ref` on `node` now; returns the entry it replaced (for `release`)."""
        old = self._refs.get(ref.uid)
        self._put(_with_node(ref, node))
        return old

    def release(self, uid: str, previous: VMRef | None) -> None:
        """Undo a reservation whose label patch failed."""
        if previous is None:
            self._drop(uid)
        else:
            self._put(previous)

    def seed(self, listed: Iterable[VMRef], listed_at: float) -> None:
        """Merge a full listing whose request started at `listed_at` (monotonic).

        What the watch said after the listing started wins; VMs the listing does not show and
        nothing touched since are gone.
        """
        listed = {ref.uid: ref for ref in listed}
        for uid in list(self._refs):
            if uid not in listed and self._touched.get(uid, -1.0) < listed_at:
                self._drop(uid)
                self._touched.pop(uid, None)
        for uid, ref in listed.items():
            if self._touched.get(uid, -1.0) >= listed_at or self._gone.get(uid, -1.0) >= listed_at:
                continue
            old = self._refs.get(uid)
            if old is not None and old.node and not ref.node:
                ref = _with_node(ref, old.node)
            self._put(ref)
        self._gone = {u: t for u, t in self._gone.items() if t >= listed_at}
        self.seeded_at = listed_at

    # -- bookkeeping

    def _put(self, ref: VMRef) -> None:
        self._drop(ref.uid)
        self._refs[ref.uid] = ref
        if ref.node:
            self._used[ref.node] = self._used.get(ref.node, 0) + ref.memory_bytes
            self._on.setdefault(ref.node, {})[ref.uid] = ref
        for mac in ref.macs:
            self._macs.setdefault(mac, set()).add(ref.uid)

    def _drop(self, uid: str) -> None:
        old = self._refs.pop(uid, None)
        if old is None:
            return
        if old.node:
            self._used[old.node] -= old.memory_bytes
            if not self._used[old.node]:
                del self._used[old.node]
            on = self._on[old.node]
            on.pop(uid, None)
            if not on:
                del self._on[old.node]
        for mac in old.macs:
            holders = self._macs[mac]
            holders.discard(uid)
            if not holders:
                del self._macs[mac]


def _with_node(ref: VMRef, node: str) -> VMRef:
    return VMRef(ref.uid, ref.name, ref.memory_bytes, ref.disks, ref.pinned_node, node, ref.macs, ref.created,
                 ref.cpu_reserved)
