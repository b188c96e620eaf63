"""agent/disks: which chains a VM's disks run on (record_from) and who needs which file (node_references)."""

from libvirt_operator.agent.disks import moved_disks, node_references, origins_from, record_from
from libvirt_operator.agent.store import VMStore
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import DomainConfig, render_domain
from libvirt_operator.storage.chain import Chain

UID = "5d7c0e1a-1111-4222-8333-944455556666"
SPEC = {"memory": {"size": "256Mi"},
        "disks": [{"name": "root", "path": "/img/root.qcow2"},
                  {"name": "data", "path": "/img/data.qcow2"},
                  {"name": "iso", "device": "cdrom", "path": "/iso/seed.iso"}]}
LEAF = Chain.of(("/img/root.s1.qcow2", "qcow2"), ("/img/root.qcow2", "qcow2"))


def vm(name="web", uid=UID, spec=SPEC, status=None, ns="default"):
    return {"metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": "1"},
            "spec": spec, "status": status or {}}


def stored(chains=None, uid=UID, spec=SPEC) -> DomainConfig:
    dom = render_domain(VirtualMachineSpec.model_validate(spec), name="default_web", uuid=uid, namespace="default",
                        vm_name="web", generation=1, domain_type="qemu", console_log=None, disk_chains=chains)
    return DomainConfig.from_xml(dom.to_xml())


def status_disks(uuid=UID, root=("/img/root.s1.qcow2", ["/img/root.qcow2"])):
    return {"domain": {"name": "default_web", "uuid": uuid},
            "disks": [{"name": "root", "target": "vda", "bus": "virtio", "device": "disk", "path": root[0],
                       "format": "qcow2", "backingChain": root[1]},
                      {"name": "iso", "target": "sda", "bus": "sata", "device": "cdrom", "path": "/iso/seed.iso",
                       "format": "raw", "backingChain": []}]}


def test_the_stored_definitions_record_wins():
    got = record_from(stored({"root": LEAF}), vm(status=status_disks(root=("/img/other.qcow2", []))))
    assert got == {"root": LEAF, "data": Chain.of(("/img/data.qcow2", "qcow2"))}


def test_status_when_there_is_no_definition():
    got = record_from(None, vm(status=status_disks()))
    assert got == {"root": Chain.of(("/img/root.s1.qcow2", "qcow2"), ("/img/root.qcow2", ""))}
    assert got["root"].active.path == "/img/root.s1.qcow2"


def test_status_of_another_domain_or_no_status_means_the_spec_paths():
    assert record_from(None, vm(status=status_disks(uuid="someone-else"))) == {}
    assert record_from(None, vm()) == {}
    # a definition of another VM object (same name, older uid) says nothing about this one
    assert record_from(stored({"root": LEAF}, uid="old-uid"), vm()) == {}


def test_a_definition_without_a_record_falls_back_to_status():
    dom = stored()
    dom.operator_metadata.disks = None  # rendered before disk records existed
    assert record_from(dom, vm(status=status_disks()))["root"].active.path == "/img/root.s1.qcow2"


def test_a_record_no_longer_matching_the_spec_is_dropped():
    moved = {**SPEC, "disks": [{"name": "root", "path": "/img/new-root.qcow2"}, SPEC["disks"][1]]}
    assert "root" not in record_from(stored({"root": LEAF}), vm(spec=moved))
    gone = {**SPEC, "disks": [SPEC["disks"][1]]}
    assert set(record_from(stored({"root": LEAF}), vm(spec=gone))) == {"data"}
    # never a CD-ROM: its media is the spec's
    assert "iso" not in record_from(None, vm(status=status_disks()))


