"""`kubectl virsh` snapshot verbs through the real kubectl binary, API server, controller, agents, libvirtd and
QEMU, with proofs from inside the guest (a RAM marker in its tmpfs, its boot id and uptime, a data disk's bytes)
and on the host (qemu-img info --backing-chain and qemu-img check of the files the VM runs on).

Create with memory -> list -> a change in the guest -> revert (twice) -> delete; save -> restore of a VM with a
raw disk; the refusals and the examples' manifests (server-side dry run) need no node agent."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from kubernetes import client

from libvirt_operator.api import meta
from tests.e2e.test_kubectl_virsh import BOOT, PLUGIN_DIR, image, ok, refused, running, with_agent
from tests.e2e.vmtools import NS, guest_run, wait_guest

REPO = Path(__file__).resolve().parents[2]
GAP = 60  # seconds of guest uptime between the snapshot point and a revert
JOB = 300  # seconds a snapshot or revert job may take on a loaded two-core machine (TCG)
SNAPSHOT_VERBS = ("snapshot-create-as", "snapshot-list", "snapshot-revert", "snapshot-delete", "save", "restore")
EXAMPLES = ("vmsnapshot-memory.yaml", "vmsnapshot-data-disks.yaml", "vmsnapshot-raw-copy.yaml", "vm-clone.yaml",
            "vm-revert.yaml")


@pytest.fixture(scope="module")
def virsh(cluster):
    """Runs `kubectl virsh ARGS` with the plugin on PATH (as in test_kubectl_virsh); the CompletedProcess."""
    if not os.access(PLUGIN_DIR / "kubectl-virsh", os.X_OK):
        pytest.fail(f"no kubectl-virsh in {PLUGIN_DIR}: install the project (pip install -e .)")
    kubectl = str(cluster.control_plane.bin_dir / "kubectl")

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{PLUGIN_DIR}:{os.environ.get('PATH', '')}",
               "KUBECONFIG": str(cluster.control_plane.kubeconfig)}
        return subprocess.run([kubectl, "virsh", *args], env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def snapshots(cluster):
    """VMSnapshots of this test: read them, and delete what is left at the end (before the VMs go)."""
    api = client.CustomObjectsApi(cluster.control_plane.api_client())

    class Snapshots:
        def get(self, name: str) -> dict | None:
            try:
                return api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmsnapshots", name)
            except client.exceptions.ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        def names_of(self, vm_name: str) -> list[str]:
            items = api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmsnapshots")["items"]
            return [s["metadata"]["name"] for s in items if s["spec"]["vmName"] == vm_name]

    made = Snapshots()
    made.vms_seen = []
    yield made
    for vm_name in made.vms_seen:
        for name in made.names_of(vm_name):
            try:
                api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "vmsnapshots", name)
            except client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise


# -- proofs ----------------------------------------------------------------------------------------

def block_device(dom: libvirt.virDomain, sectors: int) -> str:
    """The guest's disk of that size (guest names need not follow libvirt's targets)."""
    out = guest_run(dom, f"for d in /sys/block/vd*; do [ $(cat $d/size) = {sectors} ] && echo ${{d##*/}}; done; true")
    names = out.split()
    assert len(names) == 1, out
    return f"/dev/{names[0]}"


def write_disk(dom: libvirt.virDomain, sectors: int, text: str) -> None:
    payload = text.ljust(64, ".")
    guest_run(dom, f"printf '%s' '{payload}' | dd of={block_device(dom, sectors)} bs=512 count=1 conv=sync,fsync "
                   "2>/dev/null; sync")


def read_disk(dom: libvirt.virDomain, sectors: int) -> str:
    return guest_run(dom, f"echo 3 > /proc/sys/vm/drop_caches; dd if={block_device(dom, sectors)} bs=64 count=1 "
                          "2>/dev/null").rstrip(".\0")


def markers(dom: libvirt.virDomain) -> set[str]:
    return set(guest_run(dom, "cd /tmp && ls marker-* 2>/dev/null | sed s/^marker-//; true").split())


def uptime(dom: libvirt.virDomain) -> float:
    return float(guest_run(dom, "cat /proc/uptime").split()[0])


def wait_uptime_past(dom: libvirt.virDomain, value: float, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while (now := uptime(dom)) < value:
        assert time.monotonic() < deadline, f"guest uptime {now} never reached {value}"
        time.sleep(1)
    return now


def boot_id(dom: libvirt.virDomain) -> str:
    """Made by the kernel on its first read: read it before the snapshot to prove 'the same boot' after."""
    return guest_run(dom, "cat /proc/sys/kernel/random/boot_id").strip()


def qemu_img_chain(path: str) -> list[str]:
    """The chain as qemu-img prints it, active file first (-U: the VM has it open)."""
    done = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                          capture_output=True, text=True)
    assert done.returncode == 0, (path, done.stderr, sorted(os.listdir(os.path.dirname(path))))
    out = done.stdout
    paths, current = [], os.path.abspath(path)
    for entry in json.loads(out):
        paths.append(current)
        name = entry.get("full-backing-filename")
        if name:
            current = name if os.path.isabs(name) else os.path.join(os.path.dirname(current), name)
    return paths


def assert_chain_sound(disk_status: dict) -> list[str]:
    """The VM's recorded chain is qemu-img's, every backing file checks clean (the active one is in use)."""
    chain = qemu_img_chain(disk_status["path"])
    assert chain == [disk_status["path"], *disk_status.get("backingChain", [])], (chain, disk_status)
    for path in chain[1:]:
        done = subprocess.run(["qemu-img", "check", "-U", path], capture_output=True, text=True)
        assert done.returncode == 0, (path, done.stdout, done.stderr)
    return chain


def disk_status(vm: dict, name: str) -> dict:
    return next(d for d in vm["status"]["disks"] if d["name"] == name)


def guest_ready(vms, vm_name: str) -> libvirt.virDomain:
    vm = vms.wait(vm_name, lambda v: (v.get("status") or {}).get("phase") == "Running", "Running", BOOT)
    dom = vms.domain(vm)
    wait_guest(dom, "echo up", lambda out: out.strip() == "up", "the guest agent", BOOT)
    return dom


ROOT_SECTORS, DATA_SECTORS = 131072, 65536  # 64M and 32M


# -- create / list / revert / delete ----------------------------------------------------------------

def done(result: subprocess.CompletedProcess, *objects: dict | None) -> str:
    """ok(result), naming the objects' status when it failed."""
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
                                    + "\n".join(json.dumps((o or {}).get("status"), default=str) for o in objects))
    return result.stdout


