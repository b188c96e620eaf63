"""The node agent's snapshot engine (agent/snapshots) on a real libvirtd + QEMU (TCG) node and the test
guest, driven through its entry points with a JobContext whose callbacks record into dicts (the API
server is the lead's e2e tests' part): S3/S4 memory snapshot and two reverts, S5/S6 disk-only snapshot
of the data disk and its revert (the system disk refused), S1/S2 Copy on raw disks and its revert with
safety copies, S7 clone leaves, S8 delete (kept while another snapshot or a clone holds a file, merged
and removed otherwise), and re-entry: create.run called again on a status left InProgress at each step.

Guest-side proofs as in test_snapshots_hv (RAM markers in tmpfs, /proc/uptime, boot_id, the data disk's
bytes); host-side: qemu-img info --backing-chain and qemu-img check; after each step, no file of the VM's
under the storage root is left that nothing references (no orphan) and none that something references is
gone (no file lost)."""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import uuid
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.agent import disks
from libvirt_operator.agent.jobs import JobContext
from libvirt_operator.agent.snapshots import clone, common, create, delete, revert
from libvirt_operator.agent.snapshots.plan import Refusal
from libvirt_operator.domain.snapshot import external_snapshot
from libvirt_operator.hypervisor import Host
from libvirt_operator.storage import References, StorageError, images

from .hypervisor_support import run
from .test_snapshots_hv import DATA_SECTORS, VM, boot, drop, qemu_img_chain, sha

pytestmark = pytest.mark.world

NS = "test"


class Killed(BaseException):
    """An agent SIGKILL at a chosen point: nothing in the engine catches it."""


class World:
    """What the agent's stores would hold: VM objects and VMSnapshot objects, and the references built
    from their statuses (as agent.disks.node_references does)."""

    def __init__(self, host: Host, roots: tuple[str, ...]):
        self.host, self.roots = host, roots
        self.vms: dict[str, dict] = {}
        self.guests: dict[str, VM] = {}
        self.snapshots: dict[str, dict] = {}
        self.recorded: dict[str, dict] = {}  # vm name -> {disk name: [paths]} as ctx.record got them
        self.events: list[tuple[str, str, bool]] = []
        self.steps: list[str] = []

    def add_vm(self, vm: VM, spec: dict) -> dict:
        obj = {"metadata": {"name": vm.guest.name, "namespace": NS, "uid": str(uuid.uuid4())},
               "spec": spec, "status": {}}
        self.vms[vm.guest.name], self.guests[vm.guest.name] = obj, vm
        self.refresh(vm.guest.name)
        return obj

    def refresh(self, name: str) -> None:
        """status.disks from the domain (the reconciler's report)."""
        chains = run(common.full_chains(self.ctx_for(name, {}), self.guests[name].guest))
        self.vms[name]["status"]["disks"] = [
            {"name": n, "target": s.target, "path": s.chain.active.path, "format": s.chain.active.format,
             "backingChain": [layer.path for layer in s.chain.backing]} for n, s in chains.items()]

    def references(self) -> References:
        refs = References()
        for name, obj in self.vms.items():
            for d in obj["status"].get("disks") or []:
                refs.add_files(f"vm/{NS}/{name}", [d["path"], *d.get("backingChain", [])])
        for name, snap in self.snapshots.items():
            st = snap.get("status") or {}
            if st.get("phase") not in ("Ready", "InProgress", "Deleting"):
                continue
            files = []
            for d in st.get("disks") or []:
                if os.path.exists(d["snapshotFile"]):
                    files += images.chain(d["snapshotFile"], roots=self.roots).paths
                else:
                    files.append(d["snapshotFile"])
            if st.get("memoryFile"):
                files.append(st["memoryFile"])
            refs.add_files(f"snapshot/{NS}/{name}", files)
        return refs

    def snapshot(self, name: str, vm_name: str, **spec) -> dict:
        obj = {"metadata": {"name": name, "namespace": NS}, "spec": {"vmName": vm_name, **spec}, "status": {}}
        self.snapshots[name] = obj
        return obj

    def ctx_for(self, vm_name: str, snap: dict, kill_at: str | None = None, kill_after_write: bool = False,
                write_revert_kill_at: str | None = None) -> JobContext:
        """A JobContext on the VM; kill_at: the write announcing that step raises Killed (before it is
        recorded, or just after when kill_after_write)."""
        vm = self.vms.get(vm_name)

        async def write(fields: dict) -> None:
            step = (fields.get("job") or {}).get("step")
            if step is not None:
                self.steps.append(step)
            if kill_at is not None and step == kill_at and not kill_after_write:
                raise Killed(step)
            snap.setdefault("status", {}).update(copy.deepcopy(fields))
            if kill_at is not None and step == kill_at and kill_after_write:
                raise Killed(step)

        async def write_revert(outcome: dict) -> None:
            if write_revert_kill_at is not None and outcome.get("step") == write_revert_kill_at:
                raise Killed(outcome["step"])
            vm["status"]["lastRevert"] = dict(outcome)

        async def record(guest, chains) -> None:  # the agent's own: the definition and metadata follow
            await disks.record(self.host, guest, chains)
            self.recorded[vm_name] = {n: list(c.paths) for n, c in chains.items()}

        async def event(reason: str, message: str, warning: bool) -> None:
            self.events.append((reason, message, warning))

        guest = self.guests[vm_name].guest if vm_name in self.guests else None
        return JobContext(host=self.host, roots=self.roots, vm=vm, snapshot=snap, guest=guest, write=write,
                          write_revert=write_revert, references=self.references, record=record, event=event)

    def create(self, vm_name: str, snap: dict, **kill) -> dict:
        self.steps = []
        run(create.run(self.ctx_for(vm_name, snap, **kill)), timeout=600)
        self.refresh(vm_name)
        return snap["status"]

    def revert(self, vm_name: str, snap_name: str, rid: str, **kill) -> dict:
        run(revert.run(self.ctx_for(vm_name, self.snapshots[snap_name], **kill), rid), timeout=600)
        self.refresh(vm_name)
        return self.vms[vm_name]["status"]["lastRevert"]

    def delete(self, vm_name: str | None, snap_name: str) -> bool:
        snap = self.snapshots[snap_name]
        ctx = self.ctx_for(vm_name, snap) if vm_name else None
        done = run(delete.run(ctx), timeout=600)
        if vm_name:
            self.refresh(vm_name)
        if done:
            del self.snapshots[snap_name]
        return done

    def assert_no_orphans_and_nothing_lost(self, prefix: str) -> None:
        """Every file of this VM (named <prefix>*) under the root is referenced; every referenced file exists."""
        refs = self.references()
        mine = [str(p) for p in Path(self.roots[0]).glob(f"{prefix}*") if p.is_file() and not p.name.endswith(".log")]
        assert refs.orphans(mine) == (), f"orphans: {refs.orphans(mine)}"
        assert not [p for p in os.listdir(self.roots[0]) if ".lvo-tmp-" in p]
        for path in refs.referenced():
            assert os.path.exists(path), f"{path} is referenced but gone"