def test_node_references_owners():
    vms, snaps = VMStore(), VMStore()
    vms.put(vm(status=status_disks(root=("/img/root.s2.qcow2", ["/img/root.s1.qcow2", "/img/root.qcow2"]))))
    clone_spec = {"memory": {"size": "256Mi"}, "disks": [{"name": "root", "path": "/img/clone.qcow2"}]}
    vms.put(vm(name="clone", uid="u-clone", spec=clone_spec))  # not defined yet: its spec path
    snaps.put({"metadata": {"namespace": "default", "name": "s1", "uid": "s-1", "resourceVersion": "1"},
               "status": {"vmUid": UID, "memoryFile": "/img/web.s1.mem",
                          "disks": [{"name": "root", "snapshotFile": "/img/root.qcow2",
                                     "activeFile": "/img/root.s1.qcow2"}]}})
    snaps.put({"metadata": {"namespace": "default", "name": "s2", "uid": "s-2", "resourceVersion": "1"},
               "status": {"vmUid": UID, "disks": [{"name": "root", "snapshotFile": "/img/root.s1.qcow2"}]}})
    snaps.put({"metadata": {"namespace": "default", "name": "pending", "uid": "s-3", "resourceVersion": "1"}})
    refs = node_references(vms, snaps)
    assert refs.owners("/img/root.s2.qcow2") == {"vm/default/web"}
    assert refs.owners("/img/root.qcow2") == {"vm/default/web", "snapshot/default/s1", "snapshot/default/s2"}
    # s2's file and, from its VM's chain, the files below it
    assert refs.owners("/img/root.s1.qcow2") == {"vm/default/web", "snapshot/default/s2"}
    assert refs.owners("/img/web.s1.mem") == {"snapshot/default/s1"}
    assert refs.owners("/img/clone.qcow2") == {"vm/default/clone"}
    assert refs.owners("/iso/seed.iso") == {"vm/default/web"}
    verdict = refs.verdict(["/img/root.s2.qcow2", "/img/root.s1.qcow2", "/img/root.qcow2"],
                           removing=["vm/default/web"])
    assert verdict.delete == ("/img/root.s2.qcow2",)
    assert verdict.keep["/img/root.qcow2"] == ("snapshot/default/s1", "snapshot/default/s2")


def test_a_snapshots_own_backing_chain_and_no_snapshot_store():
    vms, snaps = VMStore(), VMStore()
    snaps.put({"metadata": {"namespace": "ns", "name": "s", "uid": "s", "resourceVersion": "1"},
               "status": {"vmUid": "gone", "disks": [{"name": "d", "snapshotFile": "/img/b.qcow2",
                                                      "backingChain": ["/img/a.qcow2"]}]}})
    refs = node_references(vms, snaps)
    assert refs.owners("/img/a.qcow2") == {"snapshot/ns/s"} == refs.owners("/img/b.qcow2")
    assert node_references(vms, None).referenced() == frozenset()


def test_delete_owns_the_chain_down_to_the_spec_path_only():
    from libvirt_operator.agent.teardown import own_files

    spec = VirtualMachineSpec.model_validate({**SPEC, "disks": [
        {"name": "root", "path": "/img/root.qcow2"}, {"name": "data", "path": "/img/data.qcow2"},
        {"name": "ro", "path": "/img/ro.raw", "format": "raw", "readOnly": True},
        {"name": "iso", "device": "cdrom", "path": "/iso/seed.iso"}]})
    # root: two snapshot leaves over the spec file, which itself sits on a shared base it did not make
    root = Chain.of(("/img/root.s2.qcow2", "qcow2"), ("/img/root.s1.qcow2", "qcow2"), ("/img/root.qcow2", "qcow2"),
                    ("/img/golden.qcow2", "qcow2"))
    files, read_only = own_files(spec, {"root": root})
    assert files == ["/img/root.s2.qcow2", "/img/root.s1.qcow2", "/img/root.qcow2", "/img/data.qcow2"]
    assert read_only == {"/img/ro.raw"}


