"""The M2 engine (agent/migrations/storage.py: a Storage VMMigration, the disks of a running VM moved to other
files on its node) on a real libvirtd + QEMU (TCG) node and the test guest, driven through storage.run with a
MigrationContext whose callbacks record into dicts (the API server is the lead's e2e tests' part).

One guest (vda a qcow2 leaf over a sparse raw parent holding bytes written on the host, vdb a plain qcow2 data
disk) travels through every test, in file order: bad input (nothing written, nothing touched), a move of both
disks, a move of a 3-layer chain whose old files a snapshot holds (kept, said so), re-entry from every step
(the agent killed at each write, then run again on the status it recorded; also with the copy job still
running in libvirtd, and with the copy job lost), an abort during a throttled copy, and the completion timeout.

Proofs inside the guest (qemu-ga): the data disk's bytes and the parent's bytes intact, RAM markers in its tmpfs,
uptime never going backwards, the same boot; on the host: the same QEMU pid, qemu-img check clean, the chain
qemu-img reads = new leaf -> new parent(s), the persistent definition and the disk record on the new files, the
old files removed only when nothing else holds them, no file of the VM left that nothing references (no orphan)
and none that something references gone (no file lost)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from libvirt_operator.agent import disks
from libvirt_operator.agent.migrations import storage
from libvirt_operator.agent.migrations.context import MigrationContext, MigrationFailed
from libvirt_operator.agent.snapshots import common
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.hypervisor import Host
from libvirt_operator.hypervisor.migration import disk_destination_xml
from libvirt_operator.storage import References, images

from .hypervisor_support import run
from .test_snapshots_hv import DATA_SECTORS, ROOT_SECTORS, VM, boot, drop, qemu_img_chain

pytestmark = pytest.mark.world

NS = "test"
PARENT_SECTOR = 100  # written into the raw parent on the host before the boot
PARENT_TEXT = "M2-PARENT-BYTES"
RAW_SECTORS = 32768  # a 16 MiB raw disk: its leaf is raw and has no backing file
TARGETS = {"root": "vda", "data": "vdb", "scratch": "vdc"}
FACTS: dict[str, object] = {}
FACTS_FILE = Path("/tmp/lvo-m2-engine-facts.json")
STEPS = ["CopyParents", "PrepareLeaves", "Copying", "Pivot", "Record", "Cleanup", "Done"]


def fact(key: str, value: object) -> None:
    """What libvirt did and how long it took (printed and kept in FACTS_FILE, never asserted)."""
    FACTS[key] = value
    FACTS_FILE.write_text(json.dumps(FACTS, indent=2, default=str))


class Killed(BaseException):
    """An agent SIGKILL at a chosen point: nothing in the engine catches it."""


class World:
    """What the agent would hold: the VM object (status.disks refreshed from the domain, as the reconciler
    reports it), VMSnapshot objects whose files count as references, and what the context's callbacks got."""

    def __init__(self, host: Host, roots: tuple[str, ...], vm: VM, spec: dict):
        self.host, self.roots, self.vm = host, roots, vm
        self.obj = {"metadata": {"name": vm.guest.name, "namespace": NS, "uid": self._uid(vm)}, "spec": spec,
                    "status": {}}
        self.snapshots: dict[str, list[str]] = {}  # name -> files it holds
        self.events: list[tuple[str, str, bool]] = []
        self.vm_states: list[tuple[str, str]] = []
        self.steps: list[str] = []
        self.progress: list[dict] = []
        self.recorded: dict[str, list[str]] = {}
        self.refresh()

    @staticmethod
    def _uid(vm: VM) -> str:
        own = DomainConfig.from_xml(run(vm.guest.xml(inactive=True))).operator_metadata
        return own.vm_uid

    def refresh(self) -> None:
        chains = run(common.disk_states(self.vm.guest))
        self.obj["status"]["disks"] = [
            {"name": n, "target": s.target, "path": s.chain.active.path, "format": s.chain.active.format,
             "backingChain": [layer.path for layer in s.chain.backing]} for n, s in chains.items()]

    def references(self) -> References:
        refs = References()
        for d in self.obj["status"].get("disks") or []:
            refs.add_files(f"vm/{NS}/{self.obj['metadata']['name']}", [d["path"], *d.get("backingChain", [])])
        for name, files in self.snapshots.items():
            refs.add_files(f"snapshot/{NS}/{name}", files)
        return refs

    def migration(self, moves: list[dict], **spec) -> dict:
        return {"metadata": {"name": f"m-{uuid.uuid4().hex[:6]}", "namespace": NS},
                "spec": {"vmName": self.obj["metadata"]["name"], "type": "Storage", "disks": moves,
                         "completionTimeoutPerGiB": 150, "progressTimeoutSeconds": 150, **spec}, "status": {}}

    def ctx_for(self, mig: dict, kill_at: str | None = None, after_write: bool = True,
                on_progress=None, aborted: bool = False) -> MigrationContext:
        """kill_at: the write announcing that step raises Killed (just after it is recorded, or before when not
        after_write); "progress": the first progress write of the Copying step (the copy job runs in libvirtd).
        on_progress(ctx, n): called at the n-th progress write of the Copying step."""
        ctx: MigrationContext | None = None
        copying_progress = [0]

        async def write(fields: dict) -> None:
            step = fields.get("step")
            if step is not None:
                self.steps.append(step)
            status = mig.setdefault("status", {})
            in_copy = "progress" in fields and step is None and status.get("step") == "Copying"
            if in_copy:
                copying_progress[0] += 1
                if on_progress is not None:
                    on_progress(ctx, copying_progress[0])
            if "progress" in fields:
                self.progress.append({"step": status.get("step"), **fields["progress"]})
            if kill_at is not None and not after_write and step == kill_at:
                raise Killed(step)
            status.update(copy.deepcopy(fields))
            if kill_at is not None and after_write and (step == kill_at or (kill_at == "progress" and in_copy)):
                raise Killed(kill_at)

        async def write_vm(state: str, message: str) -> None:
            self.vm_states.append((state, message))

        async def record(guest, chains, origins=None) -> None:  # the agent's own: definition and metadata follow
            await disks.record(self.host, guest, chains, origins)
            self.recorded.update({n: list(c.paths) for n, c in chains.items()})

        async def event(reason: str, message: str, warning: bool) -> None:
            self.events.append((reason, message, warning))

        ctx = MigrationContext(node="node-a", host=self.host, roots=self.roots, shared_roots=(), vm=self.obj,
                               migration=mig, guest=self.vm.guest, write=write, write_vm=write_vm,
                               references=self.references, record=record, event=event)
        if aborted:  # deleted before the job started
            ctx.abort.set()
        return ctx

    def migrate(self, mig: dict, **kw) -> dict:
        self.refresh()
        self.steps, self.progress, self.vm_states = [], [], []
        try:
            run(storage.run(self.ctx_for(mig, **kw)), timeout=600)
        finally:
            self.refresh()
        return mig["status"]

    def files(self) -> list[str]:
        name = self.obj["metadata"]["name"]
        return sorted(str(p) for p in Path(self.roots[0]).rglob(f"{name}*") if p.is_file() and p.suffix != ".log")

    def assert_no_orphans_and_nothing_lost(self) -> None:
        refs = self.references()
        assert refs.orphans(self.files()) == (), f"orphans: {refs.orphans(self.files())}"
        assert not [p for p in Path(self.roots[0]).rglob("*.lvo-tmp-*")], "temporary files left"
        for path in refs.referenced():
            assert os.path.exists(path), f"{path} is referenced but gone"