def assert_chains_clean(vm: VM, roots) -> None:
    """qemu-img check of every file of the VM's chains (guest suspended so that its leaves are quiet) and
    qemu-img's own view of each chain equal to libvirt's."""
    run(vm.guest.suspend())
    try:
        for chain in vm.chains().values():
            assert qemu_img_chain(chain.active.path) == list(chain.paths)
            for layer in chain.layers:
                result = images.check(layer.path, roots=roots)
                assert result.clean and result.supported == (layer.format == "qcow2"), result
    finally:
        run(vm.guest.resume())


@pytest.fixture(scope="module")
def host(libvirt_nodes):
    h = Host(libvirt_nodes[0].uri)
    run(h.connect())
    yield h
    run(h.close())


@pytest.fixture(scope="module")
def roots(storage_dir) -> tuple[str, ...]:
    return (str(storage_dir),)


@pytest.fixture(scope="module")
def world(host, roots):
    return World(host, roots)


def _boot(host, libvirt_nodes, guest_image, storage_dir, world, prefix, fmt):
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    disks = []
    for disk, size in (("root", "64M"), ("data", "32M")):
        path = storage_dir / f"{name}-{disk}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
        disks.append({"name": disk, "path": str(path), "format": fmt})
    vm = boot(host, libvirt_nodes[0].uri, guest_image, storage_dir, name, disks)
    world.add_vm(vm, {"powerState": "Running", "memory": {"size": "192Mi"}, "disks": disks})
    return vm


@pytest.fixture(scope="module")
def qvm(host, libvirt_nodes, guest_image, storage_dir, world):
    vm = None
    try:
        vm = _boot(host, libvirt_nodes, guest_image, storage_dir, world, "eng", "qcow2")
        yield vm
    finally:
        if vm is not None:
            drop(libvirt_nodes[0].uri, vm.uuid)