def test_the_planner_sees_nothing_to_do_for_a_vm_running_on_its_recorded_leaf():
    import xml.etree.ElementTree as ET

    from libvirt_operator.agent.liveupdate.plan import HostCaps, plan

    def live_on(chain: Chain) -> DomainConfig:
        """What libvirt shows of the running domain after the snapshot: the leaf, its backing nested."""
        live = stored()
        disk = live.devices.by_alias("ua-disk-root")
        disk.source_file, disk.driver_type = chain.active.path, chain.active.format
        store = ET.SubElement(disk.element, "backingStore", type="file")
        ET.SubElement(store, "format", type="qcow2")
        ET.SubElement(store, "source", file=chain.backing[0].path)
        ET.SubElement(store, "backingStore")
        return DomainConfig.from_xml(live.to_xml())

    live = live_on(LEAF)
    obj = vm(status={"domain": {"uuid": UID}})
    wanted = stored(record_from(stored({"root": LEAF}), obj))
    p = plan(wanted, live, wanted, caps=HostCaps(cpus=4))
    assert p.converged and p.steps == [] and p.restart == []
    # the spec's path alone (what rendering did before the record) would ask for a restart on the old file
    assert plan(stored(), live, stored(), caps=HostCaps(cpus=4)).restart == ["disks[root]"]


def test_the_render_cache_renders_again_for_a_changed_record():
    from libvirt_operator.agent.define import RenderCache

    cache, obj = RenderCache(), vm()
    obj["metadata"]["generation"] = 3
    spec = VirtualMachineSpec.model_validate(SPEC)
    args = dict(domain_type="qemu", console_log="/logs/web.log")
    source = lambda dom: dom.devices.by_alias("ua-disk-root").source_file  # noqa: E731
    assert source(cache.render(obj, spec, **args)) == "/img/root.qcow2"
    assert source(cache.render(obj, spec, **args, disk_chains={"root": LEAF})) == "/img/root.s1.qcow2"
    assert source(cache.render(obj, spec, **args, disk_chains={})) == "/img/root.qcow2"


def test_a_chain_a_migration_moved_off_the_spec_path_stays_recorded():
    moved = Chain.of(("/other/root.qcow2", "qcow2"), ("/other/root.base.qcow2", "qcow2"))
    dom = stored({"root": moved})
    own = dom.operator_metadata
    own.disk_origins = {"root": "/img/root.qcow2"}
    dom.operator_metadata = own
    again = DomainConfig.from_xml(dom.to_xml())  # the origin survives the XML round trip
    assert again.operator_metadata.disk_origins == {"root": "/img/root.qcow2"}
    assert record_from(again, vm())["root"] == moved
    assert moved_disks(again, vm()) == {"root"}
    # without the origin, a chain not holding the spec path is not this disk's any more
    assert "root" not in record_from(stored({"root": moved}), vm())  # rendered from the spec path
    # a user who points the disk at another file gets that file
    other = {**SPEC, "disks": [{"name": "root", "path": "/img/new.qcow2"}, *SPEC["disks"][1:]]}
    assert "root" not in record_from(again, vm(spec=other))
    assert moved_disks(again, vm(spec=other)) == frozenset()


def test_a_redefinition_keeps_a_moved_disks_origin():
    """The reconciler renders from record_from + origins_from: the origin survives its redefinitions."""
    moved = Chain.of(("/other/root.qcow2", "qcow2"))
    dom = stored({"root": moved})
    own = dom.operator_metadata
    own.disk_origins = {"root": "/img/root.qcow2"}
    dom.operator_metadata = own
    again = render_domain(VirtualMachineSpec.model_validate(SPEC), name="default_web", uuid=UID,
                          namespace="default", vm_name="web", generation=2, domain_type="qemu", console_log=None,
                          disk_chains=record_from(dom, vm()), disk_origins=origins_from(dom, vm()))
    again = DomainConfig.from_xml(again.to_xml())
    assert again.operator_metadata.disk_origins == {"root": "/img/root.qcow2"}
    assert record_from(again, vm())["root"] == moved
    assert origins_from(stored(), vm()) == {}
