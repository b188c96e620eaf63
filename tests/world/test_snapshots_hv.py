"""Issue 8's building blocks below the agent, on a real libvirtd + QEMU (TCG) node and the test guest:
save/restore with raw disk copies (S1/S2), external snapshots with memory and their manual revert on
libvirt 9.0 (S3/S4), disk-only snapshots of a data disk (S5/S6), an online clone over a shared
read-only backing file (S7) and merges (S8). Every step is proven from inside the guest (RAM markers
in its tmpfs, /proc/uptime, boot_id, the data disk's bytes) and on the host (qemu-img info
--backing-chain, qemu-img check). Durations and libvirt's behaviour are recorded in FACTS (printed
and written to /tmp/lvo-snapshot-facts.json), never asserted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import render_domain
from libvirt_operator.domain.snapshot import retarget_disks
from libvirt_operator.hypervisor import Host, HypervisorError
from libvirt_operator.hypervisor.host_snapshots import HostSnapshotMixin
from libvirt_operator.hypervisor.states import power_state
from libvirt_operator.storage import Chain, References, StorageError, images
from localenv.fixtures_libvirt import wait_for_marker

from .hypervisor_support import run

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 240.0
ROOT_SECTORS, DATA_SECTORS = 131072, 65536  # 64 MiB system disk, 32 MiB data disk (512-byte sectors)
FACTS: dict[str, object] = {}
FACTS_FILE = Path("/tmp/lvo-snapshot-facts.json")

SnapHost = Host if issubclass(Host, HostSnapshotMixin) else type("SnapHost", (Host, HostSnapshotMixin), {})


def fact(key: str, value: object) -> None:
    FACTS[key] = value
    FACTS_FILE.write_text(json.dumps(FACTS, indent=2, default=str))


class Timer:
    def __init__(self, key: str):
        self.key = key

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            fact(f"seconds.{self.key}", round(time.monotonic() - self.start, 3))


class StateWatch:
    """Polls a domain's (state, reason) from its own connection while a call runs: which states a
    snapshot or save passes through."""

    def __init__(self, uri: str, dom_uuid: str):
        self.conn = libvirt.open(uri)
        self.dom = self.conn.lookupByUUIDString(dom_uuid)
        self.seen: list[str] = []
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            try:
                ps = power_state(*self.dom.state())
            except libvirt.libvirtError:
                continue
            name = f"{ps.state}/{ps.reason}"
            if not self.seen or self.seen[-1] != name:
                self.seen.append(name)
            time.sleep(0.002)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()
        self.conn.close()


class VM:
    """A rendered test guest on node-a: its Guest, files and guest-side proofs."""

    def __init__(self, host, uri: str, guest, console_log: Path, root_fmt: str):
        self.host, self.uri, self.guest, self.console_log, self.root_fmt = host, uri, guest, console_log, root_fmt

    @property
    def uuid(self) -> str:
        return self.guest.uuid

    def sh(self, script: str, timeout: float = 60) -> str:
        result = run(self.guest.guest_exec(["/bin/sh", "-c", script], timeout=timeout))
        assert result.exit_code == 0, (script, result)
        return result.stdout

    def wait_agent(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not run(self.guest.agent_ping(1)):
            assert time.monotonic() < deadline, "guest agent did not answer"
            time.sleep(0.2)

    def dev(self, sectors: int) -> str:
        """The guest's block device of that size (guest names need not follow libvirt's targets)."""
        out = self.sh(f"for d in /sys/block/vd*; do [ $(cat $d/size) = {sectors} ] && echo ${{d##*/}}; done; true")
        names = out.split()
        assert len(names) == 1, out
        return f"/dev/{names[0]}"

    def write_disk(self, sectors: int, text: str) -> None:
        payload = text.ljust(64, ".")
        self.sh(f"printf '%s' '{payload}' | dd of={self.dev(sectors)} bs=512 count=1 conv=sync,fsync 2>/dev/null; sync")

    def read_disk(self, sectors: int) -> str:
        return self.sh(f"echo 3 > /proc/sys/vm/drop_caches; dd if={self.dev(sectors)} bs=64 count=1 2>/dev/null"
                       ).rstrip(".\0")

    def mark(self, name: str) -> None:
        self.sh(f"echo {name} > /tmp/marker-{name}")

    def markers(self) -> set[str]:
        return set(self.sh("cd /tmp && ls marker-* 2>/dev/null | sed s/^marker-//; true").split())

    def uptime(self) -> float:
        return float(self.sh("cat /proc/uptime").split()[0])

    def boot_id(self) -> str:
        """The kernel's random boot id (made on its first read, so read it before a save or snapshot)."""
        return self.sh("cat /proc/sys/kernel/random/boot_id").strip()

    def state(self) -> str:
        ps = run(self.guest.state())
        return f"{ps.state}/{ps.reason}"

    def chains(self) -> dict[str, Chain]:
        return run(self.guest.disk_chains())

    def pid(self) -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and self.uuid.encode() in argv:
                return int(entry.name)
        return None

    def wait_uptime_past(self, value: float, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while (now := self.uptime()) < value:
            assert time.monotonic() < deadline, f"guest uptime {now} never reached {value}"
            time.sleep(1)
        return now


def boot(host, uri: str, guest_image, storage_dir: Path, name: str, disks: list[dict]) -> VM:
    spec = {
        "cpu": {"vcpus": 1},
        "memory": {"size": "192Mi"},
        "boot": {"kernel": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                            "cmdline": guest_image.cmdline}},
        "disks": disks,
        "interfaces": [{"name": "eth0", "type": "user"}],
    }
    console_log = storage_dir / f"{name}.console.log"
    rendered = render_domain(VirtualMachineSpec.model_validate(spec), name=name, uuid=str(uuid.uuid4()),
                             namespace="test", vm_name=name, generation=1, domain_type="qemu",
                             console_log=str(console_log))
    guest = run(host.define(rendered.to_xml()))
    vm = VM(host, uri, guest, console_log, disks[0].get("format", "qcow2"))
    run(guest.start())
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    vm.wait_agent()
    return vm