@pytest.fixture(scope="module")
def raw_vm(host, libvirt_nodes, guest_image, storage_dir, world):
    vm = None
    try:
        vm = _boot(host, libvirt_nodes, guest_image, storage_dir, world, "engr", "raw")
        yield vm
    finally:
        if vm is not None:
            drop(libvirt_nodes[0].uri, vm.uuid)


class Story:
    up: tuple[float, float] = (0.0, 0.0)
    boot_id = ""


# -- S3/S4 ---------------------------------------------------------------------------------------------------


def test_s3_memory_snapshot_then_s4_revert_twice(qvm, world, roots):
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    pid = vm.pid()
    vm.mark("m1")
    vm.write_disk(DATA_SECTORS, "E-A")
    boot_id, up0 = vm.boot_id(), vm.uptime()
    snap = world.snapshot("s1", name, memory=True)
    st = world.create(name, snap)
    assert st["phase"] == "Ready", st
    assert world.steps[0] == "Prepare" and world.steps[-1] == "Done" and "Snapshot" in world.steps
    assert st["conditions"][0]["status"] == "True" and isinstance(st["downtimeMs"], int)
    assert isinstance(st["durationMs"], int) and st["creationTime"]
    assert st["vmUid"] == world.vms[name]["metadata"]["uid"]
    assert vm.pid() == pid, "the same QEMU keeps running"
    chains = vm.chains()
    disks = {d["name"]: d for d in st["disks"]}
    for disk, target in (("root", "vda"), ("data", "vdb")):
        d = disks[disk]
        assert d["snapshotFile"] == before[target].active.path and d["created"]
        assert d["activeFile"].endswith(f"/{name}-{disk}.s1.qcow2")
        assert chains[target] == before[target].with_leaf(d["activeFile"])
        assert world.recorded[name][disk] == list(chains[target].paths)
    assert st["memoryFile"].endswith(f"/{name}.s1.mem") and os.path.getsize(st["memoryFile"]) > 0
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)
    inactive = run(common.disk_states(vm.guest, inactive=True))
    print("persistent definition after the snapshot:", {n: s.chain.active.path for n, s in inactive.items()})

    vm.mark("m2")
    vm.write_disk(DATA_SECTORS, "E-B")
    up_before_revert = vm.wait_uptime_past(up0 + 10)
    outcome = world.revert(name, "s1", "r1")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent(120)
    up = vm.uptime()
    assert vm.markers() == {"m1"}, "the marker written before the snapshot stays, the one after is gone"
    assert vm.read_disk(DATA_SECTORS) == "E-A"
    assert vm.boot_id() == boot_id and up0 <= up < up_before_revert, (up0, up, up_before_revert)
    chains = vm.chains()
    for disk, target in (("root", "vda"), ("data", "vdb")):
        leaf = chains[target].active.path
        assert leaf.endswith(f"/{name}-{disk}.s1.r-r1.qcow2")
        assert chains[target] == before[target].with_leaf(leaf)
        assert not os.path.exists(disks[disk]["activeFile"]), "the leaf the VM ran on before is removed"
        inactive = run(common.disk_states(vm.guest, inactive=True))
        assert inactive[disk].chain.active.path == leaf, "the definition follows the new leaf"
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)

    # the second revert to the same snapshot
    vm.mark("m3")
    vm.write_disk(DATA_SECTORS, "E-C")
    outcome = world.revert(name, "s1", "r2")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent(120)
    assert vm.markers() == {"m1"} and vm.read_disk(DATA_SECTORS) == "E-A" and vm.boot_id() == boot_id
    chains = vm.chains()
    assert {t: c.active.path.rsplit(".", 2)[-2] for t, c in chains.items()} == {"vda": "r-r2", "vdb": "r-r2"}
    assert not [p for p in os.listdir(roots[0]) if ".r-r1." in p and p.startswith(name)], "r1's leaves are gone"
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)
    # the same request id again: nothing happens
    again = world.revert(name, "s1", "r2")
    assert again == outcome and vm.chains() == chains
    Story.up, Story.boot_id = (up0, up), boot_id


def test_revert_refusals(qvm, world):
    name = qvm.guest.name
    chains = qvm.chains()
    other = world.snapshot("s-other", "someone-else", memory=True)
    other["status"] = {"phase": "Ready", "vmUid": "another-uid", "disks": []}
    outcome = world.revert(name, "s-other", "x1")
    assert outcome["result"] == "Failed" and "SnapshotOfAnotherVM" in outcome["message"], outcome
    failed = world.snapshot("s-failed", name)
    failed["status"] = {"phase": "Failed"}
    outcome = world.revert(name, "s-failed", "x2")
    assert outcome["result"] == "Failed" and "SnapshotNotReady" in outcome["message"], outcome
    assert qvm.chains() == chains and qvm.state().startswith("running/")
    del world.snapshots["s-other"], world.snapshots["s-failed"]


