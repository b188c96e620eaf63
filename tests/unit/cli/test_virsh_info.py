"""The verb table itself, and the read-only verbs domblklist and domiflist."""

from __future__ import annotations

import argparse

import pytest
from virsh_cases import make_vm, plan

from libvirt_operator.cli import virsh
from libvirt_operator.cli.plan import VERBS, Refused, arg, verb
from libvirt_operator.cli.verbs.info import NOT_REPORTED, vm_table

IMG = "/var/lib/libvirt/images"
EXPECTED = {"list", "domblklist", "domiflist", "start", "shutdown", "destroy", "suspend", "resume", "reboot", "reset",
            "restart", "setvcpus", "setmem", "vcpupin", "emulatorpin", "attach-disk", "detach-disk", "change-media",
            "blockresize", "attach-interface", "detach-interface", "domiftune", "schedinfo", "memtune", "blkdeviotune",
            "snapshot-create-as", "snapshot-list", "snapshot-revert", "snapshot-delete", "save", "restore",
            "migrate", "migrate-cancel", "blockcopy", "domjobinfo"}


def test_the_table_has_every_verb_in_its_module_and_the_parser_has_the_table():
    assert set(VERBS) == EXPECTED
    assert {v.group for v in VERBS.values()} == {"info", "power", "resources", "devices", "qos", "snapshots",
                                                 "migrate"}
    sub = next(a for a in virsh.parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_verb_argument_shadows_another(name):
    """Each dest once per verb (a `--name` of a device must not overwrite the VM's NAME)."""
    sub = next(a for a in virsh.parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = [a.dest for a in sub.choices[name]._actions if a.dest != "help"]
    assert len(dests) == len(set(dests)), dests


def test_a_verb_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        verb("start", "again", arg("--x"))(lambda vm, args: None)


def test_list_table():
    vms = [make_vm("b", status={"phase": "Running", "nodeName": "node-a", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Running", "message": ""}]}), make_vm("a")]
    lines = [line.split() for line in vm_table(vms, all_namespaces=False, wide=False).splitlines()]
    assert lines == [["NAME", "NODE", "PHASE", "DESIRED", "READY", "REASON"],
                     ["a", "-", "-", "Running", "Unknown", "-"],
                     ["b", "node-a", "Running", "Running", "True", "Running"]]


REPORTED_DISKS = [
    {"name": "root", "target": "vda", "bus": "virtio", "device": "disk", "path": f"{IMG}/web-leaf.qcow2",
     "format": "qcow2", "backingChain": [f"{IMG}/web.qcow2", f"{IMG}/base.qcow2"], "capacityBytes": 2**31},
    {"name": "iso", "target": "sda", "bus": "sata", "device": "cdrom", "format": "raw"},
]


def test_domblklist_from_status():
    vm = make_vm(status={"disks": REPORTED_DISKS})
    p = plan("domblklist web", vm)
    assert p.actions == [] and p.check is None
    assert [line.split() for line in p.output.splitlines()] == [
        ["TARGET", "SOURCE"], ["vda", f"{IMG}/web-leaf.qcow2"], ["sda", "-"]]
    details = [line.split() for line in plan("domblklist web --details", vm).output.splitlines()]
    assert details[0] == ["NAME", "DEVICE", "BUS", "TARGET", "FORMAT", "CAPACITY", "SOURCE", "BACKING"]
    assert details[1] == ["root", "disk", "virtio", "vda", "qcow2", "2Gi", f"{IMG}/web-leaf.qcow2",
                          f"{IMG}/web.qcow2", "<-", f"{IMG}/base.qcow2"]


def test_domblklist_from_the_spec_until_reported():
    vm = make_vm()
    vm["spec"]["disks"].append({"name": "data", "device": "disk", "path": f"{IMG}/d.qcow2", "bus": "scsi"})
    lines = plan("domblklist web", vm).output.splitlines()
    # targets as the agent assigns them: by bus order, marked as not reported
    assert [line.split() for line in lines[:-1]] == [
        ["TARGET", "SOURCE"], ["vda*", f"{IMG}/web.qcow2"], ["sda*", f"{IMG}/a.iso"], ["sdb*", f"{IMG}/d.qcow2"]]
    assert lines[-1] == NOT_REPORTED
    # one disk reported, one just attached
    vm["status"] = {"disks": [{**REPORTED_DISKS[0], "path": f"{IMG}/web.qcow2"}]}
    rows = [line.split()[0] for line in plan("domblklist web", vm).output.splitlines()[1:-1]]
    assert rows == ["vda", "sda*", "sdb*"]


def test_domiflist_from_status_and_spec():
    vm = make_vm(status={"interfaces": [{"name": "nic0", "type": "network", "source": "default", "model": "virtio",
                                         "mac": "52:54:00:00:00:01", "hostDevice": "vnet3"}]})
    vm["spec"]["interfaces"].append({"name": "nic1", "type": "user", "model": "e1000"})
    lines = plan("domiflist web", vm).output.splitlines()
    assert [line.split() for line in lines[:-1]] == [
        ["INTERFACE", "NAME", "TYPE", "SOURCE", "MODEL", "MAC"],
        ["vnet3", "nic0", "network", "default", "virtio", "52:54:00:00:00:01"],
        ["-", "nic1*", "user", "-", "e1000", "-"]]
    assert lines[-1] == NOT_REPORTED
    assert NOT_REPORTED not in plan("domiflist web", make_vm(interfaces=[])).output


def test_a_vm_verb_needs_a_vm():
    with pytest.raises(Refused):
        plan("detach-disk web nope", make_vm())


def test_a_verb_may_create_an_object_and_wait_on_it():
    """The table expresses 'create object X' as well as 'patch VM' (snapshot-create-as, migrate later)."""
    from libvirt_operator.cli.plan import CreateObject, Result

    @verb("test-snapshot", "create a VMSnapshot of the VM", arg("snapshot", metavar="SNAPSHOT"))
    def _snapshot(vm: dict, args: argparse.Namespace):
        body = {"kind": "VMSnapshot", "metadata": {"name": args.snapshot},
                "spec": {"vmName": vm["metadata"]["name"]}}
        return virsh.Plan(f"snapshot {args.snapshot} requested", actions=[CreateObject("vmsnapshots", body)],
                          check=lambda created: lambda now: Result(True, "Ready") if (now.get("status") or {})
                          .get("phase") == "Ready" else None)

    try:
        virsh._parser.cache_clear()
        p = plan("test-snapshot web s1", make_vm())
        (action,) = p.actions
        assert action.plural == "vmsnapshots" and action.name == "s1" and action.body["spec"] == {"vmName": "web"}
        created = {"metadata": {"name": "s1", "generation": 1}, "status": {}}
        assert virsh.follow(("vmsnapshots", created), make_vm()) == ("vmsnapshots", created)
        assert virsh.done("vmsnapshots", created, acted=True) == " (vmsnapshot s1 created)"
        assert p.check(created)({"status": {"phase": "Ready"}}).ok
    finally:
        del VERBS["test-snapshot"]
        virsh._parser.cache_clear()


def test_what_the_wait_follows_without_actions():
    vm = make_vm()
    assert virsh.follow(None, vm) == ("virtualmachines", vm)
    assert virsh.done("virtualmachines", vm, acted=False) == ""
    assert virsh.done("virtualmachines", vm, acted=True) == " (generation 3)"