@pytest.mark.timeout(2400)
def test_snapshot_with_memory_list_revert_twice_and_delete(virsh, vms, cluster, vm_name, snapshots):
    snapshots.vms_seen.append(vm_name)
    root, data = image(cluster, f"{vm_name}-root", "64M"), image(cluster, f"{vm_name}-data", "32M")
    running(vms, cluster, vm_name, disks=[{"name": "root", "path": str(root)}, {"name": "data", "path": str(data)}])
    vm = with_agent(vms, vm_name)
    dom = vms.domain(vm)
    booted = boot_id(dom)
    guest_run(dom, "echo x > /tmp/marker-before")
    write_disk(dom, DATA_SECTORS, "at-the-snapshot")
    up_before = uptime(dom)

    # The system disk is refused in a disk-only snapshot, by the plugin already (nothing created).
    refused(virsh("snapshot-create-as", vm_name, "d1", "--disk-only", "--diskspec", "root"), "SystemDiskSnapshot")
    assert snapshots.get("d1") is None

    result = virsh("snapshot-create-as", vm_name, "s1", "--wait", "--timeout", str(JOB), timeout=JOB + 60)
    out = done(result, snapshots.get("s1"), vms.get(vm_name))
    assert f"{vm_name}: snapshot s1 requested (external, memory) (vmsnapshot s1 created)" in out
    assert f"{vm_name}: snapshot s1 Ready:" in out
    snap = snapshots.get("s1")
    st = snap["status"]
    assert st["phase"] == "Ready" and st["vmUid"] == vm["metadata"]["uid"]
    mem = st["memoryFile"]
    assert mem == str(cluster.storage_dir / f"{vm_name}.s1.mem") and Path(mem).stat().st_size > 0
    # The VM runs on new leaves (generated next to each disk); the files it ran on are the snapshot.
    assert {d["name"]: d["snapshotFile"] for d in st["disks"]} == {"root": str(root), "data": str(data)}
    vm = vms.wait(vm_name, lambda v: disk_status(v, "data")["path"] != str(data), "the new leaf in status", 60)
    for name, base in (("root", root), ("data", data)):
        leaf = str(cluster.storage_dir / f"{vm_name}-{name}.s1.qcow2")
        assert disk_status(vm, name)["path"] == leaf
        assert assert_chain_sound(disk_status(vm, name)) == [leaf, str(base)]
    assert vms.domain(vm).UUIDString() == dom.UUIDString() and vms.domain(vm).isActive()

    rows = [line.split() for line in ok(virsh("snapshot-list", vm_name)).splitlines()]
    assert rows[0] == ["NAME", "PHASE", "METHOD", "MEMORY", "CREATED", "FILES"]
    assert rows[1][:4] == ["s1", "Ready", "External", "yes"] and f"memory={mem}" in rows[1], rows

    # After the snapshot: another marker and other bytes, then back to the snapshot.
    guest_run(dom, "echo x > /tmp/marker-after")
    write_disk(dom, DATA_SECTORS, "after-the-snapshot")
    assert markers(dom) == {"before", "after"}
    for round_ in (1, 2):  # a second revert to the same snapshot works as the first
        # The guest's clock runs well past the snapshot point first, so that "continues from the snapshot's
        # uptime" is told apart from "kept running" (an ordering of values, not a duration).
        up_at_revert = wait_uptime_past(dom, up_before + GAP)
        result = virsh("snapshot-revert", vm_name, "s1", "--wait", "--timeout", str(JOB), timeout=JOB + 60)
        out = done(result, vms.get(vm_name), snapshots.get("s1"))
        assert "revert to snapshot s1 requested" in out and "Succeeded" in out, out
        vm = vms.get(vm_name)
        rid = vm["spec"]["revert"]["id"]
        assert vm["status"]["lastRevert"]["id"] == rid and vm["status"]["lastRevert"]["result"] == "Succeeded"
        # status.disks follows lastRevert (the reconciler reports the new chain after the job): wait for it
        suffix = f".s1.r-{rid}.qcow2"
        vm = vms.wait(vm_name, lambda v, suffix=suffix: all(disk_status(v, n)["path"].endswith(suffix)
                                                            for n in ("root", "data")),
                      "status.disks on the revert's leaves", 60)
        dom = guest_ready(vms, vm_name)
        up_after = uptime(dom)
        assert up_before <= up_after < up_at_revert, (round_, up_before, up_after, up_at_revert)
        assert markers(dom) == {"before"}, round_  # RAM: the marker written after the snapshot is gone
        assert read_disk(dom, DATA_SECTORS) == "at-the-snapshot"
        assert boot_id(dom) == booted  # the same boot, continued
        for name, base in (("root", root), ("data", data)):
            chain = assert_chain_sound(disk_status(vm, name))
            assert chain[-1] == str(base) and len(chain) == 2 and chain[0].endswith(f".s1.r-{rid}.qcow2"), chain
        write_disk(dom, DATA_SECTORS, "after-the-revert")
        guest_run(dom, "echo x > /tmp/marker-after")

    # Delete (S8): the snapshot goes and its memory file with it. Its files are in the VM's running chain, so
    # the leaf above each is merged into it (active commit + pivot): the VM runs on its first files again,
    # now holding the newest data, and the leaves are gone. The same QEMU throughout.
    leaves = [disk_status(vms.get(vm_name), name)["path"] for name in ("root", "data")]
    result = virsh("snapshot-delete", vm_name, "s1", "--wait", "--timeout", str(JOB), timeout=JOB + 60)
    out = done(result, snapshots.get("s1"), vms.get(vm_name))
    assert f"{vm_name}: snapshot s1 deleted" in out
    assert snapshots.get("s1") is None and not Path(mem).exists()
    vm = vms.wait(vm_name, lambda v: [disk_status(v, n)["path"] for n in ("root", "data")] == [str(root), str(data)],
                  "the VM back on its merged first files", 60)
    for name, base in (("root", root), ("data", data)):
        assert assert_chain_sound(disk_status(vm, name)) == [str(base)]
    assert not any(Path(p).exists() for p in leaves), leaves
    assert vms.domain(vm).UUIDString() == dom.UUIDString() and vms.domain(vm).isActive()
    assert read_disk(dom, DATA_SECTORS) == "after-the-revert" and markers(dom) == {"before", "after"}


