"""Issue 8 item 7, disk truth: after a snapshot a disk runs on a new leaf, not on spec.disks[].path.
The agent renders from the recorded chain (domain metadata, mirrored in status.disks), so an unrelated
spec edit, and a cold restart, keep the VM on its leaf; diskDeletionPolicy Delete removes the leaf but
keeps a backing file another VM holds.

The snapshot is taken the way a snapshot job takes it: an external disk-only snapshot through libvirt
(NO_METADATA), then agent.disks.record() writes the new chain, here through a Host on the node's
libvirt URI (in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import libvirt

from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.snapshot import external_snapshot
from libvirt_operator.storage.chain import Chain
from tests.e2e.test_live_devices import applied, boot, image, patch
from tests.e2e.vmtools import condition, guest_run, manifest, qemu_pid

BEFORE, AFTER = "LVO-BEFORE-SNAPSHOT", "LVO-AFTER-SNAPSHOT"


def read_at(dom, block: int, n: int) -> str:
    return guest_run(dom, f"dd if=/dev/vda bs=4096 skip={block} count=1 2>/dev/null | head -c {n}")


def write_at(dom, block: int, text: str) -> None:
    guest_run(dom, f"printf '%s' '{text}' | dd of=/dev/vda bs=4096 seek={block} conv=notrunc,fsync 2>/dev/null;"
                   " sync; echo 3 > /proc/sys/vm/drop_caches")


RECORD = """
import asyncio, json, sys
from libvirt_operator.agent import disks
from libvirt_operator.hypervisor.host import Host
from libvirt_operator.storage.chain import Chain

async def go(uri, uid, chains):
    host = Host(uri)
    await host.connect()
    try:
        await disks.record(host, await host.lookup(uid), {k: Chain.from_list(v) for k, v in chains.items()})
    finally:
        await host.close()

asyncio.run(go(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


def record(uri: str, uid: str, chains: dict[str, Chain]) -> None:
    """agent.disks.record through a Host on the node's libvirt, in a process of its own (a Host registers
    libvirt's asyncio event loop for its whole process, which this test process must not keep)."""
    subprocess.run([sys.executable, "-c", RECORD, uri, uid, json.dumps({k: c.to_list() for k, c in chains.items()})],
                   check=True, timeout=60)


def backing_chain(path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return [entry["filename"] for entry in json.loads(out)]


def data_disk(vm: dict) -> dict:
    return next(d for d in vm["status"]["disks"] if d["name"] == "data")


def test_a_vm_stays_on_its_recorded_leaf_and_delete_keeps_what_others_hold(vms, cluster, vm_name):
    base = image(cluster, f"{vm_name}.qcow2", size="64M")
    leaf = base.with_name(f"{vm_name}.s1.qcow2")
    leaf.unlink(missing_ok=True)
    vm, dom, pid = boot(vms, cluster, vm_name, diskDeletionPolicy="Delete",
                        disks=[{"name": "data", "path": str(base)}])
    uid, node = vm["metadata"]["uid"], cluster.node(vm["status"]["nodeName"])
    write_at(dom, 0, BEFORE)

    # the snapshot, behind the operator's back the way a snapshot job does it, then the record
    snap = external_snapshot({"vda": str(leaf)})
    dom.snapshotCreateXML(snap.to_xml(), libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                          | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    chain = Chain.of((str(leaf), "qcow2"), (str(base), "qcow2"))
    record(node.uri, uid, {"data": chain})
    write_at(dom, 1, AFTER)  # lands in the leaf only
    assert backing_chain(leaf) == [str(leaf), str(base)]

    # an unrelated spec edit (a NIC, applied live) must not put the disk back on the spec's file
    gen = patch(vms, vm_name, {"interfaces": [{"name": "nic0", "type": "user", "mac": "52:54:00:aa:bb:71"}]})
    vm = applied(vms, vm_name, gen)
    assert (data_disk(vm)["path"], data_disk(vm)["backingChain"]) == (str(leaf), [str(base)])
    assert qemu_pid(uid) == pid and condition(vm, "RestartRequired") == {}
    live = DomainConfig.from_xml(dom.XMLDesc(0))
    persistent = DomainConfig.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for d in (live, persistent):
        disk = d.devices.by_alias("ua-disk-data")
        assert (disk.source_file, disk.driver_type) == (str(leaf), "qcow2")
        assert d.operator_metadata.disks == {"data": chain}
    assert persistent.operator_metadata.generation == gen  # redefined from the spec edit, on the leaf
    assert not any("disks[data]" in (e.message or "") for e in vms.events(vm_name)
                   if e.reason in ("LiveUpdated", "DriftCorrected"))
    assert read_at(dom, 0, len(BEFORE)) == BEFORE and read_at(dom, 1, len(AFTER)) == AFTER

    # a cold restart boots from the definition: still the leaf, the data written after the snapshot there
    gen = patch(vms, vm_name, {"restart": {"id": "r1"}})
    vms.wait(vm_name, lambda v: (v["status"].get("lastRestart") or {}).get("result") == "Succeeded",
             "restart r1 done", 180)
    vm = applied(vms, vm_name, gen, timeout=180)
    vms.wait(vm_name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 120)
    assert qemu_pid(uid) != pid
    assert data_disk(vm)["path"] == str(leaf) and data_disk(vm)["backingChain"] == [str(base)]
    assert read_at(dom, 0, len(BEFORE)) == BEFORE and read_at(dom, 1, len(AFTER)) == AFTER
    subprocess.run(["qemu-img", "check", "-U", str(leaf)], check=True, capture_output=True)

    # another VM on the node holds the base (read-only): Delete removes the leaf, keeps the base
    holder = f"{vm_name}-holder"
    vms.create(manifest(cluster, holder, powerState="Stopped", nodeName=node.name,
                        disks=[{"name": "base", "path": str(base), "readOnly": True}]))
    vms.wait(holder, lambda v: any(d.get("path") == str(base) for d in (v.get("status") or {}).get("disks") or []),
             "the holder's status.disks", 90)
    vms.delete(vm_name)
    vms.wait_gone(vm_name, 120)
    assert not leaf.exists() and base.exists()
    wanted = {("DiskDeleted", f"deleted {leaf} (diskDeletionPolicy: Delete)"),
              ("DiskKept", f"kept {base}: still referenced by vm/default/{holder}")}
    deadline = time.monotonic() + 60  # Events are posted in the background
    while not wanted <= (events := {(e.reason, e.message) for e in vms.events(vm_name)}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= events, events
    vms.delete(holder)
    vms.wait_gone(holder, 120)
    assert base.exists()  # Retain
    base.unlink()