# -- S5/S6 ---------------------------------------------------------------------------------------------------


def test_s5_disk_only_refuses_the_system_disk(qvm, world, roots):
    name = qvm.guest.name
    chains = qvm.chains()
    listing = set(os.listdir(roots[0]))
    bad = world.snapshot("s2bad", name)
    st = world.create(name, bad)
    assert st["phase"] == "Failed" and st["conditions"][0]["reason"] == "SystemDiskSnapshot", st
    assert qvm.chains() == chains and set(os.listdir(roots[0])) == listing, "nothing touched"
    del world.snapshots["s2bad"]


def test_s5_s6_disk_only_snapshot_of_the_data_disk_and_its_revert(qvm, world, roots):
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    vm.write_disk(DATA_SECTORS, "D-A")
    snap = world.snapshot("s2", name, disks=[{"name": "root", "snapshot": "no"}])
    st = world.create(name, snap)
    assert st["phase"] == "Ready", st
    (d,) = st["disks"]
    assert d["name"] == "data" and d["snapshotFile"] == before["vdb"].active.path and st.get("memoryFile") is None
    chains = vm.chains()
    assert chains["vda"] == before["vda"] and chains["vdb"] == before["vdb"].with_leaf(d["activeFile"])
    vm.write_disk(DATA_SECTORS, "D-B")
    vm.mark("s5-after")
    outcome = world.revert(name, "s2", "r3")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent()  # a cold boot
    assert vm.read_disk(DATA_SECTORS) == "D-A" and "s5-after" not in vm.markers()
    chains = vm.chains()
    assert chains["vda"] == before["vda"], "the system disk is not reverted"
    assert chains["vdb"].backing == before["vdb"].layers and chains["vdb"].active.path.endswith(".s2.r-r3.qcow2")
    assert not os.path.exists(d["activeFile"])
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)


# -- S8 ------------------------------------------------------------------------------------------------------


def test_s8_delete_keeps_a_file_another_snapshot_holds_then_merges(qvm, world, roots):
    vm, name = qvm, qvm.guest.name
    vm.write_disk(DATA_SECTORS, "S8-A")
    s3 = world.snapshot("s3", name, disks=[{"name": "root", "snapshot": "no"}])
    assert world.create(name, s3)["phase"] == "Ready"
    vm.write_disk(DATA_SECTORS, "S8-B")
    s2_file = world.snapshots["s2"]["status"]["disks"][0]["snapshotFile"]
    # s2's file is a backing file of s3's: kept, with who holds it
    assert world.delete(name, "s2") is False
    st = world.snapshots["s2"]["status"]
    assert st["phase"] == "Deleting" and st["conditions"][0]["reason"] == "FilesHeld"
    assert "snapshot/test/s3" in st["keptFiles"][s2_file] and os.path.exists(s2_file)
    # s3: its file sits right under the active leaf: active commit + pivot, the leaf goes
    leaf = vm.chains()["vdb"].active.path
    s3_file = s3["status"]["disks"][0]["snapshotFile"]
    assert world.delete(name, "s3") is True
    chains = vm.chains()
    assert chains["vdb"].active.path == s3_file and not os.path.exists(leaf)
    assert vm.read_disk(DATA_SECTORS) == "S8-B"
    # s2 again: now only the VM's chain holds its file: merged (the VM runs on s2's file), s3's leaf goes
    assert world.delete(name, "s2") is True
    chains = vm.chains()
    assert chains["vdb"].active.path == s2_file and not os.path.exists(s3_file)
    assert vm.read_disk(DATA_SECTORS) == "S8-B"
    assert world.recorded[name]["data"] == list(chains["vdb"].paths)
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)


# -- S7 ------------------------------------------------------------------------------------------------------