# -- save / restore -------------------------------------------------------------------------------

@pytest.mark.timeout(1800)
def test_save_then_restore_a_vm_with_a_raw_disk(virsh, vms, cluster, vm_name, snapshots):
    snapshots.vms_seen.append(vm_name)
    raw = cluster.storage_dir / f"{vm_name}-raw.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "32M"], check=True)
    running(vms, cluster, vm_name, disks=[{"name": "data", "path": str(raw), "format": "raw"}])
    vm = with_agent(vms, vm_name)
    dom = vms.domain(vm)
    booted = boot_id(dom)
    guest_run(dom, "echo x > /tmp/marker-before")
    write_disk(dom, DATA_SECTORS, "at-the-save")
    up_before = uptime(dom)
    mem = cluster.storage_dir / f"{vm_name}.save"

    result = virsh("save", vm_name, str(mem), "--name", "sv1", "--wait", "--timeout", str(JOB), timeout=JOB + 60)
    out = done(result, snapshots.get("sv1"), vms.get(vm_name))
    assert f"{vm_name}: save to {mem} requested (snapshot sv1, copy with memory, VM left stopped)" in out, out
    st = snapshots.get("sv1")["status"]
    assert st["phase"] == "Ready" and st["memoryFile"] == str(mem) and mem.stat().st_size > 0
    (copy,) = st["disks"]
    assert copy["name"] == "data" and copy["snapshotFile"] != str(raw) and Path(copy["snapshotFile"]).exists()
    # stopAfter: the VM is left saved (shut off), on its original raw file
    state, reason = vms.domain(vms.get(vm_name)).state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED), (state, reason)

    result = virsh("restore", str(mem), "--wait", "--timeout", str(JOB), timeout=JOB + 60)
    out = done(result, vms.get(vm_name), snapshots.get("sv1"))
    assert f"{vm_name}: revert to snapshot sv1 requested" in out and "Succeeded" in out, out
    dom = guest_ready(vms, vm_name)
    assert markers(dom) == {"before"} and read_disk(dom, DATA_SECTORS) == "at-the-save"
    assert boot_id(dom) == booted and uptime(dom) >= up_before


