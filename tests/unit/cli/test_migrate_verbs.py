"""Migration verbs of kubectl-virsh: the command line to the VMMigration it makes, the refusals, the outcome
--wait follows, which migration migrate-cancel deletes, and domjobinfo's layout. Pure: a VM dict in, the
objects out; every VMMigration made is checked against the API's own model (VMMigrationSpec), and the
examples/ manifests of migrations too."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from virsh_cases import make_vm

from libvirt_operator.api.vmmigration import VMMigrationSpec
from libvirt_operator.cli import virsh
from libvirt_operator.cli.plan import CreateObject, Refused
from libvirt_operator.cli.verbs import migrate as m

IMG = "/var/lib/libvirt/images"
REPO = Path(__file__).resolve().parents[3]


def vm2(node: str | None = "node-a", memory: str = "1Gi", **spec) -> dict:
    """root and data disks, a cdrom; placed on `node`."""
    disks = [{"name": "root", "device": "disk", "path": f"{IMG}/web.qcow2", "readOnly": False},
             {"name": "data", "device": "disk", "path": f"{IMG}/web-data.qcow2", "readOnly": False},
             {"name": "iso", "device": "cdrom", "path": f"{IMG}/a.iso", "readOnly": False}]
    vm = make_vm(disks=disks, memory={"size": memory, "maxSize": "4Gi"}, **spec)
    if node:
        vm["metadata"]["labels"] = {"virt.libvirt-operator.io/node": node}
        vm["status"] = {"phase": "Running", "nodeName": node}
    return vm


def made(argv: str, vm: dict | None = None):
    """The one VMMigration the verb creates (validated by the API model), and the plan."""
    args = virsh.parser().parse_args(argv.split())
    fn = {"migrate": m.migrate_plan, "blockcopy": m.blockcopy_plan}[args.verb]
    p = fn(vm or vm2(), args)
    (action,) = p.actions
    assert isinstance(action, CreateObject) and action.plural == "vmmigrations"
    body = action.body
    assert body["kind"] == "VMMigration" and body["apiVersion"] == "virt.libvirt-operator.io/v1alpha1"
    assert body["metadata"]["namespace"] == "default"
    VMMigrationSpec.model_validate(body["spec"])  # the API's model (extra fields forbidden)
    return body, p


def refusal(argv: str, vm: dict | None = None) -> str:
    with pytest.raises(Refused) as err:
        made(argv, vm)
    return str(err.value)


# -- migrate --------------------------------------------------------------------------------------

def test_migrate_is_live_by_default_and_the_controller_picks_the_node():
    body, p = made("migrate web")
    assert body["spec"] == {"vmName": "web", "type": "Live"}
    assert body["metadata"]["name"].startswith("web-migrate-")
    assert p.summary == f"web: migration {body['metadata']['name']} requested (live, to a node the controller picks)"
    assert p.note == ""
    body, _ = made("migrate web node-b --live --name m1")
    assert body["spec"] == {"vmName": "web", "type": "Live", "targetNode": "node-b"}
    assert body["metadata"]["name"] == "m1"


def test_the_handbooks_uris_name_the_target_node():
    body, p = made("migrate web qemu+tcp://node-b/system tcp://node-b --live")
    assert body["spec"] == {"vmName": "web", "type": "Live", "targetNode": "node-b"}
    assert "migrating to node node-b" in p.note and "LVO_MIGRATION_URI" in p.note
    assert "tcp://node-b: not used" in p.note and "LVO_MIGRATION_ADDRESS" in p.note
    assert "no host in the URI" in refusal("migrate web qemu:///system")


def test_whole_machine_with_destblock_in_both_spellings():
    body, p = made(f"migrate web node-b --live --copy-storage-inc --destblock vda:{IMG}/b/root.qcow2,"
                   f"data:{IMG}/b/data.qcow2")
    assert body["spec"] == {"vmName": "web", "type": "WholeMachine", "targetNode": "node-b",
                            "disks": [{"name": "root", "destinationPath": f"{IMG}/b/root.qcow2"},
                                      {"name": "data", "destinationPath": f"{IMG}/b/data.qcow2"}]}
    assert "whole machine, disks copied, to node node-b" in p.summary
    # Repeated DISK=PATH, by name, target or path, in the VM's disk order whatever the command's.
    body, _ = made(f"migrate web --copy-storage-inc --destblock data={IMG}/b//data.qcow2 "
                   f"--destblock {IMG}/web.qcow2={IMG}/b/root.qcow2")
    assert body["spec"]["disks"] == [{"name": "root", "destinationPath": f"{IMG}/b/root.qcow2"},
                                     {"name": "data", "destinationPath": f"{IMG}/b/data.qcow2"}]
    body, _ = made("migrate web node-b --copy-storage-inc")  # every local disk, default paths on the target
    assert body["spec"] == {"vmName": "web", "type": "WholeMachine", "targetNode": "node-b"}


def test_destblock_refusals():
    assert "goes with --copy-storage-inc" in refusal(f"migrate web node-b --destblock vda={IMG}/x.qcow2")
    assert "given twice" in refusal(f"migrate web --copy-storage-inc --destblock vda={IMG}/x --destblock "
                                    f"root={IMG}/y")
    assert "absolute host path" in refusal("migrate web --copy-storage-inc --destblock vda=x.qcow2")
    assert "expected DISK=PATH" in refusal("migrate web --copy-storage-inc --destblock vda")
    assert "has no disk 'vdz'" in refusal(f"migrate web --copy-storage-inc --destblock vdz={IMG}/x")


def test_bandwidth_postcopy_and_auto_converge():
    body, _ = made("migrate web node-b --bandwidth 64 --postcopy --no-auto-converge")
    assert body["spec"] == {"vmName": "web", "type": "Live", "targetNode": "node-b", "bandwidthMibPerSecond": 64,
                            "allowPostCopy": True, "autoConverge": False}
    assert "at least 1" in refusal("migrate web --bandwidth 0")


@pytest.mark.parametrize(("memory", "timeout", "per_gib"), [
    ("1Gi", "100", 100), ("256Mi", "60", 240), ("3Gi", "100", 34), ("4Gi", "1", 1), ("1536Mi", "90", 60)])
def test_timeout_is_set_per_gib_of_the_vms_memory(memory, timeout, per_gib):
    body, p = made(f"migrate web node-b --timeout {timeout}", vm2(memory=memory))
    assert body["spec"]["completionTimeoutPerGiB"] == per_gib
    assert f"--timeout {timeout}: completionTimeoutPerGiB {per_gib}" in p.note
    assert f"of {memory} of memory" in p.note and "aborted, and the VM stays where it is" in p.note


def test_timeout_notes_say_what_happens_at_the_timeout():
    _, p = made("migrate web node-b --timeout 120 --copy-storage-inc --postcopy")
    assert "plus as much per GiB of the disks copied" in p.note and "switches to post-copy" in p.note
    assert "positive number" in refusal("migrate web --timeout 0")
    assert "over the API's 86400" in refusal("migrate web --timeout 80000", vm2(memory="128Mi"))


def test_migrate_refusals():
    assert "already on node node-a" in refusal("migrate web node-a")
    assert "(SameNode)" in refusal("migrate web qemu+tcp://node-a/system")
    stopped = vm2(powerState="Stopped")
    assert "is not running" in refusal("migrate web node-b", stopped) and "VMNotRunning" in refusal(
        "migrate web node-b", stopped)
    assert "not a DNS label" in refusal("migrate web node-b --name Bad_Name")


# -- blockcopy ------------------------------------------------------------------------------------

def test_blockcopy_makes_a_storage_migration_of_one_disk():
    body, p = made(f"blockcopy web vda {IMG}/new//web.qcow2 --shallow --wait --pivot --verbose --bandwidth 10")
    assert body["spec"] == {"vmName": "web", "type": "Storage", "bandwidthMibPerSecond": 10,
                            "disks": [{"name": "root", "destinationPath": f"{IMG}/new/web.qcow2"}]}
    assert body["metadata"]["name"].startswith("web-blockcopy-")
    assert f"block copy {body['metadata']['name']} of disk root to {IMG}/new/web.qcow2 requested" in p.summary
    assert p.note == ""
    body, p = made(f"blockcopy web {IMG}/web-data.qcow2 {IMG}/b/data.qcow2 --reuse-external --name bc1")
    assert body["spec"]["disks"] == [{"name": "data", "destinationPath": f"{IMG}/b/data.qcow2"}]
    assert body["metadata"]["name"] == "bc1" and "must not exist yet (FileExists)" in p.note


def test_blockcopy_refusals():
    assert "already on" in refusal(f"blockcopy web root {IMG}/web.qcow2")
    assert "only disks are copied" in refusal(f"blockcopy web iso {IMG}/b.iso")
    assert "absolute host path" in refusal("blockcopy web root web2.qcow2")
    assert "is not running" in refusal(f"blockcopy web root {IMG}/b.qcow2", vm2(powerState="Stopped"))


def test_the_verbs_are_in_the_help():
    help_text = virsh.parser().format_help()
    for name in ("migrate", "migrate-cancel", "blockcopy", "domjobinfo"):
        assert name in help_text


# -- the outcome --wait follows ------------------------------------------------------------------

def migration(name="m1", type_="Live", **status) -> dict:
    out = {"metadata": {"name": name, "creationTimestamp": status.pop("created", "2026-01-01T00:00:00Z")},
           "spec": {"vmName": status.pop("vm", "web"), "type": type_}}
    if status:
        out["status"] = status
    return out


def ready_false(reason: str, message: str) -> list[dict]:
    return [{"type": "Ready", "status": "False", "reason": reason, "message": message}]


def test_wait_says_the_steps_and_verbose_the_percent():
    said = []
    check = m.migration_done("Migration", said.append)(migration())
    assert check(migration(phase="Pending")) is None
    assert check(migration(phase="Running", step="Migrate", progress={"percent": 5})) is None
    assert check(migration(phase="Running", step="Migrate", progress={"percent": 5})) is None
    assert check(migration(phase="Running", step="Migrate", progress={"percent": 42})) is None
    done = check(migration(phase="Succeeded", targetNode="node-b", durationMilliseconds=1234,
                           progress={"percent": 100, "downtimeMilliseconds": 40}))
    assert done.ok and done.message == "migration m1 Succeeded: running on node-b (downtime 40 ms, took 1234 ms)"
    assert said == ["  m1: step Migrate", "Migration: [  5 %]", "Migration: [ 42 %]", "Migration: [100 %]"]


def test_wait_without_verbose_and_the_failures():
    said = []
    check = m.migration_done(None, said.append)(migration())
    assert check(migration(phase="Running", progress={"percent": 5})) is None and said == []
    failed = check(migration(phase="Failed", conditions=ready_false("StorageRootMismatch", "no root /a on node-b")))
    assert not failed.ok and failed.message == "migration m1 Failed: StorageRootMismatch: no root /a on node-b"
    aborted = check(migration(phase="Aborted", conditions=ready_false("MigrationAborted", "")))
    assert not aborted.ok and aborted.message == "migration m1 Aborted: MigrationAborted"


def test_a_block_copy_says_where_the_disk_went():
    check = m.migration_done("Block Copy", lambda _line: None)(migration(type_="Storage"))
    done = check(migration(type_="Storage", phase="Succeeded",
                           disks=[{"name": "root", "sourceFile": "/a", "destinationFile": "/b/root.qcow2"}]))
    assert done.ok and done.message == "migration m1 Succeeded: disk root on /b/root.qcow2"


# -- migrate-cancel and which migration is the VM's ------------------------------------------------

def test_cancel_deletes_the_active_migration_only():
    items = [migration("old", phase="Succeeded", created="2026-01-01T00:00:00Z"),
             migration("now", phase="Running", created="2026-01-02T00:00:00Z"),
             migration("other-vm", phase="Running", vm="db")]
    found, note = m.cancel_targets(items, "web")
    assert [x["metadata"]["name"] for x in found] == ["now"] and note == ""
    found, _ = m.cancel_targets([migration("fresh")], "web")  # no status yet: Pending, cancellable
    assert [x["metadata"]["name"] for x in found] == ["fresh"]
    with pytest.raises(Refused, match=r"web has no migration in progress \(the last, old, is Succeeded\)"):
        m.cancel_targets(items[:1], "web")
    with pytest.raises(Refused, match=r"has no migration in progress$"):
        m.cancel_targets([], "web")
    _, note = m.cancel_targets([migration("pc", phase="Running", progress={"postcopy": True})], "web")
    assert note == "pc: in post-copy, which cannot be aborted: it completes"


def test_current_is_the_active_one_else_the_last():
    a = migration("a", phase="Failed", startTime="2026-01-01T00:00:00Z")
    b = migration("b", phase="Succeeded", startTime="2026-01-03T00:00:00Z")
    c = migration("c", phase="Running", startTime="2026-01-02T00:00:00Z")
    assert m.current([b, c, a], "web")["metadata"]["name"] == "c"
    assert m.current([b, a], "web")["metadata"]["name"] == "b"
    assert m.current([b, a], "db") is None


# -- domjobinfo -----------------------------------------------------------------------------------

def test_domjobinfo_in_virshs_layout():
    running = migration("m1", phase="Running", step="Migrate", sourceNode="node-a", targetNode="node-b",
                        startTime="2026-01-01T00:00:00Z",
                        progress={"percent": 42, "dataTotalBytes": 1 << 30, "dataProcessedBytes": 440 << 20,
                                  "dataRemainingBytes": 584 << 20, "memoryBytesPerSecond": 100 << 20,
                                  "memoryDirtyRateBytesPerSecond": 3 << 20, "iteration": 3,
                                  "autoConvergeThrottle": 20, "elapsedMilliseconds": 4520,
                                  "updateTime": "2026-01-01T00:00:04Z"})
    assert m.jobinfo(running).splitlines() == [
        "Job type:         Unbounded",
        "Operation:        Outgoing migration",
        "Time elapsed:     4520         ms",
        "Data processed:   440.000 MiB",
        "Data remaining:   584.000 MiB",
        "Data total:       1.000 GiB",
        "Memory bandwidth: 100.000 MiB/s",
        "Dirty rate:       3.000 MiB/s",
        "Iteration:        3",
        "Auto converge throttle: 20 %",
        "Migration:        m1 (Live, node-a -> node-b)",
        "Phase:            Running, step Migrate",
        "Progress:         42 %",
        "Updated:          2026-01-01T00:00:04Z",
    ]


def test_domjobinfo_of_finished_pending_and_no_migration():
    done = migration("m2", type_="Storage", phase="Succeeded", sourceNode="node-a", targetNode="node-a",
                     durationMilliseconds=900, progress={"percent": 100, "dataTotalBytes": 512,
                                                          "downtimeMilliseconds": 0, "postcopy": False})
    assert m.jobinfo(done).splitlines() == [
        "Job type:         Completed", "Operation:        Block copy", "Time elapsed:     900          ms",
        "Data total:       512.000 B", "Total downtime:   0            ms",
        "Migration:        m2 (Storage, node-a -> node-a)", "Phase:            Succeeded", "Progress:         100 %"]
    queued = migration("m3", phase="Pending", conditions=ready_false("Queued", "2 migrations run on node-a"))
    assert m.jobinfo(queued).splitlines() == [
        "Job type:         None", "Operation:        Outgoing migration", "Migration:        m3 (Live)",
        "Phase:            Pending (Queued: 2 migrations run on node-a)"]
    aborted = migration("m4", phase="Aborted", conditions=ready_false("MigrationAborted", "deleted"))
    assert m.jobinfo(aborted).splitlines()[0] == "Job type:         Cancelled"
    assert "Phase:            Aborted (MigrationAborted: deleted)" in m.jobinfo(aborted)
    # Running without figures yet: the time elapsed since the start.
    started = migration("m5", phase="Running", startTime="2026-01-01T00:00:00Z")
    assert "Time elapsed:     2500         ms" in m.jobinfo(started, now=datetime(2026, 1, 1, 0, 0, 2, 500000,
                                                                                  tzinfo=UTC))
    assert m.jobinfo(None) == "Job type:         None"


# -- the examples ---------------------------------------------------------------------------------

EXAMPLES = ["vmmigration-live.yaml", "vmmigration-storage.yaml", "vmmigration-whole-machine.yaml"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_migration_examples_fit_the_api(name):
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / name).read_text().replace("@STORAGE@", "/srv"))
            if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "virt.libvirt-operator.io/v1alpha1" and doc["kind"] == "VMMigration"
        VMMigrationSpec.model_validate(doc["spec"])