def test_s7_clone_leaves_both_run_and_delete_keeps_what_the_clone_holds(qvm, world, host, libvirt_nodes,
                                                                          guest_image, storage_dir, roots):
    src, name = qvm, qvm.guest.name
    src.write_disk(DATA_SECTORS, "SRC-0")
    before = src.chains()
    pid = src.pid()
    snap = world.snapshot("s7", name, forClone=True)
    st = world.create(name, snap)
    assert st["phase"] == "Ready" and {d["name"] for d in st["disks"]} == {"root", "data"}, st
    assert src.pid() == pid
    shared = {d["name"]: d["snapshotFile"] for d in st["disks"]}
    shas = {n: sha(p) for n, p in shared.items()}
    clone_name = f"{name}-c"
    clone_spec = {"disks": [{"name": "root", "path": f"{storage_dir}/{clone_name}-root.qcow2"},
                            {"name": "data", "path": f"{storage_dir}/{clone_name}-data.qcow2"}]}
    chains = clone.leaves(clone_spec, snap, roots)
    for disk in ("root", "data"):
        assert list(chains[disk].paths) == [clone_spec["disks"][0 if disk == "root" else 1]["path"],
                                            *images.chain(shared[disk], roots=roots).paths]
    assert clone.leaves(clone_spec, snap, roots) == chains, "its own leaves are accepted again"
    stranger = f"{storage_dir}/{clone_name}-x.qcow2"
    Path(stranger).write_bytes(b"junk" * 10)
    with pytest.raises(StorageError) as caught:
        clone.leaves({"disks": [{"name": "data", "path": stranger}]}, snap, roots)
    assert caught.value.reason == "FileExists" and Path(stranger).read_bytes() == b"junk" * 10
    os.unlink(stranger)
    with pytest.raises(Refusal):
        clone.leaves(clone_spec, world.snapshots["s1"], roots)  # not a forClone snapshot
    cvm = None
    try:
        cvm = boot(host, src.uri, guest_image, storage_dir, clone_name, clone_spec["disks"])
        world.add_vm(cvm, {"powerState": "Running", "disks": clone_spec["disks"]})
        assert cvm.uuid != src.uuid
        assert cvm.read_disk(DATA_SECTORS) == "SRC-0"
        src.write_disk(DATA_SECTORS, "SRC-1")
        cvm.write_disk(DATA_SECTORS, "CLONE-1")
        assert src.read_disk(DATA_SECTORS) == "SRC-1" and cvm.read_disk(DATA_SECTORS) == "CLONE-1"
        for disk, target in (("root", "vda"), ("data", "vdb")):
            assert src.chains()[target].backing[0].path == shared[disk] == cvm.chains()[target].backing[0].path
            assert sha(shared[disk]) == shas[disk], "the shared file is never written"
        # delete while the clone runs on it: kept, naming the clone
        assert world.delete(name, "s7") is False
        kept = world.snapshots["s7"]["status"]["keptFiles"]
        assert set(kept) == set(shared.values()) and all(f"vm/test/{clone_name}" in why for why in kept.values())
        assert all(sha(p) == shas[n] for n, p in shared.items())
    finally:
        if cvm is not None:
            drop(src.uri, cvm.uuid)
            world.vms.pop(clone_name, None)
            world.guests.pop(clone_name, None)
        for d in clone_spec["disks"]:
            if os.path.exists(d["path"]):
                os.unlink(d["path"])
    # the clone is gone: the files are merged out of the source's chain (back as before) and removed
    assert world.delete(name, "s7") is True
    assert src.chains() == before and src.read_disk(DATA_SECTORS) == "SRC-1"
    assert_chains_clean(src, roots)
    world.assert_no_orphans_and_nothing_lost(name)


# -- re-entry (an agent SIGKILL at each step of create) ------------------------------------------------------


@pytest.mark.parametrize("kill_at,after_write,expect", [
    ("Prepare", False, None),          # killed before InProgress was written: nothing happened
    ("Snapshot", False, "Failed"),     # InProgress/Prepare recorded, the call not made
    ("Snapshot", True, "Failed"),      # Snapshot recorded, killed before the call
    ("Record", False, "Ready"),        # the call made, killed before Record was written
    ("Record", True, "Ready"),         # Record recorded, killed before ctx.record
])
def test_create_reentry_converges(qvm, world, roots, kill_at, after_write, expect):
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    snap = world.snapshot(f"k-{kill_at.lower()}-{int(after_write)}", name, memory=True)
    world.recorded.pop(name, None)
    with pytest.raises(Killed):
        world.create(name, snap, kill_at=kill_at, kill_after_write=after_write)
    status = snap["status"]
    if expect is None:
        assert status == {}, status
        assert vm.chains() == before
        del world.snapshots[snap["metadata"]["name"]]
        return
    assert status["phase"] == "InProgress"
    world.refresh(name)
    st = world.create(name, snap)  # the restarted agent calls the same entry point
    assert st["phase"] == expect, st
    chains = vm.chains()
    planned = {d["target"]: d for d in st["disks"]}
    if expect == "Ready":
        for target, d in planned.items():
            assert chains[target] == before[target].with_leaf(d["activeFile"]), "the snapshot was taken once"
        assert world.recorded[name] == {n: list(s.chain.paths) for n, s in run(common.disk_states(vm.guest)).items()}
        assert run(world.host.save_image_xml(st["memoryFile"]))
    else:
        assert st["conditions"][0]["reason"] == "Interrupted", st
        assert chains == before, "the VM stays on its old chain"
        for d in planned.values():
            assert not os.path.exists(d["activeFile"])
        assert not os.path.exists(st["memoryFile"])
        del world.snapshots[snap["metadata"]["name"]]
    assert vm.state().startswith("running/")
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)
    if expect == "Ready":  # leave the chain as it was for the next case
        assert world.delete(name, snap["metadata"]["name"]) is True
        assert vm.chains() == before
        world.assert_no_orphans_and_nothing_lost(name)