class GuestProof:
    """The guest-side proofs this module keeps checking."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.uptimes: list[float] = []
        self.markers: set[str] = set()
        self.data = ""
        self.boot_id = ""
        self.pid: int | None = None

    def sector(self, sectors: int, sector: int) -> str:
        return self.vm.sh(f"echo 3 > /proc/sys/vm/drop_caches; dd if={self.vm.dev(sectors)} bs=512 skip={sector} "
                          f"count=1 2>/dev/null | head -c 64").rstrip(".\0")

    def mark(self, name: str) -> None:
        self.vm.mark(name)
        self.markers.add(name)

    def write_data(self, text: str) -> None:
        self.vm.write_disk(DATA_SECTORS, text)
        self.data = text

    def uptime(self) -> float:
        value = self.vm.uptime()
        assert not self.uptimes or value >= self.uptimes[-1], f"uptime went backwards: {self.uptimes[-1]} -> {value}"
        self.uptimes.append(value)
        return value

    def prove_same(self) -> None:
        assert self.vm.state().startswith("running/")
        assert run(self.vm.guest.agent_ping(5))
        self.uptime()
        assert self.vm.boot_id() == self.boot_id, "the guest never rebooted"
        assert self.vm.pid() == self.pid, "the same QEMU runs"
        assert self.markers <= self.vm.markers(), "RAM markers survive"
        assert self.vm.read_disk(DATA_SECTORS) == self.data, "the data disk's bytes are intact"
        assert self.sector(ROOT_SECTORS, PARENT_SECTOR) == PARENT_TEXT, "the parent's bytes are intact"
        assert self.vm.read_disk(RAW_SECTORS) == "M2-RAW-0", "the raw disk's bytes are intact"


@pytest.fixture(scope="module")
def host(libvirt_nodes):
    h = Host(libvirt_nodes[0].uri)
    run(h.connect())
    yield h
    run(h.close())
    print("\nM2 engine facts:", json.dumps(FACTS, indent=2, default=str))


@pytest.fixture(scope="module")
def roots(storage_dir) -> tuple[str, ...]:
    return (str(storage_dir),)


@pytest.fixture(scope="module")
def world(host, libvirt_nodes, guest_image, storage_dir, roots):
    name = f"m2e-{uuid.uuid4().hex[:6]}"
    home = storage_dir / f"{name}-home"
    home.mkdir()
    base, leaf, data = home / f"{name}-root-base.raw", home / f"{name}-root.qcow2", home / f"{name}-data.qcow2"
    scratch = home / f"{name}-scratch.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(scratch), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "64M"], check=True)
    with open(base, "r+b") as f:
        f.seek(PARENT_SECTOR * 512)
        f.write(PARENT_TEXT.encode().ljust(64, b"."))
    images.create_overlay(str(leaf), str(base), "raw", roots=roots)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "32M"], check=True)
    specs = [{"name": "root", "path": str(leaf), "format": "qcow2"},
             {"name": "data", "path": str(data), "format": "qcow2"},
             {"name": "scratch", "path": str(scratch), "format": "raw"}]
    vm = None
    try:
        vm = boot(host, libvirt_nodes[0].uri, guest_image, storage_dir, name, specs)
        w = World(host, roots, vm, {"powerState": "Running", "memory": {"size": "192Mi"}, "disks": specs})
        w.guest = GuestProof(vm)
        w.guest.boot_id, w.guest.pid = vm.boot_id(), vm.pid()
        w.guest.mark("boot")
        w.guest.write_data("M2-DATA-0")
        vm.write_disk(RAW_SECTORS, "M2-RAW-0")
        w.guest.uptime()
        yield w
    finally:
        if vm is not None:
            drop(libvirt_nodes[0].uri, vm.uuid)


def new_dir(world: World, tag: str) -> Path:
    d = Path(world.roots[0]) / f"{world.obj['metadata']['name']}-{tag}"
    d.mkdir()
    return d


def moves_into(world: World, d: Path, tag: str) -> list[dict]:
    name = world.obj["metadata"]["name"]
    return [{"name": "root", "destinationPath": str(d / f"{name}-root.{tag}.qcow2")},
            {"name": "data", "destinationPath": str(d / f"{name}-data.{tag}.qcow2")},
            {"name": "scratch", "destinationPath": str(d / f"{name}-scratch.{tag}.img")}]


def assert_clean(world: World) -> None:
    """qemu-img check of every file of the VM's chains (guest suspended so that the leaves are quiet) and
    qemu-img's own view of each chain equal to libvirt's."""
    vm = world.vm
    run(vm.guest.suspend())
    try:
        for chain in vm.chains().values():
            assert qemu_img_chain(chain.active.path) == list(chain.paths)
            for layer in chain.layers:
                result = images.check(layer.path, roots=world.roots)
                assert result.clean and result.supported == (layer.format == "qcow2"), result
    finally:
        run(vm.guest.resume())


def assert_moved(world: World, st: dict, moves: list[dict], before: dict) -> dict:
    """Succeeded onto the planned files; the old files the new chains do not use are gone unless held."""
    assert st["phase"] == "Succeeded" and st["step"] == "Done", st
    assert st["conditions"][0]["status"] == "True" and st["progress"]["percent"] == 100
    assert world.vm_states[-1][0] == "Succeeded"
    chains = world.vm.chains()
    targets = TARGETS
    by_name = {d["name"]: d for d in st["disks"]}
    inactive = run(common.disk_states(world.vm.guest, inactive=True))
    own = DomainConfig.from_xml(run(world.vm.guest.xml(inactive=True))).operator_metadata
    held = {p for files in world.snapshots.values() for p in files}
    for move in moves:
        name, dest = move["name"], move["destinationPath"]
        chain = chains[targets[name]]
        d = by_name[name]
        assert chain.active.path == dest == d["destinationFile"]
        assert list(chain.paths[:1 + len(d["copiedFiles"])]) == [dest, *d["copiedFiles"]]
        assert set(chain.paths[1 + len(d["copiedFiles"]):]) <= set(before[targets[name]].paths), "kept in place"
        assert all(os.path.dirname(p) == os.path.dirname(dest) for p in d["copiedFiles"])
        assert d["sourceFile"] == before[targets[name]].active.path
        assert inactive[name].chain.active.path == dest, "the persistent definition is on the new leaf"
        assert own.disks[name].paths == chain.paths, "the disk record is the new chain"
        stored = DomainConfig.from_xml(run(world.vm.guest.xml(inactive=True)))
        assert disks.record_from(stored, world.obj)[name].paths == chain.paths, \
            "the reconciler renders the disk on its new files although the spec names the old one"
        assert world.recorded[name] == list(chain.paths)
        for old in before[targets[name]].paths:
            if old in chain:
                continue
            assert os.path.exists(old) == (old in held), (old, held)
    assert not any(run(world.vm.guest.block_job_info(t)) for t in TARGETS.values())
    assert run(world.vm.guest.call(lambda dom: dom.isPersistent())), "never undefined (TRANSIENT_JOB)"
    return chains


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_anything_is_written_or_touched(world):
    name = world.obj["metadata"]["name"]
    d = new_dir(world, "bad")
    chains = world.vm.chains()
    root_dir = Path(world.roots[0])
    (d / "taken.qcow2").touch()
    (d / f"{name}-root-base.raw").touch()  # where the root disk's parent would be copied
    good = str(d / "ok.qcow2")
    cases = [
        ([{"name": "nope", "destinationPath": good}], "DiskNotFound"),
        ([{"name": "data", "destinationPath": "/tmp/outside.qcow2"}], "PathNotAllowed"),
        ([{"name": "data", "destinationPath": str(d / "taken.qcow2")}], "FileExists"),
        ([{"name": "root", "destinationPath": good}], "FileExists"),
        ([{"name": "data", "destinationPath": chains["vda"].active.path}], "FileExists"),  # another disk's file
        ([{"name": "data", "destinationPath": good}, {"name": "data", "destinationPath": str(d / "b.qcow2")}],
         "DuplicateDisk"),
        ([{"name": "data", "destinationPath": chains["vdb"].active.path}], "SamePath"),
        ([{"name": "data", "destinationPath": str(d / "missing" / "x.qcow2")}], "DirectoryNotFound"),
    ]
    listing = sorted(str(p) for p in root_dir.rglob("*"))
    for moves, reason in cases:
        mig = world.migration(moves)
        with pytest.raises(MigrationFailed) as err:
            world.migrate(mig)
        assert err.value.reason == reason, (moves, err.value)
        assert mig["status"] == {} and world.vm_states == [], "nothing written"
        assert sorted(str(p) for p in root_dir.rglob("*")) == listing and world.vm.chains() == chains, "nothing touched"
    # deleted before the job started: nothing happens
    mig = world.migration([{"name": "data", "destinationPath": good}])
    with pytest.raises(MigrationFailed) as err:
        world.migrate(mig, aborted=True)
    assert err.value.reason == "MigrationAborted" and mig["status"] == {} and world.vm_states == [], err.value
    assert sorted(str(p) for p in root_dir.rglob("*")) == listing
    # a block job of someone else's on a disk: OperationInProgress
    scratch = str(d / "scratch.qcow2")
    images.create_image(scratch, "qcow2", DATA_SECTORS * 512, roots=world.roots)
    run(world.vm.guest.block_copy("vdb", disk_destination_xml(scratch), shallow=True, reuse_ext=True))
    try:
        mig = world.migration([{"name": "data", "destinationPath": good}])
        with pytest.raises(MigrationFailed) as err:
            world.migrate(mig)
        assert err.value.reason == "OperationInProgress" and mig["status"] == {}, err.value
    finally:
        run(world.vm.guest.block_job_abort("vdb"))  # synchronous: the job is gone when it returns
    assert run(world.vm.guest.block_job_info("vdb")) is None
    assert world.vm.chains() == chains
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    world.guest.prove_same()


# -- the move ----------------------------------------------------------------------------------------------


def test_move_both_disks_while_the_guest_runs(world):
    g = world.guest
    g.mark("before-move")
    g.write_data("M2-DATA-1")
    before = world.vm.chains()
    d = new_dir(world, "m1")
    moves = moves_into(world, d, "m1")
    mig = world.migration(moves)
    st = world.migrate(mig)
    assert world.steps == STEPS, world.steps
    assert [s for s, _ in world.vm_states] == ["Migrating", "Succeeded"]
    chains = assert_moved(world, st, moves, before)
    name = world.obj["metadata"]["name"]
    new_base = str(d / f"{name}-root-base.raw")
    assert list(chains["vda"].paths) == [moves[0]["destinationPath"], new_base]
    assert list(chains["vdb"].paths) == [moves[1]["destinationPath"]]
    assert list(chains["vdc"].paths) == [moves[2]["destinationPath"]] and chains["vdc"].active.format == "raw", \
        "a raw leaf moves to a raw file (copied whole)"
    assert {x["name"]: x["copiedFiles"] for x in st["disks"]} == {"root": [new_base], "data": [], "scratch": []}
    assert os.stat(new_base).st_blocks * 512 < 1 << 20, "the parent copy is sparse"
    for layer in before.values():
        for p in layer.paths:
            assert not os.path.exists(p), f"{p}: the old file is removed (nothing else holds it)"
    copying = [p for p in world.progress if p["step"] == "Copying"]
    assert copying and all("percent" in p and "dataTotalBytes" in p for p in copying), world.progress
    parents = [p for p in world.progress if p["step"] == "CopyParents"]
    assert parents and parents[-1]["dataTotalBytes"] > 0, world.progress  # the parent's allocated bytes
    assert world.events == []
    fact("move_three_disks.duration_ms", st["durationMilliseconds"])
    fact("move_three_disks.progress_writes_while_copying", len(copying))
    assert_clean(world)
    world.assert_no_orphans_and_nothing_lost()
    g.prove_same()


def test_old_files_a_snapshot_holds_are_kept_and_a_three_layer_chain_moves(world):
    """A disk-only snapshot of both disks (as the snapshot engine takes it) makes vda leaf -> old leaf -> raw base;
    a VMSnapshot holds the old leaf and below. The move copies both backing files (the middle copy's header is
    pointed at the base's copy) and removes only the snapshot's leaves."""
    g = world.guest
    name = world.obj["metadata"]["name"]
    chains = world.vm.chains()
    s1 = {t: f"{os.path.splitext(c.active.path)[0]}.s1.qcow2" for t, c in chains.items()}
    run(world.vm.guest.snapshot_external(s1))
    run(disks.record(world.host, world.vm.guest, {n: s.chain for n, s in run(common.disk_states(world.vm.guest))
                                                  .items()}))
    world.snapshots["s1"] = [p for c in chains.values() for p in c.paths]
    g.mark("after-snapshot")
    g.write_data("M2-DATA-2")
    before = world.vm.chains()
    assert len(before["vda"]) == 3
    d = new_dir(world, "m2")
    moves = moves_into(world, d, "m2")
    st = world.migrate(world.migration(moves))
    after = assert_moved(world, st, moves, before)
    copies = [str(d / Path(chains["vda"].active.path).name), str(d / f"{name}-root-base.raw")]
    assert list(after["vda"].paths) == [moves[0]["destinationPath"], *copies]
    assert qemu_img_chain(moves[0]["destinationPath"]) == [moves[0]["destinationPath"], *copies], \
        "the copied middle layer names the copied base"
    assert list(after["vdb"].paths) == [moves[1]["destinationPath"], str(d / Path(chains["vdb"].active.path).name)]
    for p in s1.values():
        assert not os.path.exists(p), "the snapshot's leaves (held by nobody) are removed"
    for p in world.snapshots["s1"]:
        assert os.path.exists(p) and p in st["conditions"][0]["message"], "held files are kept and named"
    assert [r for r, _, _ in world.events] == ["MigrationFilesKept"] and "snapshot/test/s1" in world.events[0][1]
    assert_clean(world)
    world.assert_no_orphans_and_nothing_lost()
    g.prove_same()
    # the snapshot goes (its delete would remove its files): nothing of the old home is left then
    for p in world.snapshots.pop("s1"):
        os.unlink(p)
    world.events.clear()
    world.assert_no_orphans_and_nothing_lost()


# -- re-entry ----------------------------------------------------------------------------------------------

KILLS = [
    ("CopyParents", False), ("CopyParents", True), ("PrepareLeaves", True), ("Copying", True), ("progress", True),
    ("lost-job", True), ("Pivot", True), ("half-pivot", True), ("Record", True), ("Cleanup", True),
]


@pytest.mark.parametrize(("kill_at", "after_write"), KILLS, ids=[f"{k}-{'after' if a else 'before'}" for k, a in KILLS])
def test_reentry_after_a_kill_at_each_step(world, kill_at, after_write):
    g = world.guest
    tag = f"k-{kill_at.lower()}-{'a' if after_write else 'b'}"
    g.mark(tag)
    g.write_data(f"M2-DATA-{tag}")
    before = world.vm.chains()
    d = new_dir(world, tag)
    moves = moves_into(world, d, tag)
    mig = world.migration(moves)
    kill = {"lost-job": "progress", "half-pivot": "Pivot"}.get(kill_at, kill_at)
    with pytest.raises(Killed):
        world.migrate(mig, kill_at=kill, after_write=after_write)
    recorded = mig["status"].get("step")
    expected = None if not after_write else ("Copying" if kill == "progress" else kill)
    assert recorded == expected, mig["status"]
    g.prove_same()  # killed mid-way: the guest runs on, whatever step
    if kill_at == "lost-job":  # libvirt lost the copy job (e.g. restarted): the re-entered run starts it again
        for target in TARGETS.values():
            if run(world.vm.guest.block_job_info(target)) is not None:
                run(world.vm.guest.block_job_abort(target))
        assert not any(run(world.vm.guest.block_job_info(t)) for t in TARGETS.values())
    if kill_at == "CopyParents" and after_write:  # killed in the middle of a copy: its temporary file is left
        for d_ in mig["status"]["disks"]:
            for copied in d_["copiedFiles"]:
                head, tail = os.path.split(copied)
                Path(head, f".{tail}.lvo-tmp-dead").write_bytes(b"half a copy")
    if kill_at == "Record":  # pivoted, not recorded yet: what libvirt made of the persistent definition itself
        inactive = run(common.disk_states(world.vm.guest, inactive=True))
        fact("persistent_paths_after_pivot_before_record",
             {n: ("new" if s.chain.active.path == m["destinationPath"] else "old")
              for n, s in inactive.items() for m in moves if m["name"] == n})
    if kill_at == "half-pivot":  # killed between the two pivots: vda runs on its new leaf, vdb's copy is READY
        run(world.vm.guest.block_job_pivot("vda"))
        assert world.vm.chains()["vda"].active.path == moves[0]["destinationPath"]
    st = world.migrate(mig)  # the agent restarted: the same entry point, the status it had recorded
    assert world.steps[-1] == "Done" and world.steps[0] == (recorded or "CopyParents"), (recorded, world.steps)
    assert_moved(world, st, moves, before)
    for chain in before.values():
        for p in chain.paths:
            assert not os.path.exists(p), f"{p}: the old file is removed"
    assert_clean(world)
    world.assert_no_orphans_and_nothing_lost()
    g.prove_same()


# -- a guest writing while its disk is mirrored -----------------------------------------------------------

WRITER_SECTOR, WRITER_COUNT = 32768, 40  # at 16 MiB into the data disk, past the bytes the tests fill


def test_writes_during_the_copy_land_on_the_new_files(world):
    """A writer in the guest (one fsync'ed sector after another) runs while the throttled copy goes on; every
    sector it wrote reads back after the move (the mirror carried the writes made during the copy)."""
    g = world.guest
    _fill_data_disk(world, 6)
    dev = world.vm.dev(DATA_SECTORS)
    script = (f"i=0; while [ $i -lt {WRITER_COUNT} ]; do printf 'W-%s' $i | dd of={dev} bs=512 "
              f"seek=$(({WRITER_SECTOR}+i)) count=1 conv=sync,fsync 2>/dev/null; i=$((i+1)); sleep 0.1; done")
    writer = threading.Thread(target=world.vm.sh, args=(script, 300))  # one guest-exec, while the move runs
    writer.start()
    before = world.vm.chains()
    d = new_dir(world, "writer")
    moves = moves_into(world, d, "writer")
    try:
        st = world.migrate(world.migration(moves, bandwidthMibPerSecond=2))
    finally:
        writer_done_at_end = not writer.is_alive()
        writer.join(300)
    assert not writer.is_alive()
    assert_moved(world, st, moves, before)
    out = world.vm.sh(f"echo 3 > /proc/sys/vm/drop_caches; i=0; while [ $i -lt {WRITER_COUNT} ]; do "
                      f"dd if={dev} bs=512 skip=$(({WRITER_SECTOR}+i)) count=1 2>/dev/null | head -c 8 | tr -d '\\0';"
                      f" echo; i=$((i+1)); done")
    assert out.split() == [f"W-{i}" for i in range(WRITER_COUNT)], out
    fact("writer.finished_before_the_move_ended", writer_done_at_end)
    fact("writer.move_duration_ms", st["durationMilliseconds"])
    assert_clean(world)
    world.assert_no_orphans_and_nothing_lost()
    g.prove_same()


# -- abort and timeouts ------------------------------------------------------------------------------------


def _fill_data_disk(world: World, mib: int) -> None:
    """Random bytes beyond the first MiB of the data disk: its top layer has that much to copy."""
    dev = world.vm.dev(DATA_SECTORS)
    world.vm.sh(f"dd if=/dev/urandom of={dev} bs=1M seek=1 count={mib} conv=fsync 2>/dev/null; sync", timeout=240)


def _assert_rolled_back(world: World, before: dict, d: Path) -> None:
    assert world.vm.chains() == before, "the VM runs on its old files"
    assert not any(run(world.vm.guest.block_job_info(t)) for t in TARGETS.values())
    assert list(d.iterdir()) == [], "the files the migration made are removed"
    inactive = run(common.disk_states(world.vm.guest, inactive=True))
    assert {n: s.chain.active.path for n, s in inactive.items()} == {
        n: before[t].active.path for n, t in TARGETS.items()}, "the definition is unchanged"
    for chain in before.values():
        for p in chain.paths:
            assert os.path.exists(p)
    world.assert_no_orphans_and_nothing_lost()
    world.guest.prove_same()


def test_abort_during_a_throttled_copy_leaves_the_vm_on_its_old_files(world):
    g = world.guest
    _fill_data_disk(world, 24)
    g.write_data("M2-DATA-abort")
    before = world.vm.chains()
    d = new_dir(world, "abort")
    mig = world.migration(moves_into(world, d, "abort"), bandwidthMibPerSecond=1)

    def abort_at_third(ctx, n):
        if n == 3:
            ctx.abort.set()

    with pytest.raises(MigrationFailed) as err:
        world.migrate(mig, on_progress=abort_at_third)
    assert err.value.reason == "MigrationAborted", err.value
    copying = [p for p in world.progress if p["step"] == "Copying"]
    assert len(copying) >= 3 and max(p["dataTotalBytes"] for p in copying) > 20 << 20, copying
    processed = [p["dataProcessedBytes"] for p in copying]
    assert processed == sorted(processed) and processed[-1] < copying[-1]["dataTotalBytes"], processed
    assert "Pivot" not in world.steps and [s for s, _ in world.vm_states] == ["Migrating"]
    _assert_rolled_back(world, before, d)
    d.rmdir()


def test_completion_timeout_aborts_the_copy(world):
    before = world.vm.chains()
    d = new_dir(world, "timeout")
    mig = world.migration(moves_into(world, d, "timeout"), bandwidthMibPerSecond=1, completionTimeoutPerGiB=2)
    with pytest.raises(MigrationFailed) as err:
        world.migrate(mig)
    assert err.value.reason == "MigrationTimedOut", err.value
    _assert_rolled_back(world, before, d)
    d.rmdir()


def test_reentry_with_the_vm_stopped_meanwhile_removes_the_new_files(world):
    """Last (the guest stops): killed during the copy, then the domain is stopped; the re-entered run fails
    VMNotRunning and removes the files the first run made; the definition and the old files are untouched."""
    before = world.vm.chains()
    d = new_dir(world, "stopped")
    mig = world.migration(moves_into(world, d, "stopped"))
    with pytest.raises(Killed):
        world.migrate(mig, kill_at="progress")
    assert mig["status"]["step"] == "Copying" and list(d.iterdir())
    run(world.vm.guest.destroy())
    with pytest.raises(MigrationFailed) as err:
        run(storage.run(world.ctx_for(mig)), timeout=600)
    assert err.value.reason == "VMNotRunning", err.value
    assert list(d.iterdir()) == [], "the new files are removed"
    inactive = run(common.disk_states(world.vm.guest, inactive=True))
    assert {n: s.chain.active.path for n, s in inactive.items()} == {n: before[t].active.path
                                                                     for n, t in TARGETS.items()}
    for chain in before.values():
        for p in chain.paths:
            assert os.path.exists(p)
    d.rmdir()