# -- without a node agent: refusals, the help, the examples ---------------------------------------

def test_refusals_the_help_and_the_examples(virsh, vms, cluster, vm_name):
    listed = {line.split()[0] for line in ok(virsh("--help")).splitlines() if line.startswith("    ") and line.split()}
    assert set(SNAPSHOT_VERBS) <= listed, set(SNAPSHOT_VERBS) - listed

    refused(virsh("snapshot-create-as", "no-such-vm", "s1"), 'virtualmachine "no-such-vm" not found')
    refused(virsh("snapshot-revert", "no-such-vm", "s1"), 'virtualmachine "no-such-vm" not found')
    refused(virsh("snapshot-list", "no-such-vm"), "nor any snapshot of it")
    refused(virsh("restore", str(cluster.storage_dir / "none.save")), "no VMSnapshot in this namespace holds")
    refused(virsh("snapshot-delete", "no-such-vm", "no-such-snapshot"), 'vmsnapshot "no-such-snapshot" not found')

    # Each example, as hack/up.sh would apply it, is accepted by the API server's schema and CEL rules.
    kubectl = [str(cluster.control_plane.bin_dir / "kubectl"), "--kubeconfig", str(cluster.control_plane.kubeconfig)]
    for name in EXAMPLES:
        text = (REPO / "examples" / name).read_text().replace("@STORAGE@", str(cluster.storage_dir))
        done = subprocess.run([*kubectl, "apply", "--dry-run=server", "-f", "-"], input=text, text=True,
                              capture_output=True)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        assert "(server dry run)" in done.stdout, done.stdout