def test_create_reentry_while_libvirt_still_takes_the_snapshot(qvm, world, roots, libvirt_nodes):
    """Killed after the call was made: libvirtd carries on with it. The re-entered job waits for libvirt's own
    job on the domain to end before it judges (and then finishes: the snapshot was taken)."""
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    vm.sh("dd if=/dev/urandom of=/tmp/fill bs=1M count=48 2>/dev/null", timeout=180)  # a longer memory write
    snap = world.snapshot("k-live", name, memory=True)
    with pytest.raises(Killed):
        world.create(name, snap, kill_at="Snapshot", kill_after_write=True)
    st = snap["status"]
    leaves = {d["target"]: d["activeFile"] for d in st["disks"]}
    conn = libvirt.open(libvirt_nodes[0].uri)
    try:
        dom = conn.lookupByUUIDString(vm.uuid)
        xml = external_snapshot(leaves, st["memoryFile"]).to_xml()
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
        call = threading.Thread(target=dom.snapshotCreateXML, args=(xml, flags))
        call.start()
        started = False  # libvirt creates the memory file when its job starts (jobInfo waits for the job)
        while call.is_alive() and not started:
            started = os.path.exists(st["memoryFile"])
        assert started and call.is_alive(), "the snapshot ended before the re-entered job could start"
        st = world.create(name, snap)
        call.join()
    finally:
        conn.close()
    vm.sh("rm -f /tmp/fill")
    assert st["phase"] == "Ready", st
    assert vm.chains() == {t: before[t].with_leaf(p) for t, p in leaves.items()}
    assert run(world.host.save_image_xml(st["memoryFile"]))
    world.assert_no_orphans_and_nothing_lost(name)
    assert world.delete(name, "k-live") is True
    assert vm.chains() == before
    world.assert_no_orphans_and_nothing_lost(name)


def test_delete_reentry_pivots_a_ready_commit(qvm, world, roots):
    """Killed during delete's merge, with the active commit READY but not pivoted: the next run pivots it."""
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    snap = world.snapshot("k-del", name, disks=[{"name": "root", "snapshot": "no"}])
    st = world.create(name, snap)
    assert st["phase"] == "Ready", st
    (d,) = st["disks"]
    vm.write_disk(DATA_SECTORS, "K-DEL")
    st.update(phase="Deleting", job={**st["job"], "step": "Merge"})
    run(vm.guest.block_commit_active("vdb"))
    run(vm.guest.wait_block_job("vdb", "ready"))
    assert world.delete(name, "k-del") is True
    assert run(vm.guest.block_job_info("vdb")) is None
    assert vm.chains() == before and not os.path.exists(d["activeFile"])
    assert vm.read_disk(DATA_SECTORS) == "K-DEL"
    world.assert_no_orphans_and_nothing_lost(name)