def drop(uri: str, dom_uuid: str) -> None:
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(dom_uuid)
    except libvirt.libvirtError:
        conn.close()
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()
    conn.close()


def qemu_img_chain(path: str) -> list[str]:
    """The chain as qemu-img itself prints it (independent of storage.chain), active first."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    entries = json.loads(out)
    paths, current = [], os.path.abspath(path)
    for entry in entries:
        paths.append(current)
        name = entry.get("full-backing-filename")
        if name:
            current = name if os.path.isabs(name) else os.path.join(os.path.dirname(current), name)
    return paths


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_clean(roots, chains, include_active: bool = True) -> None:
    for chain in chains:
        for layer in chain.layers[0 if include_active else 1:]:
            result = images.check(layer.path, roots=roots)
            assert result.clean, result
            assert result.supported == (layer.format == "qcow2"), result


@pytest.fixture(scope="module")
def host(libvirt_nodes):
    h = SnapHost(libvirt_nodes[0].uri)
    run(h.connect())
    yield h
    run(h.close())
    print("\nsnapshot facts:", json.dumps(FACTS, indent=2, default=str))


@pytest.fixture(scope="module")
def roots(storage_dir) -> tuple[str, ...]:
    return (str(storage_dir),)


# -- storage.images on real files (no VM) -------------------------------------------------------


def test_images_refuse_overwrites_paths_outside_the_roots_and_symlinks_out(storage_dir, roots, tmp_path):
    base = storage_dir / "img-base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "8M"], check=True)
    leaf = storage_dir / "img-leaf.qcow2"
    chain = images.create_overlay(str(leaf), str(base), "raw", roots=roots)
    assert chain == Chain.of((str(leaf), "qcow2"), (str(base), "raw"))
    assert qemu_img_chain(str(leaf)) == [str(leaf), str(base)]
    before = sha(str(leaf))
    for attempt in (lambda: images.create_overlay(str(leaf), str(base), "raw", roots=roots),
                    lambda: images.copy_sparse(str(base), str(leaf), roots=roots)):
        with pytest.raises(StorageError) as caught:
            attempt()
        assert caught.value.reason == "FileExists"
    assert sha(str(leaf)) == before
    outside = tmp_path / "outside.qcow2"
    with pytest.raises(StorageError) as caught:
        images.create_overlay(str(outside), str(base), "raw", roots=roots)
    assert caught.value.reason == "PathNotAllowed" and not outside.exists()
    link = storage_dir / "img-link-out"
    link.symlink_to(tmp_path)
    with pytest.raises(StorageError) as caught:
        images.copy_sparse(str(base), str(link / "copy.raw"), roots=roots)
    assert caught.value.reason == "PathNotAllowed" and not (tmp_path / "copy.raw").exists()
    with pytest.raises(StorageError) as caught:
        images.create_overlay(str(storage_dir / "img-x.qcow2"), str(storage_dir / "nope.raw"), "raw", roots=roots)
    assert caught.value.reason == "FileNotFound"
    with pytest.raises(StorageError) as caught:
        images.verify_overlay(str(leaf), str(storage_dir / "other.raw"), roots=roots)
    assert caught.value.reason == "BackingMismatch"
    assert images.verify_overlay(str(leaf), str(base), roots=roots) == chain
    # a sparse copy keeps the bytes and the holes
    with open(base, "r+b") as f:
        f.seek(4 << 20)
        f.write(b"middle")
    copy = storage_dir / "img-copy.raw"
    images.copy_sparse(str(base), str(copy), roots=roots)
    assert sha(str(copy)) == sha(str(base))
    assert os.stat(copy).st_blocks * 512 < 1 << 20
    assert images.check(str(leaf), roots=roots).clean and not images.check(str(copy), roots=roots).supported
    assert images.remove(str(copy), roots=roots) and not images.remove(str(copy), roots=roots)
    assert not [p for p in os.listdir(storage_dir) if ".lvo-tmp-" in p]


# -- S1/S2: raw disks, save + copies, restore, revert -------------------------------------------


@pytest.fixture(scope="module")
def raw_vm(host, libvirt_nodes, guest_image, storage_dir):
    name = f"snr-{uuid.uuid4().hex[:6]}"
    root, data = storage_dir / f"{name}-root.raw", storage_dir / f"{name}-data.raw"
    for path, size in ((root, "64M"), (data, "32M")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True)
    vm = None
    try:
        vm = boot(host, libvirt_nodes[0].uri, guest_image, storage_dir, name,
                  [{"name": "root", "path": str(root), "format": "raw"},
                   {"name": "data", "path": str(data), "format": "raw"}])
        yield vm
    finally:
        if vm is not None:
            drop(libvirt_nodes[0].uri, vm.uuid)


def test_s1_s2_raw_save_copy_restore_and_revert(raw_vm, host, storage_dir, roots):
    vm = raw_vm
    chains = vm.chains()
    root, data = chains["vda"].active.path, chains["vdb"].active.path
    assert chains["vda"].backing == () and chains["vda"].active.format == "raw"
    vm.mark("before")
    vm.write_disk(DATA_SECTORS, "RAW-A")
    boot_id, up0 = vm.boot_id(), vm.uptime()
    mem = str(storage_dir / f"{vm.guest.name}.s1.mem")
    with Timer("raw.save"), StateWatch(vm.uri, vm.uuid) as watch:
        run(vm.guest.save(mem, running=True))
    fact("states.during_save", watch.seen)
    assert vm.state() == "shutoff/saved"
    fact("states.after_save", vm.state())
    copies = {t: f"{p}.s1" for t, p in (("vda", root), ("vdb", data))}
    with Timer("raw.copy_disks"):
        for target, path in (("vda", root), ("vdb", data)):
            images.copy_sparse(path, copies[target], roots=roots)
    assert sha(copies["vdb"]) == sha(data)
    saved_xml = run(host.save_image_xml(mem))
    assert ET.fromstring(saved_xml).findtext("uuid") == vm.uuid
    with Timer("raw.restore"):
        restored = run(host.restore(mem, saved_xml))
    assert restored.uuid == vm.uuid
    fact("states.after_restore", vm.state())
    assert vm.state().startswith("running/")
    vm.wait_agent(60)
    up1 = vm.uptime()
    assert vm.boot_id() == boot_id and up1 >= up0, (up0, up1)
    assert "before" in vm.markers() and vm.read_disk(DATA_SECTORS) == "RAW-A"

    # changes after the snapshot, then the revert: safety copies, the copies put back, the memory restored
    vm.mark("after")
    vm.write_disk(DATA_SECTORS, "RAW-B")
    up_before_revert = vm.wait_uptime_past(up1 + 15)
    run(vm.guest.destroy())
    with Timer("raw.revert"):
        for target, path in (("vda", root), ("vdb", data)):
            images.copy_sparse(path, f"{path}.safety", roots=roots)
            assert images.remove(path, roots=roots)
            images.copy_sparse(copies[target], path, roots=roots)
        run(host.restore(mem, saved_xml))
    vm.wait_agent(60)
    up2 = vm.uptime()
    assert vm.markers() == {"before"}, "the RAM marker written after the save must be gone"
    assert vm.read_disk(DATA_SECTORS) == "RAW-A"
    assert vm.boot_id() == boot_id and up0 <= up2 < up_before_revert, (up0, up2, up_before_revert)
    for path in (root, data):  # the revert succeeded: the safety copies go
        assert images.remove(f"{path}.safety", roots=roots)
    fact("raw.uptime", {"at_save": up0, "after_restore": up1, "before_revert": up_before_revert,
                        "after_revert": up2})


# -- S3..S8 on qcow2 disks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qvm(host, libvirt_nodes, guest_image, storage_dir):
    name = f"snq-{uuid.uuid4().hex[:6]}"
    root, data = storage_dir / f"{name}-root.qcow2", storage_dir / f"{name}-data.qcow2"
    for path, size in ((root, "64M"), (data, "32M")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    vm = None
    try:
        vm = boot(host, libvirt_nodes[0].uri, guest_image, storage_dir, name,
                  [{"name": "root", "path": str(root)}, {"name": "data", "path": str(data)}])
        yield vm
    finally:
        if vm is not None:
            drop(libvirt_nodes[0].uri, vm.uuid)


class Story:
    """What the qcow2 tests hand on to each other (they run in file order)."""

    snapshot: dict = {}


def revert_memory(vm: VM, host, mem: str, backing: dict[str, Chain], leaves: dict[str, str], roots) -> None:
    """The manual revert of libvirt 9.0: stop, a new leaf per disk on the snapshot's backing file,
    restore the memory with the saved XML pointed at the new leaves (defined first: persistent)."""
    if run(vm.guest.state()).state != "shutoff":
        run(vm.guest.destroy())
    for target, path in leaves.items():
        below = backing[target]
        images.create_overlay(path, below.active.path, below.active.format, roots=roots)
    xml = retarget_disks(run(host.save_image_xml(mem)), leaves)
    run(host.define(xml))
    run(host.restore(mem, xml))


def test_s3_external_snapshot_with_memory_keeps_running_on_new_leaves(qvm, storage_dir, roots):
    vm = qvm
    before = vm.chains()
    pid = vm.pid()
    vm.mark("m1")
    vm.write_disk(DATA_SECTORS, "Q-A")
    boot_id = vm.boot_id()  # read before the snapshot: the kernel makes it on its first read
    up_before = vm.uptime()
    prefix = storage_dir / vm.guest.name
    overlays = {"vda": f"{prefix}-root.s1.qcow2", "vdb": f"{prefix}-data.s1.qcow2"}
    mem = f"{prefix}.s1.mem"
    with Timer("s3.snapshot_with_memory"), StateWatch(vm.uri, vm.uuid) as watch:
        run(vm.guest.snapshot_external(overlays, mem))
    fact("states.during_live_memory_snapshot", watch.seen)
    up_after = vm.uptime()
    assert vm.state() == "running/unpaused" or vm.state().startswith("running/")
    fact("states.after_live_memory_snapshot", vm.state())
    assert vm.pid() == pid, "the same QEMU keeps running"
    chains = vm.chains()
    for target in ("vda", "vdb"):
        assert chains[target] == before[target].with_leaf(overlays[target])
        assert qemu_img_chain(overlays[target]) == list(chains[target].paths)
        assert images.chain(overlays[target], roots=roots) == chains[target]
    assert_clean(roots, chains.values(), include_active=False)
    fact("memory_file_bytes", os.path.getsize(mem))
    vm.mark("m2")
    vm.write_disk(DATA_SECTORS, "Q-B")
    assert vm.read_disk(DATA_SECTORS) == "Q-B"
    Story.snapshot = {"mem": mem, "backing": before, "up": (up_before, up_after), "boot_id": boot_id}


def test_s4_revert_by_hand_twice(qvm, host, storage_dir, roots):
    vm, snap = qvm, Story.snapshot
    assert snap, "needs test_s3"
    prefix = storage_dir / vm.guest.name
    up_before_revert = vm.wait_uptime_past(snap["up"][1] + 15)
    with Timer("s4.revert"):
        leaves = {"vda": f"{prefix}-root.r1.qcow2", "vdb": f"{prefix}-data.r1.qcow2"}
        revert_memory(vm, host, snap["mem"], snap["backing"], leaves, roots)
    fact("states.after_memory_revert", vm.state())
    vm.wait_agent(60)
    up = vm.uptime()
    assert vm.markers() == {"m1"}, "m1 (before the snapshot) stays, m2 (after) is gone"
    assert vm.read_disk(DATA_SECTORS) == "Q-A"
    assert vm.boot_id() == snap["boot_id"]
    assert snap["up"][0] <= up < up_before_revert, (snap["up"], up, up_before_revert)
    chains = vm.chains()
    for target, leaf in leaves.items():
        assert chains[target] == snap["backing"][target].with_leaf(leaf)
        assert qemu_img_chain(leaf) == list(chains[target].paths)
    assert_clean(roots, chains.values(), include_active=False)

    # the second revert to the same snapshot, on leaves with much longer paths than the original disks
    vm.mark("m3")
    vm.write_disk(DATA_SECTORS, "Q-C")
    long_dir = prefix.parent / ("long-" + "x" * 120)
    long_dir.mkdir()
    leaves2 = {"vda": f"{long_dir}/{vm.guest.name}-root.r2.qcow2", "vdb": f"{long_dir}/{vm.guest.name}-data.r2.qcow2"}
    assert all(len(p) > len(snap["backing"][t].active.path) + 100 for t, p in leaves2.items())
    revert_memory(vm, host, snap["mem"], snap["backing"], leaves2, roots)
    vm.wait_agent(60)
    assert vm.markers() == {"m1"} and vm.read_disk(DATA_SECTORS) == "Q-A"
    chains = vm.chains()
    assert {t: c.active.path for t, c in chains.items()} == leaves2
    fact("longer_leaf_path_restore_works", True)
    # the first revert's leaves are referenced by nothing now: they go; the snapshot's files stay
    refs = (References().add_chains("vm", chains.values())
            .add_files("snapshot/s1", [snap["mem"], *(c.active.path for c in snap["backing"].values())]))
    verdict = refs.verdict(leaves.values(), removing=["revert/r1"])
    assert set(verdict.delete) == set(leaves.values()) and not verdict.keep
    for path in verdict.delete:
        assert images.remove(path, roots=roots)
    assert_clean(roots, chains.values(), include_active=False)
    run(vm.guest.suspend())
    assert_clean(roots, chains.values())  # the active leaves too, with QEMU's I/O stopped
    run(vm.guest.resume())
    Story.snapshot["chains_after_revert"] = chains


def test_save_image_define_xml_with_longer_paths(qvm, host, storage_dir, roots):
    """The handbook's limit on the running file's path: does it hold for the XML embedded in the image?"""
    snap = Story.snapshot
    assert snap, "needs test_s3"
    copy = f"{snap['mem']}.copy"
    images.copy_sparse(snap["mem"], copy, roots=roots)
    xml = run(host.save_image_xml(copy))
    long = {t: f"{storage_dir}/{'y' * 200}-{t}.qcow2" for t in ("vda", "vdb")}
    try:
        run(host.save_image_define_xml(copy, retarget_disks(xml, long)))
        embedded = run(host.save_image_xml(copy))
        fact("save_image_define_xml_longer_paths", "accepted")
        assert all(p in embedded for p in long.values())
    except HypervisorError as err:
        fact("save_image_define_xml_longer_paths", f"{err.reason}: {err.message}")
    finally:
        images.remove(copy, roots=roots)


def test_s5_s6_disk_only_snapshot_of_the_data_disk_and_its_revert(qvm, host, storage_dir, roots):
    vm = qvm
    prefix = storage_dir / vm.guest.name
    before = vm.chains()
    vm.write_disk(DATA_SECTORS, "D-C")
    overlay = f"{prefix}-data.s2.qcow2"
    with Timer("s5.disk_only_snapshot"), StateWatch(vm.uri, vm.uuid) as watch:
        run(vm.guest.snapshot_external({"vdb": overlay}))
    fact("states.during_disk_only_snapshot", watch.seen)
    chains = vm.chains()
    assert chains["vdb"] == before["vdb"].with_leaf(overlay)
    assert chains["vda"] == before["vda"], "the system disk is not part of this snapshot"
    assert qemu_img_chain(overlay) == list(chains["vdb"].paths)
    vm.write_disk(DATA_SECTORS, "D-D")
    vm.mark("s5-after")
    # revert: point the disk at a new leaf on the snapshot's backing file, and start (a cold boot)
    with Timer("s6.revert_disk_only"):
        run(vm.guest.destroy())
        fact("states.after_destroy", vm.state())
        leaf = f"{prefix}-data.r3.qcow2"
        below = before["vdb"].active
        images.create_overlay(leaf, below.path, below.format, roots=roots)
        run(host.define(retarget_disks(run(vm.guest.xml(inactive=True)), {"vdb": leaf})))
        assert_clean(roots, [*vm.chains().values(), images.chain(overlay, roots=roots)])
        run(vm.guest.start())
        vm.wait_agent()
    assert vm.read_disk(DATA_SECTORS) == "D-C"
    assert "s5-after" not in vm.markers()
    chains = vm.chains()
    assert chains["vdb"] == before["vdb"].with_leaf(leaf)
    assert chains["vda"] == before["vda"]
    assert images.remove(overlay, roots=roots)


def test_s7_online_clone_over_a_shared_read_only_backing_file(qvm, host, libvirt_nodes, guest_image,
                                                              storage_dir, roots):
    src = qvm
    prefix = storage_dir / src.guest.name
    src.write_disk(DATA_SECTORS, "SRC-0")
    before = src.chains()
    leaves = {"vda": f"{prefix}-root.src7.qcow2", "vdb": f"{prefix}-data.src7.qcow2"}
    pid = src.pid()
    with Timer("s7.snapshot_for_clone"):
        run(src.guest.snapshot_external(leaves))
    assert src.pid() == pid
    shared = {t: before[t].active for t in leaves}
    base_sha = {t: sha(layer.path) for t, layer in shared.items()}
    clone_name = f"{src.guest.name}-clone"
    clone_leaves = {}
    for target, layer in shared.items():
        clone_leaves[target] = f"{storage_dir}/{clone_name}-{target}.qcow2"
        images.create_overlay(clone_leaves[target], layer.path, layer.format, roots=roots)
    clone = None
    try:
        with Timer("s7.clone_boot"):
            clone = boot(host, src.uri, guest_image, storage_dir, clone_name,
                         [{"name": "root", "path": clone_leaves["vda"]}, {"name": "data", "path": clone_leaves["vdb"]}])
        assert clone.uuid != src.uuid
        macs = [ET.fromstring(run(g.xml())).find("./devices/interface/mac").get("address")
                for g in (src.guest, clone.guest)]
        assert macs[0] != macs[1], macs
        assert clone.read_disk(DATA_SECTORS) == "SRC-0", "the clone starts from the source's disk"
        src.write_disk(DATA_SECTORS, "SRC-1")
        clone.write_disk(DATA_SECTORS, "CLONE-1")
        assert src.read_disk(DATA_SECTORS) == "SRC-1" and clone.read_disk(DATA_SECTORS) == "CLONE-1"
        src_chains, clone_chains = src.chains(), clone.chains()
        for target in leaves:
            assert src_chains[target].backing[0] == shared[target] == clone_chains[target].backing[0]
            assert qemu_img_chain(clone_leaves[target]) == list(clone_chains[target].paths)
            assert sha(shared[target].path) == base_sha[target], "the shared backing file is never written"
        assert clone.boot_id() != src.boot_id()

        # S8 while the clone runs: the shared file may not be merged into; pulling into the leaf is fine
        refs = References().add_chains("vm/src", src_chains.values()).add_chains("vm/clone", clone_chains.values())
        verdict = refs.verdict([shared["vda"].path], removing=["vm/src"])
        assert verdict.keep == {shared["vda"].path: ("vm/clone",)}
        with Timer("s8.block_pull"):
            run(src.guest.block_pull("vda"))
            run(src.guest.wait_block_job("vda", "gone"))
        assert src.chains()["vda"] == Chain.of((leaves["vda"], "qcow2"))
        assert qemu_img_chain(leaves["vda"]) == [leaves["vda"]]
        assert sha(shared["vda"].path) == base_sha["vda"]
        assert clone.read_disk(DATA_SECTORS) == "CLONE-1"
        assert_clean(roots, [src.chains()["vda"]], include_active=False)
        Story.snapshot["clone"] = (clone_name, clone.uuid)
    finally:
        if clone is not None:
            drop(src.uri, clone.uuid)


def test_s8_commit_active_with_pivot_and_an_intermediate_commit(qvm, storage_dir, roots):
    vm = qvm
    prefix = storage_dir / vm.guest.name
    start = vm.chains()["vdb"]
    t1, t2 = f"{prefix}-data.t1.qcow2", f"{prefix}-data.t2.qcow2"
    run(vm.guest.snapshot_external({"vdb": t1}))
    vm.write_disk(DATA_SECTORS, "T1")
    run(vm.guest.snapshot_external({"vdb": t2}))
    vm.write_disk(DATA_SECTORS, "T2")
    chain = vm.chains()["vdb"]
    assert chain == start.with_leaf(t1).with_leaf(t2)
    # lower layers: t1 into the source leaf, t2 stays active
    with Timer("s8.block_commit"):
        run(vm.guest.block_commit("vdb", base=start.active.path, top=t1))
        run(vm.guest.wait_block_job("vdb", "gone"))
    assert vm.chains()["vdb"] == chain.after_commit(top=t1) == start.with_leaf(t2)
    assert qemu_img_chain(t2) == list(start.with_leaf(t2).paths)
    # the active layer: commit t2, wait for READY, pivot
    with Timer("s8.block_commit_active_pivot"):
        run(vm.guest.block_commit_active("vdb"))
        run(vm.guest.wait_block_job("vdb", "ready"))
        job = run(vm.guest.block_job_info("vdb"))
        assert job is not None and job.type == "active-commit" and job.ready
        run(vm.guest.block_job_pivot("vdb"))
    assert run(vm.guest.block_job_info("vdb")) is None
    assert vm.chains()["vdb"] == start
    assert vm.read_disk(DATA_SECTORS) == "T2"
    refs = References().add_chains("vm", vm.chains().values())
    verdict = refs.verdict([t1, t2], removing=["snapshot/t"])
    assert set(verdict.delete) == {t1, t2}
    for path in verdict.delete:
        assert images.remove(path, roots=roots)
    assert vm.read_disk(DATA_SECTORS) == "T2"
    run(vm.guest.suspend())
    assert_clean(roots, vm.chains().values())
    run(vm.guest.resume())
    with pytest.raises(HypervisorError) as caught:
        run(vm.guest.block_job_pivot("vdb"))
    fact("pivot_without_job", f"{caught.value.reason}: {caught.value.message}")


def test_block_copy_to_a_new_file_and_pivot(qvm, storage_dir, roots):
    vm = qvm
    before = vm.chains()["vda"]
    dest = f"{storage_dir / vm.guest.name}-root.copy.qcow2"
    vm.write_disk(ROOT_SECTORS, "ROOT-COPY")
    dest_xml = f"<disk type='file'><driver type='qcow2'/><source file='{dest}'/></disk>"
    with Timer("block_copy_pivot"):
        run(vm.guest.block_copy("vda", dest_xml, transient_job=True))
        run(vm.guest.wait_block_job("vda", "ready"))
        assert run(vm.guest.block_job_info("vda")).type == "copy"
        run(vm.guest.block_job_pivot("vda"))
    after = vm.chains()["vda"]
    assert after.active.path == dest and after.backing == ()
    assert qemu_img_chain(dest) == [dest] and before.active.path not in after
    assert vm.read_disk(ROOT_SECTORS) == "ROOT-COPY"


def test_overlay_refusals_and_reuse_ext(qvm, storage_dir, roots):
    """What 9.0 does with an existing overlay file, with and without REUSE_EXT."""
    vm = qvm
    prefix = storage_dir / vm.guest.name
    before = vm.chains()
    existing = f"{prefix}-data.exists.qcow2"
    Path(existing).write_bytes(b"not empty" * 100)
    with pytest.raises(HypervisorError) as caught:
        run(vm.guest.snapshot_external({"vdb": existing}))
    fact("existing_file_without_reuse_ext", f"{caught.value.reason}: {caught.value.message}")
    assert vm.chains() == before and Path(existing).read_bytes() == b"not empty" * 100

    # REUSE_EXT with a pre-created overlay on the right backing file (created with -u: QEMU holds the lock)
    reuse = f"{prefix}-data.reuse.qcow2"
    capacity = run(vm.guest.block_info("vdb"))[0]
    images.create_overlay(reuse, before["vdb"].active.path, "qcow2", roots=roots, size=capacity)
    images.verify_overlay(reuse, before["vdb"].active.path, roots=roots)
    run(vm.guest.snapshot_external({"vdb": reuse}, reuse=True))
    assert vm.chains()["vdb"] == before["vdb"].with_leaf(reuse)
    vm.write_disk(DATA_SECTORS, "REUSED")
    assert vm.read_disk(DATA_SECTORS) == "REUSED"

    # REUSE_EXT with a non-empty file that is not a qcow2 overlay of the current file
    with pytest.raises(HypervisorError) as caught:
        run(vm.guest.snapshot_external({"vdb": existing}, reuse=True))
    fact("reuse_ext_on_non_qcow2_file", f"{caught.value.reason}: {caught.value.message}")
    # REUSE_EXT with a qcow2 whose header names another backing file
    stranger_base = f"{prefix}-stranger.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", stranger_base, "32M"], check=True)
    stranger = f"{prefix}-data.stranger.qcow2"
    images.create_overlay(stranger, stranger_base, "raw", roots=roots)
    with pytest.raises(StorageError):
        images.verify_overlay(stranger, reuse, roots=roots)
    try:
        run(vm.guest.snapshot_external({"vdb": stranger}, reuse=True))
        live = vm.chains()["vdb"]
        fact("reuse_ext_with_wrong_backing", {"accepted": True, "live_chain": list(live.paths),
                                              "qemu_img_chain": qemu_img_chain(stranger),
                                              "guest_reads": vm.read_disk(DATA_SECTORS)})
    except HypervisorError as err:
        fact("reuse_ext_with_wrong_backing", f"refused: {err.reason}: {err.message}")


def test_memory_snapshot_without_live_pauses_for_the_snapshot(qvm, storage_dir, roots):
    vm = qvm
    prefix = storage_dir / vm.guest.name
    before = vm.chains()
    overlays = {t: f"{prefix}-{t}.s9.qcow2" for t in before}
    vm.mark("m9")
    with Timer("memory_snapshot_not_live"), StateWatch(vm.uri, vm.uuid) as watch:
        run(vm.guest.snapshot_external(overlays, f"{prefix}.s9.mem", live=False))
    fact("states.during_non_live_memory_snapshot", watch.seen)
    fact("states.after_non_live_memory_snapshot", vm.state())
    assert vm.state().startswith("running/")
    assert "m9" in vm.markers()
    assert {t: c for t, c in vm.chains().items()} == {t: before[t].with_leaf(p) for t, p in overlays.items()}
    xml = ET.fromstring(run(vm.guest.save_image_xml(f"{prefix}.s9.mem")))
    saved = {d.find("target").get("dev"): d.find("source").get("file") for d in xml.iterfind("./devices/disk")}
    assert saved == {t: c.active.path for t, c in before.items()}, "the memory image names the pre-snapshot files"
    # a header naming another backing file (accepted above with REUSE_EXT) is what a restart would read
    run(vm.guest.destroy())
    fact("reuse_ext_wrong_backing_header_after_stop", qemu_img_chain(before["vdb"].active.path))
