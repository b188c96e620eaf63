"""Issue 9 (FEATURES M1-M4) through the API server, the controller and both nodes' agents on real libvirtd + QEMU:
VMMigrations of type Live (shared storage), Storage (blockcopy on the node) and WholeMachine (local disks into
another node's local root at a different path), aborts, auto-converge, bad input and faults.

The world's agents each have the shared root (storage_dir, declared shared) and their own local root
<world>/nodes/<name>/local-images (hack/localenv/operator.py start_node_agent).

Every migration is proven inside the guest (uptime never goes backwards, boot_id, a RAM marker in its tmpfs, a data
disk region's sha256, qemu-ga answering where status says the VM is) and on the hosts (exactly one QEMU, owned by the
node status names; no definition on the other node; qemu-img chains). Waits are generous (TCG on two loaded cores);
no duration is asserted."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from kubernetes import client

from libvirt_operator.api import meta
from localenv.kubenodes import register_node
from localenv.operator import NAMESPACE, local_root
from localenv.simnodes import SimNodes
from tests.e2e.test_snapshots import DATA_SECTORS, Snapshots, chain, check_clean, dev, status_disk
from tests.e2e.vmtools import CustomObjects, condition, guest_run, manifest, placement_facts, wait_runs_only_on

pytestmark = pytest.mark.migration  # needs the agent (migration_jobs) and controller (migrations) of issue 9

TERMINAL = ("Succeeded", "Failed", "Aborted")
ACTIVE = ("PreChecking", "Running", "HandingOver")
MIGRATION_TIMEOUT = 420.0
BOOT_TIMEOUT = 180.0
PARENT_SECTOR = 100  # written into raw parents on the host before the boot
OTHER = {"node-a": "node-b", "node-b": "node-a"}


# -- VMMigrations through the API server ---------------------------------------------------------------------

class Migrations(CustomObjects):
    kind, plural = "VMMigration", "vmmigrations"

    def wait(self, name: str, check, what: str, timeout: float = MIGRATION_TIMEOUT, every: float = 0.2,
             seen: list | None = None) -> dict | None:
        """Polls until check(obj) holds; every object read goes to `seen` (when given)."""
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = self.get(name)
            if seen is not None and obj is not None:
                seen.append(obj)
            if check(obj):
                return obj
            time.sleep(every)
        raise AssertionError(f"VMMigration {name}: timed out waiting for {what}; last: {dump(obj)}")

    def settled(self, name: str, timeout: float = MIGRATION_TIMEOUT, seen: list | None = None) -> dict:
        return self.wait(name, lambda m: phase(m) in TERMINAL, "a terminal phase", timeout, seen=seen)

    def succeeded(self, name: str, timeout: float = MIGRATION_TIMEOUT, seen: list | None = None) -> dict:
        m = self.settled(name, timeout, seen)
        assert phase(m) == "Succeeded", f"VMMigration {name} ended {phase(m)}: {dump(m)}"
        return m

    def refused(self, name: str, reason: str, timeout: float = 120) -> dict:
        m = self.settled(name, timeout)
        ready = condition(m, "Ready")
        assert phase(m) == "Failed" and ready.get("status") == "False" and ready.get("reason") == reason, (
            f"VMMigration {name}: expected Failed with Ready=False reason {reason}, got {dump(m)}")
        assert ready.get("message"), f"a refusal says why: {dump(m)}"
        return m

    def delete_created(self) -> None:
        for name in self.created:
            self.delete(name)
        stuck = {}
        for name in self.created:
            try:
                self.wait(name, lambda m: m is None, "deletion", 180)
            except AssertionError:
                stuck[name] = self.get(name)
        self.created.clear()
        assert not stuck, f"VMMigrations not deleted: {dump(stuck)}"


@pytest.fixture
def migs(cluster, vms):
    m = Migrations(cluster)
    yield m
    m.delete_created()


@pytest.fixture
def snaps(cluster):
    s = Snapshots(cluster)
    yield s
    s.delete_created()


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def dump(obj) -> str:
    return json.dumps(obj, default=str, indent=None)[-6000:]


def vm_state(vm: dict) -> str:
    """The VM's node label, status.nodeName, phase, Ready and status.migration, for failure messages."""
    st = vm.get("status") or {}
    return dump({"label": vm["metadata"].get("labels", {}).get(meta.NODE_LABEL), "nodeName": st.get("nodeName"),
                 "phase": st.get("phase"), "generation": vm["metadata"].get("generation"),
                 "observedGeneration": st.get("observedGeneration"), "conditions": st.get("conditions"),
                 "migration": st.get("migration"), "disks": st.get("disks")})