def test_reuse_existing_overlay_and_refusals_touch_nothing(qvm, world, roots, storage_dir):
    vm, name = qvm, qvm.guest.name
    before = vm.chains()
    capacity = run(vm.guest.block_info("vdb"))[0]
    # a pre-created overlay on another file: BackingMismatch, nothing touched
    stranger_base = f"{storage_dir}/{name}-stranger.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", stranger_base, "32M"], check=True)
    wrong = f"{storage_dir}/{name}-data.wrong.qcow2"
    images.create_overlay(wrong, stranger_base, "qcow2", roots=roots)
    listing = sorted(os.listdir(roots[0]))
    snap = world.snapshot("k-wrong", name, memory=True,
                          disks=[{"name": "data", "overlayPath": wrong, "reuseExisting": True}])
    st = world.create(name, snap)
    assert st["phase"] == "Failed" and st["conditions"][0]["reason"] == "BackingMismatch", st
    assert vm.chains() == before and sorted(os.listdir(roots[0])) == listing
    # an overlay path that exists without reuseExisting: FileExists, the file unchanged
    digest = sha(wrong)
    st = world.create(name, world.snapshot("k-exists", name, memory=True,
                                           disks=[{"name": "data", "overlayPath": wrong}]))
    assert st["conditions"][0]["reason"] == "FileExists" and sha(wrong) == digest and vm.chains() == before
    for path in (wrong, stranger_base):
        os.unlink(path)
    del world.snapshots["k-wrong"], world.snapshots["k-exists"]

    # a libvirt failure (the memory file's directory does not exist): Failed, the VM stays on its chain, the
    # leaves it may have made are gone
    st = world.create(name, world.snapshot("k-fail", name, memory=True, memoryPath=f"{storage_dir}/nodir/x.mem"))
    assert st["phase"] == "Failed", st
    print("libvirt failure reported as:", st["conditions"][0]["reason"], st["conditions"][0]["message"])
    assert vm.chains() == before and vm.state().startswith("running/")
    assert not any(os.path.exists(d["activeFile"]) for d in st["disks"])
    del world.snapshots["k-fail"]
    world.assert_no_orphans_and_nothing_lost(name)

    # the right pre-created overlay (made with -u: QEMU holds the file) for data; root's leaf is generated
    # and pre-created by the engine, so one REUSE_EXT call takes both
    good = f"{storage_dir}/{name}-data.pre.qcow2"
    images.create_overlay(good, before["vdb"].active.path, before["vdb"].active.format, roots=roots, size=capacity)
    snap = world.snapshot("k-reuse", name, disks=[{"name": "data", "overlayPath": good, "reuseExisting": True}],
                          forClone=True)
    st = world.create(name, snap)
    assert st["phase"] == "Ready" and "Overlays" in world.steps, st
    disks = {d["name"]: d for d in st["disks"]}
    assert not disks["data"]["created"] and disks["root"]["created"]
    chains = vm.chains()
    assert chains["vdb"] == before["vdb"].with_leaf(good)
    assert chains["vda"] == before["vda"].with_leaf(disks["root"]["activeFile"])
    vm.write_disk(DATA_SECTORS, "REUSED")
    assert vm.read_disk(DATA_SECTORS) == "REUSED"
    assert_chains_clean(vm, roots)
    assert world.delete(name, "k-reuse") is True
    assert vm.chains() == before and vm.read_disk(DATA_SECTORS) == "REUSED"
    world.assert_no_orphans_and_nothing_lost(name)


def test_revert_reentry_after_the_leaves_converges(qvm, world, roots):
    """Killed once the leaves and the definition are done (at the write before the restore): the step on
    record is still Stop (Leaves and Define are not written), and re-entry redoes them idempotently."""
    vm, name = qvm, qvm.guest.name
    vm.mark("m-late")
    with pytest.raises(Killed):
        world.revert(name, "s1", "rk", write_revert_kill_at="Start")
    assert world.vms[name]["status"]["lastRevert"]["step"] == "Stop"
    assert ".s1.r-rk.qcow2" in run(vm.guest.xml(inactive=True)), "the definition is on the new leaves"
    outcome = world.revert(name, "s1", "rk")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent(120)
    assert vm.markers() == {"m1"} and vm.read_disk(DATA_SECTORS) == "E-A" and vm.boot_id() == Story.boot_id
    assert all(c.active.path.endswith(".s1.r-rk.qcow2") for c in vm.chains().values())
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)


def test_s8_delete_of_the_memory_snapshot_puts_the_vm_back_on_its_files(qvm, world, roots):
    vm, name = qvm, qvm.guest.name
    st = world.snapshots["s1"]["status"]
    files = {d["name"]: d["snapshotFile"] for d in st["disks"]}
    vm.write_disk(DATA_SECTORS, "LAST")
    assert world.delete(name, "s1") is True
    chains = vm.chains()
    assert chains["vda"].active.path == files["root"] and not os.path.exists(st["memoryFile"])
    assert vm.read_disk(DATA_SECTORS) == "LAST"
    assert_chains_clean(vm, roots)
    world.assert_no_orphans_and_nothing_lost(name)


# -- S1/S2 ---------------------------------------------------------------------------------------------------


def test_s1_s2_copy_on_raw_disks_and_revert_with_safety_copies(raw_vm, world, roots):
    vm, name = raw_vm, raw_vm.guest.name
    before = vm.chains()
    vm.mark("before")
    vm.write_disk(DATA_SECTORS, "RAW-A")
    boot_id, up0 = vm.boot_id(), vm.uptime()
    snap = world.snapshot("c1", name, method="Copy", memory=True)
    st = world.create(name, snap)
    assert st["phase"] == "Ready", st
    assert world.steps[:1] == ["Prepare"] and {"Save", "Copy", "Restore"} <= set(world.steps)
    assert isinstance(st["downtimeMs"], int) and st["memoryFile"].endswith(f"/{name}.c1.mem")
    assert vm.chains() == before, "the original disks stay the running disks"
    vm.wait_agent(60)
    assert vm.boot_id() == boot_id and "before" in vm.markers() and vm.read_disk(DATA_SECTORS) == "RAW-A"
    for d in st["disks"]:
        assert d["snapshotFile"].endswith(".c1.copy") and d["snapshotFormat"] == "raw"
        assert images.check(d["snapshotFile"], roots=roots).supported is False
    world.assert_no_orphans_and_nothing_lost(name)

    vm.mark("after")
    vm.write_disk(DATA_SECTORS, "RAW-B")
    up_before = vm.wait_uptime_past(up0 + 10)
    outcome = world.revert(name, "c1", "rc1")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent(60)
    assert vm.markers() == {"before"} and vm.read_disk(DATA_SECTORS) == "RAW-A"
    up = vm.uptime()
    assert vm.boot_id() == boot_id and up0 <= up < up_before, (up0, up, up_before)
    assert vm.chains() == before
    assert not [p for p in os.listdir(roots[0]) if p.endswith(".safety")], "the safety copies go after success"
    world.assert_no_orphans_and_nothing_lost(name)


def test_copy_revert_reentry_after_the_safety_copies(raw_vm, world, roots):
    vm, name = raw_vm, raw_vm.guest.name
    vm.mark("late")
    vm.write_disk(DATA_SECTORS, "RAW-C")
    with pytest.raises(Killed):
        world.revert(name, "c1", "rc2", write_revert_kill_at="CopyBack")
    assert world.vms[name]["status"]["lastRevert"]["step"] == "Safety"
    safety = [p for p in os.listdir(roots[0]) if p.endswith(".r-rc2.safety")]
    assert len(safety) == 2 and vm.state().startswith("shutoff/")
    outcome = world.revert(name, "c1", "rc2")
    assert outcome["result"] == "Succeeded", outcome
    vm.wait_agent(60)
    assert vm.markers() == {"before"} and vm.read_disk(DATA_SECTORS) == "RAW-A"
    assert not [p for p in os.listdir(roots[0]) if p.endswith(".safety")]
    world.assert_no_orphans_and_nothing_lost(name)


@pytest.mark.parametrize("kill_at,after_write", [("Copy", False), ("Restore", True)])
def test_copy_reentry_converges(raw_vm, world, roots, kill_at, after_write):
    vm, name = raw_vm, raw_vm.guest.name
    vm.mark(f"k{kill_at}")
    snap = world.snapshot(f"ck-{kill_at.lower()}", name, method="Copy", memory=True)
    with pytest.raises(Killed):
        world.create(name, snap, kill_at=kill_at, kill_after_write=after_write)
    assert vm.state() == "shutoff/saved"
    st = world.create(name, snap)
    assert st["phase"] == "Ready", st
    vm.wait_agent(60)
    assert f"k{kill_at}" in vm.markers()
    for d in st["disks"]:
        assert os.path.getsize(d["snapshotFile"]) == os.path.getsize(d["activeFile"])
    world.assert_no_orphans_and_nothing_lost(name)
    assert world.delete(name, snap["metadata"]["name"]) is True
    for d in st["disks"]:
        assert not os.path.exists(d["snapshotFile"])
    assert not os.path.exists(st["memoryFile"])
    world.assert_no_orphans_and_nothing_lost(name)


def test_s8_delete_of_the_copy_snapshot_removes_its_copies_and_save_image(raw_vm, world, roots):
    vm, name = raw_vm, raw_vm.guest.name
    st = world.snapshots["c1"]["status"]
    assert world.delete(name, "c1") is True
    assert not os.path.exists(st["memoryFile"]) and not any(os.path.exists(d["snapshotFile"]) for d in st["disks"])
    assert sorted(p for p in os.listdir(roots[0]) if p.startswith(name) and not p.endswith(".log")) == sorted(
        os.path.basename(c.active.path) for c in vm.chains().values())
    world.assert_no_orphans_and_nothing_lost(name)