# -- the guest, its disks and its proofs --------------------------------------------------------------------

def qcow2(path: Path, size: str, backing: Path | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = ["-b", str(backing), "-F", "raw"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
    return str(path)


def raw_parent(path: Path, size: int, text: str) -> Path:
    """A sparse raw file of `size` bytes holding `text` at sector PARENT_SECTOR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(PARENT_SECTOR * 512)
        f.write(text.ljust(64, ".").encode())
    return path


def boot(vms, cluster, name: str, node: str, disk_dir: Path, parent: bool = False, **spec) -> dict:
    """A VM pinned to `node` with a 64 MiB root disk and a 32 MiB data disk under `disk_dir`; with `parent`, the
    data disk is a qcow2 leaf over a raw parent that holds a host-written marker. Waits for Ready + the agent."""
    backing = raw_parent(disk_dir / f"{name}-data-base.raw", 32 << 20, f"PARENT-{name}") if parent else None
    disks = [{"name": "root", "path": qcow2(disk_dir / f"{name}-root.qcow2", "64M"), "format": "qcow2"},
             {"name": "data", "path": qcow2(disk_dir / f"{name}-data.qcow2", "32M", backing), "format": "qcow2"}]
    vms.create(manifest(cluster, name, nodeName=node, disks=disks, **spec))
    vm = vms.wait(name, lambda v: condition(v, "Ready").get("status") == "True", "Ready", BOOT_TIMEOUT)
    vm = vms.wait(name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected",
                  BOOT_TIMEOUT)
    assert vm["status"]["nodeName"] == node, vm_state(vm)
    return vm


def agent_dom(cluster, node: str, uid: str, timeout: float = 240) -> libvirt.virDomain:
    """The domain on `node` once qemu-ga answers there."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            dom = libvirt.open(cluster.node(node).uri).lookupByUUIDString(uid)
            guest_run(dom, "true", timeout=5)
            return dom
        except (AssertionError, libvirt.libvirtError, KeyError, TimeoutError) as exc:
            last = exc
            assert time.monotonic() < deadline, f"qemu-ga of {uid} does not answer on {node}: {last}"
            time.sleep(0.5)


def data_region_sha(dom) -> str:
    return guest_run(dom, f"echo 3 > /proc/sys/vm/drop_caches; dd if={dev(dom, DATA_SECTORS)} bs=1M count=2 "
                          "skip=8 2>/dev/null | sha256sum").split()[0]


def uptime(dom) -> float:
    return float(guest_run(dom, "cat /proc/uptime").split()[0])


class Proof:
    """What the guest must keep across a migration: its boot, its RAM (a tmpfs marker), its data disk's bytes
    (a 2 MiB region of random bytes written before; a host-written parent marker when there is a parent)."""

    def __init__(self, cluster, vm: dict, parent: bool = False):
        self.cluster, self.uid, self.name = cluster, vm["metadata"]["uid"], vm["metadata"]["name"]
        dom = agent_dom(cluster, vm["status"]["nodeName"], self.uid)
        self.parent = parent
        self.boot_id = guest_run(dom, "cat /proc/sys/kernel/random/boot_id").strip()
        guest_run(dom, f"echo RAM-{self.name} > /tmp/marker-migration")
        guest_run(dom, f"dd if=/dev/urandom of={dev(dom, DATA_SECTORS)} bs=1M count=2 seek=8 conv=fsync "
                       "2>/dev/null; sync")
        self.data_sha = data_region_sha(dom)
        self.uptime = uptime(dom)

    def check(self, node: str) -> libvirt.virDomain:
        """The same guest answers on `node`, running on since: returns its domain there."""
        dom = agent_dom(self.cluster, node, self.uid)
        up = uptime(dom)
        assert up >= self.uptime, f"uptime went backwards: {self.uptime} -> {up}"
        self.uptime = up
        assert guest_run(dom, "cat /proc/sys/kernel/random/boot_id").strip() == self.boot_id, "the guest rebooted"
        assert guest_run(dom, "cat /tmp/marker-migration").strip() == f"RAM-{self.name}", "the RAM marker is lost"
        assert data_region_sha(dom) == self.data_sha, "the data disk's bytes changed"
        if self.parent:
            got = guest_run(dom, f"dd if={dev(dom, DATA_SECTORS)} bs=512 skip={PARENT_SECTOR} count=1 2>/dev/null")
            assert got.startswith(f"PARENT-{self.name}"), f"the parent's bytes: {got[:64]!r}"
        return dom


def settled_vm(vms, name: str, node: str, timeout: float = 240) -> dict:
    """The VM Ready on `node`: label, status.nodeName, observedGeneration current, phase Running."""
    def ok(v):
        st = v.get("status") or {}
        return (v["metadata"].get("labels", {}).get(meta.NODE_LABEL) == node and st.get("nodeName") == node
                and st.get("phase") == "Running" and condition(v, "Ready").get("status") == "True"
                and st.get("observedGeneration") == v["metadata"]["generation"])
    try:
        return vms.wait(name, ok, f"Running and Ready on {node}", timeout)
    except AssertionError as exc:
        vm = vms.get(name)
        raise AssertionError(f"{exc}\nVM: {vm_state(vm) if vm else '(absent)'}") from None


def assert_only_on(cluster, vms, name: str, node: str, timeout: float = 120) -> int:
    """The VM runs on `node` alone (one QEMU, the definition there only) and its status says so."""
    vm = vms.get(name)
    try:
        return wait_runs_only_on(cluster, vm["metadata"]["uid"], node, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nVM: {vm_state(vms.get(name))}") from None


def migration_record(vm: dict) -> dict:
    return (vm.get("status") or {}).get("migration") or {}


def files_of(vm: dict) -> set[str]:
    """Every file of every disk chain as the VM's status records it."""
    return {p for d in vm["status"]["disks"] if d.get("path") for p in [d["path"], *d.get("backingChain", [])]}


def shared_images(cluster) -> Path:
    return cluster.storage_dir / "images"


# -- M1: live migration with shared storage ---------------------------------------------------------------

def test_M1_live_migration_between_nodes_with_shared_storage(vms, migs, cluster, vm_name):
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    uid, files = vm["metadata"]["uid"], files_of(vm)
    proof = Proof(cluster, vm)
    assert_only_on(cluster, vms, vm_name, "node-a")

    # a bandwidth cap gives the progress reports a window (an idle guest moves in ~1 s otherwise)
    migs.create(f"{vm_name}-m1", vm_name, type="Live", targetNode="node-b", bandwidthMibPerSecond=8)
    seen: list[dict] = []
    vm_seen: list[dict] = []

    def watch(m):
        vm_seen.append(vms.get(vm_name))
        return phase(m) in TERMINAL
    m = migs.wait(f"{vm_name}-m1", watch, "a terminal phase", seen=seen)
    assert phase(m) == "Succeeded", dump(m)
    st = m["status"]
    assert st["sourceNode"] == "node-a" and st["targetNode"] == "node-b" and st["vmUid"] == uid, dump(st)
    assert condition(m, "Ready").get("status") == "True", dump(m)
    assert st.get("completionTime") and st.get("startTime"), dump(st)
    running = [s["status"]["progress"] for s in seen if phase(s) == "Running" and (s["status"].get("progress") or {})
               .get("percent") is not None]
    assert running, f"status.progress with a percent never seen while Running: {[s.get('status') for s in seen]}"
    assert any((p.get("dataTotalBytes") or 0) > 0 for p in running), running
    phases = [phase(s) for s in seen]
    assert "HandingOver" in phases or phases[-1] == "Succeeded", phases

    vm = settled_vm(vms, vm_name, "node-b")
    assert vm["spec"]["nodeName"] == "node-a", "spec.nodeName (the first placement) is never changed"
    rec = migration_record(vm)
    assert rec.get("state") == "Succeeded" and rec.get("uid") == m["metadata"]["uid"], vm_state(vm)
    assert rec["sourceNode"] == "node-a" and rec["targetNode"] == "node-b", vm_state(vm)
    assert files_of(vm) == files, "a Live migration leaves the disks where they are"
    assert_only_on(cluster, vms, vm_name, "node-b")
    proof.check("node-b")
    assert all(os.path.exists(f) for f in files)
    check_clean(*files)
    # the VM's own record went Migrating -> Landed -> Succeeded, never back
    states = [migration_record(v).get("state") for v in vm_seen if v is not None]
    states = [st for i, st in enumerate(states) if st and (i == 0 or st != states[i - 1])]
    order = ["Migrating", "Landed", "Succeeded"]
    assert all(st in order for st in states) and states == sorted(states, key=order.index), states
    reasons = {e.reason for e in vms.events(vm_name)}
    assert {"MigrationStarted", "Migrated"} <= reasons, reasons
    # it stays where it went (spec.nodeName=node-a does not pull it back): a spec edit is applied on node-b
    gen = vms.patch_spec(vm_name, {"shutdown": {"mode": "acpi", "timeoutSeconds": 61}})["metadata"]["generation"]
    vm = vms.wait(vm_name, lambda v: (v["status"].get("observedGeneration") or 0) >= gen, "the edit applied", 120)
    assert vm["status"]["nodeName"] == "node-b", vm_state(vm)
    assert_only_on(cluster, vms, vm_name, "node-b")


# -- M2: storage migration on the same node ------------------------------------------------------------

def test_M2_storage_migration_on_the_node_moves_the_chain(vms, migs, cluster, vm_name):
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster), parent=True)
    uid = vm["metadata"]["uid"]
    old = status_disk(vm, "data")
    assert len(old["backingChain"]) == 1, old
    old_files = [old["path"], *old["backingChain"]]
    root = status_disk(vm, "root")["path"]
    proof = Proof(cluster, vm, parent=True)
    pid = assert_only_on(cluster, vms, vm_name, "node-a")
    dest_dir = cluster.storage_dir / f"moved-{vm_name}"
    dest_dir.mkdir()
    dest = str(dest_dir / f"{vm_name}-data-moved.qcow2")

    migs.create(f"{vm_name}-m2", vm_name, type="Storage", disks=[{"name": "data", "destinationPath": dest}])
    m = migs.succeeded(f"{vm_name}-m2")
    assert m["status"].get("sourceNode") in (None, "node-a") and m["status"].get("targetNode") in (None, "node-a")

    vm = vms.wait(vm_name, lambda v: status_disk(v, "data")["path"] == dest, "status.disks on the new leaf", 120)
    vm = settled_vm(vms, vm_name, "node-a")
    new = status_disk(vm, "data")
    assert new["path"] == dest and len(new["backingChain"]) == 1, new
    new_parent = new["backingChain"][0]
    assert new_parent not in old_files and os.path.exists(new_parent), new
    assert chain(dest) == [dest, new_parent], "the file's own chain: new leaf -> new parent"
    moved = {d["name"]: d for d in m["status"].get("disks") or []}
    assert moved.get("data", {}).get("destinationFile") == dest, dump(m["status"])
    assert new_parent in moved["data"].get("copiedFiles", []), dump(m["status"])
    assert status_disk(vm, "root")["path"] == root and os.path.exists(root), "the root disk was not asked to move"
    gone = [f for f in old_files if os.path.exists(f)]
    assert not gone, f"old files left behind: {gone}"
    assert migration_record(vm).get("state") == "Succeeded", vm_state(vm)
    assert assert_only_on(cluster, vms, vm_name, "node-a") == pid, "blockcopy keeps the same QEMU"
    dom = proof.check("node-a")
    assert f"file='{dest}'" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace('"', "'"), (
        "the persistent definition names the new leaf")
    check_clean(dest, new_parent)
    assert vm["metadata"]["uid"] == uid


# -- M3: whole machine, local disks into the other node's local root (another path) -----------------------------

def test_M3_whole_machine_with_local_disks_to_a_root_at_another_path(vms, migs, cluster, vm_name):
    src_root, dst_root = local_root(cluster.node("node-b")), local_root(cluster.node("node-a"))
    assert src_root != dst_root and src_root.is_dir() and dst_root.is_dir()
    vm = boot(vms, cluster, vm_name, "node-b", src_root, parent=True)
    old_files = files_of(vm)
    assert all(f.startswith(f"{src_root}/") for f in old_files), old_files
    proof = Proof(cluster, vm, parent=True)
    pid = assert_only_on(cluster, vms, vm_name, "node-b")

    # A Live migration of local disks is refused (node-b's local root is not shared with node-a): nothing moves.
    migs.create(f"{vm_name}-live", vm_name, type="Live", targetNode="node-a")
    migs.refused(f"{vm_name}-live", "StorageRootMismatch")
    assert assert_only_on(cluster, vms, vm_name, "node-b") == pid
    migs.delete(f"{vm_name}-live")
    migs.wait(f"{vm_name}-live", lambda m: m is None, "the refused migration deleted", 120)

    migs.create(f"{vm_name}-m3", vm_name, type="WholeMachine", targetNode="node-a")
    m = migs.succeeded(f"{vm_name}-m3")
    assert m["status"]["sourceNode"] == "node-b" and m["status"]["targetNode"] == "node-a", dump(m["status"])
    assert (m["status"].get("target") or {}).get("storageRoot") == str(dst_root), dump(m["status"])

    vm = settled_vm(vms, vm_name, "node-a")
    new_files = files_of(vm)
    assert all(f.startswith(f"{dst_root}/") for f in new_files), f"not in node-a's local root: {vm_state(vm)}"
    assert {Path(f).name for f in new_files if Path(f).suffix == ".qcow2"} == {
        Path(f).name for f in old_files if Path(f).suffix == ".qcow2"}, "the leaves keep their names (default)"
    data = status_disk(vm, "data")
    assert len(data["backingChain"]) == 1 and chain(data["path"]) == [data["path"], data["backingChain"][0]], data
    assert all(os.path.exists(f) for f in new_files)
    left = [f for f in old_files if os.path.exists(f)]
    assert not left, f"source files left on node-b: {left}"
    assert migration_record(vm).get("state") == "Succeeded", vm_state(vm)
    assert_only_on(cluster, vms, vm_name, "node-a")
    dom = proof.check("node-a")
    sources = re.findall(r"<source file=['\"]([^'\"]+)['\"]", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert sorted(sources) == sorted(d["path"] for d in vm["status"]["disks"]), (
        f"the persistent definition runs the disks from node-a's files: {sources}")
    check_clean(*new_files)


# -- M4: a bandwidth-limited migration aborted by deleting it; a second one meanwhile is refused --------------

def test_M4_deleting_a_running_migration_aborts_it_and_a_second_is_refused(vms, migs, cluster, vm_name):
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    uid = vm["metadata"]["uid"]
    proof = Proof(cluster, vm)
    pid = assert_only_on(cluster, vms, vm_name, "node-a")

    name = f"{vm_name}-m4"
    migs.create(name, vm_name, type="Live", targetNode="node-b", bandwidthMibPerSecond=1)
    migs.wait(name, lambda m: phase(m) == "Running" and ((m["status"].get("progress") or {}).get("dataProcessedBytes")
                                                         or 0) > 0, "Running with data sent", 240)
    vm_during = vms.wait(vm_name, lambda v: migration_record(v).get("state") == "Migrating", "VM: Migrating", 60)

    migs.create(f"{vm_name}-second", vm_name, type="Live", targetNode="node-b")
    migs.refused(f"{vm_name}-second", "MigrationInProgress")

    migs.delete(name)
    seen: list[dict] = []
    migs.wait(name, lambda m: m is None, "the aborted migration gone", 240, seen=seen)
    assert not any(phase(s) in ("HandingOver", "Succeeded") for s in seen), [s.get("status") for s in seen]

    vm = settled_vm(vms, vm_name, "node-a")
    rec = migration_record(vm)
    assert rec.get("state") == "Aborted" and rec.get("name") == name, vm_state(vm)
    assert assert_only_on(cluster, vms, vm_name, "node-a") == pid, "the same QEMU runs the VM on the source"
    proof.check("node-a")
    assert vm["metadata"]["uid"] == uid
    # while the job ran, the VM said so
    assert condition(vm_during, "Ready").get("reason") == "MigrationInProgress" or any(
        c.get("reason") == "MigrationInProgress" for c in vm_during["status"].get("conditions", [])), vm_state(
        vm_during)


# -- auto-converge: a guest that dirties memory fast -------------------------------------------------------

BUSY = {"type": "Live", "bandwidthMibPerSecond": 16, "completionTimeoutPerGiB": 480, "progressTimeoutSeconds": 60}


def test_auto_converge_lets_a_busy_guest_finish_where_the_same_run_without_it_times_out(vms, migs, cluster,
                                                                                        vm_name):
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    proof = Proof(cluster, vm)
    pid = assert_only_on(cluster, vms, vm_name, "node-a")
    dom = agent_dom(cluster, "node-a", vm["metadata"]["uid"])
    # rewrites 32 MiB of the guest's RAM (its tmpfs) in place, as fast as the vCPU goes
    writer = guest_run(dom, "dd if=/dev/urandom of=/tmp/hot-src bs=1M count=32 2>/dev/null; "
                            "(while :; do dd if=/tmp/hot-src of=/tmp/hot-dst bs=1M conv=notrunc 2>/dev/null; done) "
                            ">/dev/null 2>&1 </dev/null & echo $!", timeout=120).strip()
    # a heartbeat on the serial console (as in tests/world/test_migration_hv.py): tells a live guest from a hung
    # one if qemu-ga goes quiet after the switch-over (seen below the operator: migration-facts.md)
    guest_run(dom, "(i=0; while :; do i=$((i+1)); echo tick-$i > /dev/ttyS0; sleep 1; done) >/dev/null 2>&1 "
                   "</dev/null &")

    migs.create(f"{vm_name}-noac", vm_name, targetNode="node-b", autoConverge=False, **BUSY)
    m = migs.settled(f"{vm_name}-noac")
    assert phase(m) == "Failed", f"without auto-converge the busy guest should not converge: {dump(m)}"
    assert condition(m, "Ready").get("reason") in ("MigrationTimedOut", "NoProgress"), dump(m)
    vm = settled_vm(vms, vm_name, "node-a")
    assert migration_record(vm).get("state") in ("Failed", "Aborted"), vm_state(vm)
    assert assert_only_on(cluster, vms, vm_name, "node-a") == pid
    dom = proof.check("node-a")
    guest_run(dom, f"kill -0 {writer}")  # still writing

    migs.create(f"{vm_name}-ac", vm_name, targetNode="node-b", autoConverge=True, **BUSY)
    seen: list[dict] = []
    m = migs.succeeded(f"{vm_name}-ac", seen=seen)
    throttles = {((s.get("status") or {}).get("progress") or {}).get("autoConvergeThrottle") for s in seen} - {
        None, 0}
    settled_vm(vms, vm_name, "node-b")
    assert_only_on(cluster, vms, vm_name, "node-b")
    try:
        dom = proof.check("node-b")
    except AssertionError as exc:  # is the guest alive (heartbeat) while qemu-ga does not answer?
        ticks = vms.console(vm).count("tick-")
        time.sleep(5)
        raise AssertionError(f"{exc}\nconsole heartbeat: {ticks} -> {vms.console(vm).count('tick-')} ticks in 5 s; "
                             f"VM: {vm_state(vms.get(vm_name))}") from None
    guest_run(dom, f"kill -0 {writer} && kill {writer}")  # the writer ran through the migration
    assert throttles, f"auto-converge throttled the vCPUs: no throttle in {[s.get('status') for s in seen]}"


# -- bad input: a clear reason, nothing lost -----------------------------------------------------------------

def test_bad_input_is_refused_with_a_reason_and_changes_nothing(vms, migs, cluster, vm_name):
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    proof = Proof(cluster, vm)
    pid = assert_only_on(cluster, vms, vm_name, "node-a")
    data = status_disk(vm, "data")["path"]
    taken = cluster.storage_dir / "images" / f"{vm_name}-taken.qcow2"
    qcow2(taken, "1M")
    taken_bytes = taken.read_bytes()
    outside = f"/var/tmp/lvo-migration-outside-{vm_name}.qcow2"
    other_local = str(local_root(cluster.node("node-b")) / f"{vm_name}-data.qcow2")

    api = cluster.control_plane.api_client()
    ghost = f"ghost-{vm_name}"[:60]
    register_node(api, ghost, memory_bytes=8 << 30, cpus=4)  # a Node with no agent: no Lease at all
    small = SimNodes(api, NAMESPACE, 1, memory_bytes=64 << 20, prefix=f"small-{vm_name}"[:40]).start()
    try:
        cases = {
            "same-node": ({"type": "Live", "targetNode": "node-a"}, "SameNode"),
            "no-node": ({"type": "Live", "targetNode": "lvo-no-such-node"}, "TargetNotFound"),
            "no-agent": ({"type": "Live", "targetNode": ghost}, "TargetUnavailable"),
            "too-small": ({"type": "Live", "targetNode": small.names[0]}, "InsufficientMemory"),
            "outside": ({"type": "Storage", "disks": [{"name": "data", "destinationPath": outside}]},
                        "PathNotAllowed"),
            "other-local": ({"type": "Storage", "disks": [{"name": "data", "destinationPath": other_local}]},
                            "PathNotAllowed"),
            "exists": ({"type": "Storage", "disks": [{"name": "data", "destinationPath": str(taken)}]},
                       "FileExists"),
            "no-disk": ({"type": "Storage", "disks": [{"name": "nope", "destinationPath": str(taken) + "-x"}]},
                        "DiskNotFound"),
        }
        wrong = {}
        for case, (spec, reason) in cases.items():
            name = f"{vm_name}-{case}"
            migs.create(name, vm_name, **spec)
            m = migs.settled(name, 180)
            got = (phase(m), condition(m, "Ready").get("reason"))
            if got != ("Failed", reason) or not condition(m, "Ready").get("message"):
                wrong[case] = {"expected": reason, "status": m.get("status")}
            vm = settled_vm(vms, vm_name, "node-a")
            assert assert_only_on(cluster, vms, vm_name, "node-a") == pid, f"{case}: the VM was disturbed"
        assert not wrong, f"refusals not as designed: {dump(wrong)}"
    finally:
        small.stop(delete=True)
        with contextlib.suppress(client.exceptions.ApiException):
            client.CoreV1Api(api).delete_node(ghost)
    assert not os.path.exists(outside) and not os.path.exists(other_local)
    assert taken.read_bytes() == taken_bytes, "an existing file is never overwritten"
    assert status_disk(vms.get(vm_name), "data")["path"] == data
    proof.check("node-a")


def test_a_stopped_vm_is_refused(vms, migs, cluster, vm_name):
    disks = [{"name": "root", "path": qcow2(shared_images(cluster) / f"{vm_name}-root.qcow2", "64M"),
              "format": "qcow2"}]
    vm = vms.create(manifest(cluster, vm_name, nodeName="node-a", powerState="Stopped", disks=disks))
    vm = vms.wait(vm_name, lambda v: (v.get("status") or {}).get("phase") == "Stopped"
                  and v["metadata"].get("labels", {}).get(meta.NODE_LABEL) == "node-a", "Stopped on node-a", 120)
    migs.create(f"{vm_name}-cold", vm_name, type="Live", targetNode="node-b")
    migs.refused(f"{vm_name}-cold", "VMNotRunning")
    migs.create(f"{vm_name}-cold-wm", vm_name, type="WholeMachine", targetNode="node-b")
    migs.refused(f"{vm_name}-cold-wm", "VMNotRunning")
    vm = vms.get(vm_name)
    assert vm["metadata"]["labels"][meta.NODE_LABEL] == "node-a" and vm["status"]["phase"] == "Stopped", vm_state(vm)
    facts = placement_facts(cluster, vm["metadata"]["uid"])
    assert facts["domains"]["node-b"] == "absent" and not facts["qemu"], facts
    assert os.path.exists(disks[0]["path"])


def test_a_migration_while_a_snapshot_runs_is_refused(vms, migs, snaps, cluster, vm_name):
    """The snapshot's window is held open: its agent is killed while the snapshot is InProgress (the status stays
    InProgress until the agent is back), and the migration is created in that window."""
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    proof = Proof(cluster, vm)
    snaps.create(f"{vm_name}-s", vm_name, memory=True)
    deadline = time.monotonic() + 120
    while ((snaps.get(f"{vm_name}-s") or {}).get("status") or {}).get("phase") != "InProgress":
        assert time.monotonic() < deadline, f"never saw the snapshot InProgress: {snaps.get(f'{vm_name}-s')}"
        time.sleep(0.05)
    cluster.operator.kill("agent-node-a")
    try:
        assert snaps.get(f"{vm_name}-s")["status"]["phase"] == "InProgress"
        migs.create(f"{vm_name}-m", vm_name, type="Live", targetNode="node-b")
        migs.refused(f"{vm_name}-m", "OperationInProgress")
    finally:
        cluster.operator.restart("agent-node-a")
    # the interrupted snapshot settles either way (the agent's recovery may judge it Failed: nothing to migrate-test)
    snaps.wait(f"{vm_name}-s", lambda s: s and (s.get("status") or {}).get("phase") in ("Ready", "Failed"),
               "the snapshot settled after the agent's restart", 300)
    settled_vm(vms, vm_name, "node-a")
    assert_only_on(cluster, vms, vm_name, "node-a")
    proof.check("node-a")


# -- faults: in every case the VM ends running on exactly one node, known to status, disks intact ---------

def converged(vms, migs, cluster, vm_name: str, mig: str, proof: Proof, files: set[str]) -> str:
    """The VMMigration settles; the VM runs on the node that agrees with its outcome (target when Succeeded,
    source otherwise), alone, Ready, with its disks intact. Returns that node."""
    m = migs.settled(mig, MIGRATION_TIMEOUT)
    src, dst = m["status"]["sourceNode"], m["status"]["targetNode"]
    node = dst if phase(m) == "Succeeded" else src
    vm = settled_vm(vms, vm_name, node, 300)
    rec = migration_record(vm)
    assert rec.get("name") == mig, vm_state(vm)
    assert rec.get("state") in (("Succeeded",) if phase(m) == "Succeeded" else ("Failed", "Aborted")), (
        f"the VM's record vs VMMigration {phase(m)}: {vm_state(vm)}")
    if phase(m) != "Succeeded":
        assert condition(m, "Ready").get("reason"), dump(m)
    assert_only_on(cluster, vms, vm_name, node)
    assert files_of(vm) == files and all(os.path.exists(f) for f in files), vm_state(vm)
    proof.check(node)
    check_clean(*files)
    return node


def start_slow_migration(vms, migs, cluster, vm_name: str, mib: int = 2) -> tuple[str, Proof, set[str]]:
    vm = boot(vms, cluster, vm_name, "node-a", shared_images(cluster))
    proof = Proof(cluster, vm)
    mig = f"{vm_name}-mig"
    migs.create(mig, vm_name, type="Live", targetNode="node-b", bandwidthMibPerSecond=mib)
    migs.wait(mig, lambda m: phase(m) == "Running" and ((m["status"].get("progress") or {}).get("dataProcessedBytes")
                                                        or 0) > 0, "Running with data sent", 240)
    return mig, proof, files_of(vm)


def test_source_agent_killed_mid_migration_converges(vms, migs, cluster, vm_name):
    mig, proof, files = start_slow_migration(vms, migs, cluster, vm_name)
    cluster.operator.kill("agent-node-a")
    time.sleep(3)  # libvirt's job runs on without the agent
    cluster.operator.restart("agent-node-a")
    converged(vms, migs, cluster, vm_name, mig, proof, files)


def test_target_agent_killed_mid_migration_converges(vms, migs, cluster, vm_name):
    mig, proof, files = start_slow_migration(vms, migs, cluster, vm_name, mib=8)
    cluster.operator.kill("agent-node-b")
    try:
        # the domain lands on node-b while its agent is dead: nobody there to adopt it yet
        migs.wait(mig, lambda m: phase(m) in ("HandingOver", *TERMINAL), "the job done", MIGRATION_TIMEOUT)
    finally:
        cluster.operator.restart("agent-node-b")
    converged(vms, migs, cluster, vm_name, mig, proof, files)


def test_target_libvirtd_restarted_mid_migration_converges(vms, migs, cluster, vm_name):
    mig, proof, files = start_slow_migration(vms, migs, cluster, vm_name)
    target = cluster.node("node-b")
    os.kill(target._daemon_pid("libvirtd"), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while target.is_running():
        assert time.monotonic() < deadline, "node-b's libvirtd did not die"
        time.sleep(0.1)
    assert target.revive(), "node-b's libvirtd could not be started again"
    converged(vms, migs, cluster, vm_name, mig, proof, files)


def test_controller_killed_between_completion_and_the_label_flip_converges(vms, migs, cluster, vm_name):
    """The controller is killed while the source agent's job runs (it has no part in it), so the domain lands on
    the target while no controller can flip the label; the restarted controller completes the hand-over."""
    mig, proof, files = start_slow_migration(vms, migs, cluster, vm_name, mib=8)
    cluster.operator.kill("controller")
    try:
        vm = vms.wait(vm_name, lambda v: migration_record(v).get("state") in ("Landed", "Failed", "Aborted"),
                      "the source agent's record: Landed", MIGRATION_TIMEOUT)
        assert migration_record(vm)["state"] == "Landed", vm_state(vm)
        assert vm["metadata"]["labels"][meta.NODE_LABEL] == "node-a", "only the controller moves the label"
        # the source never starts the domain it migrated away, with or without a controller
        facts = placement_facts(cluster, vm["metadata"]["uid"])
        assert facts["domains"]["node-b"] == "running+persistent", facts
        assert facts["domains"]["node-a"] == "absent", facts
    finally:
        cluster.operator.restart("controller")
    assert converged(vms, migs, cluster, vm_name, mig, proof, files) == "node-b"
