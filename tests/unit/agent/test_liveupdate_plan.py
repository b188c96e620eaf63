"""The live-update planner, table by table: desired render vs the running domain."""

from __future__ import annotations

import copy

import pytest

from libvirt_operator.agent.liveupdate.plan import HostCaps, Op, canonical, plan
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import naming
from libvirt_operator.domain.config import DomainConfig
from libvirt_operator.domain.devices import MemoryDevice
from libvirt_operator.domain.render import render_domain

UUID = "6f1c1a56-4a0e-4d2b-9c36-0d7c2b3b8f11"
CAPS = HostCaps(cpus=4)
MiB = 1024


def spec(**over) -> dict:
    base = {"memory": {"size": "192Mi", "maxSize": "512Mi"}, "cpu": {"vcpus": 1, "maxVcpus": 4},
            "boot": {"kernel": {"kernel": "/img/vmlinuz", "cmdline": "console=ttyS0"}},
            "disks": [{"name": "data", "path": "/img/data.qcow2"},
                      {"name": "iso", "device": "cdrom", "path": "/img/a.iso"}],
            "interfaces": [{"name": "nic0", "type": "user"}]}
    for key, value in over.items():
        base[key] = value
    return base


def render(s: dict) -> DomainConfig:
    return render_domain(VirtualMachineSpec.model_validate(s), name="default_vm", uuid=UUID, namespace="default",
                         vm_name="vm", generation=1, domain_type="qemu", console_log=None)


def planned(old: dict, new: dict, caps: HostCaps = CAPS, live: DomainConfig | None = None, **kw):
    return plan(render(new), live or render(old), caps=caps, **kw)


def ops(p) -> list[tuple[str, str]]:
    return [(s.op.value, s.field) for s in p.steps]


def test_same_spec_is_converged():
    p = planned(spec(), spec())
    assert p.converged and p.steps == [] and p.restart == []


@pytest.mark.parametrize(("old", "new", "caps", "steps", "restart"), [
    (1, 3, CAPS, [("set-vcpus", "cpu.vcpus")], []),
    (3, 1, CAPS, [("set-vcpus", "cpu.vcpus")], []),
    (3, 1, HostCaps(cpus=4, vcpu_unplug=False), [], ["cpu.vcpus"]),
])
def test_vcpus(old, new, caps, steps, restart):
    p = planned(spec(cpu={"vcpus": old, "maxVcpus": 4}), spec(cpu={"vcpus": new, "maxVcpus": 4}), caps)
    assert ops(p) == steps and p.restart == restart
    if steps:
        assert p.steps[0].value == new


def test_vcpus_above_the_running_ceiling_need_a_restart():
    p = planned(spec(cpu={"vcpus": 2, "maxVcpus": 4}), spec(cpu={"vcpus": 6, "maxVcpus": 8}))
    assert p.steps == [] and set(p.restart) == {"cpu.maxVcpus", "cpu.vcpus"}


def test_memory_grows_by_a_dimm_of_the_difference():
    p = planned(spec(), spec(memory={"size": "320Mi", "maxSize": "512Mi"}))
    assert ops(p) == [("attach", "memory.size")]
    dimm = MemoryDevice.from_xml(p.steps[0].xml)
    assert (dimm.model, dimm.size_kib, dimm.node, dimm.alias) == ("dimm", 128 * MiB, 0, naming.dimm_alias(0))


def test_memory_grows_live_only_in_whole_128mi_dimms():
    p = planned(spec(), spec(memory={"size": "256Mi", "maxSize": "512Mi"}))
    assert p.steps == [] and p.restart == ["memory.size"]


def with_dimm(d: DomainConfig, index: int, kib: int) -> DomainConfig:
    d = copy.deepcopy(d)
    d.devices.memories.append(MemoryDevice(model="dimm", size_kib=kib, node=0, alias=naming.dimm_alias(index)))
    d.memory_kib += kib
    d.current_memory_kib = d.memory_kib
    return d


def test_memory_shrinks_by_unplugging_the_fewest_newest_dimms_that_add_up():
    live = with_dimm(with_dimm(render(spec()), 0, 128 * MiB), 1, 64 * MiB)
    p = planned(None, spec(memory={"size": "320Mi", "maxSize": "512Mi"}), live=live)
    assert ops(p) == [("detach", "memory.size")] and p.steps[0].alias == naming.dimm_alias(1)
    p = planned(None, spec(memory={"size": "256Mi", "maxSize": "512Mi"}), live=live)
    assert [s.alias for s in p.steps] == [naming.dimm_alias(0)]
    p = planned(None, spec(), live=live)
    assert [s.alias for s in p.steps] == [naming.dimm_alias(1), naming.dimm_alias(0)]


@pytest.mark.parametrize("caps", [CAPS, HostCaps(cpus=4, dimm_unplug=False)])
def test_memory_below_boot_memory_or_without_unplug_needs_a_restart(caps):
    live = with_dimm(render(spec()), 0, 128 * MiB)
    p = planned(None, spec(memory={"size": "128Mi", "maxSize": "512Mi"}), caps, live=live)
    assert p.steps == [] and p.restart == ["memory.size"]


def test_memory_above_the_running_ceiling_needs_a_restart():
    p = planned(spec(memory={"size": "192Mi"}), spec(memory={"size": "256Mi", "maxSize": "512Mi"}))
    assert p.steps == [] and set(p.restart) == {"memory.maxSize", "memory.size"}


def test_a_ballooned_guest_gets_its_memory_back():
    live = render(spec())
    live.current_memory_kib = 100 * MiB
    p = planned(None, spec(), live=live)
    assert ops(p) == [("set-memory", "memory.size")] and p.steps[0].value == 192 * MiB
    live.current_memory_kib = 191 * MiB  # what the guest reports of a full balloon
    assert planned(None, spec(), live=live).converged


@pytest.mark.parametrize(("bus", "live_op"), [("virtio", "attach"), ("scsi", "attach"), ("usb", "attach"),
                                              ("sata", None)])
def test_disk_added(bus, live_op):
    new = spec()
    new["disks"] = [*new["disks"], {"name": "extra", "path": "/img/x.qcow2", "bus": bus}]
    p = planned(spec(), new)
    if live_op:
        assert ops(p) == [(live_op, "disks[extra]")] and "/img/x.qcow2" in p.steps[0].xml
    else:
        assert p.steps == [] and p.restart == ["disks[extra]"]


def test_attach_xml_comes_from_the_stored_definition_with_its_address():
    new = spec()
    new["disks"] = [*new["disks"], {"name": "extra", "path": "/img/x.qcow2"}]
    stored = render(new)
    extra = stored.devices.by_alias(naming.disk_alias("extra"))
    extra.element.append(copy.deepcopy(
        DomainConfig.from_xml("<domain><address type='pci' domain='0x0000' bus='0x09' slot='0x00' "
                              "function='0x0'/></domain>").element[0]))
    p = plan(render(new), render(spec()), stored, caps=CAPS)
    assert "bus=\"0x09\"" in p.steps[0].xml


def test_disk_removed_is_detached_by_alias_unless_sata():
    old = spec()
    old["disks"] = [*old["disks"], {"name": "extra", "path": "/img/x.qcow2", "bus": "scsi"}]
    p = planned(old, spec())
    assert ops(p) == [("detach", "disks[extra]")] and p.steps[0].alias == naming.disk_alias("extra")
    p = planned(spec(), {**spec(), "disks": spec()["disks"][:1]})
    assert p.steps == [] and p.restart == ["disks[iso]"]


@pytest.mark.parametrize("path", ["/img/b.iso", None])
def test_cdrom_media_change_and_eject_are_updates(path):
    new = spec()
    new["disks"] = [new["disks"][0], {"name": "iso", "device": "cdrom", **({"path": path} if path else {})}]
    p = planned(spec(), new)
    assert ops(p) == [("update", "disks[iso]")]
    assert (path or "<source") not in p.steps[0].xml or path is not None


def test_a_disk_on_another_file_or_bus_needs_a_restart():
    new = spec()
    new["disks"] = [{"name": "data", "path": "/img/other.qcow2"}, new["disks"][1]]
    assert planned(spec(), new).restart == ["disks[data]"]
    new["disks"] = [{"name": "data", "path": "/img/data.qcow2", "bus": "scsi"}, {**new["disks"][1], "target": "sda"}]
    new["disks"][0]["target"] = "sdb"
    assert planned(spec(), new).restart == ["disks[data]"]


def test_nics_attach_detach_update_restart():
    two = {**spec(), "interfaces": [{"name": "nic0", "type": "user"}, {"name": "nic1", "type": "bridge",
                                                                      "source": "br0"}]}
    assert ops(planned(spec(), two)) == [("attach", "interfaces[nic1]")]
    assert ops(planned(two, spec())) == [("detach", "interfaces[nic1]")]
    moved = copy.deepcopy(two)
    moved["interfaces"][1]["source"] = "br1"
    assert ops(planned(two, moved)) == [("update", "interfaces[nic1]")]
    remac = copy.deepcopy(two)
    remac["interfaces"][1]["mac"] = "52:54:00:00:00:01"
    assert planned(two, remac).restart == ["interfaces[nic1]"]


def test_host_devices_attach_and_detach():
    usb = {**spec(), "hostDevices": [{"name": "key", "type": "usb", "vendor": "0x0781", "product": "0x5567"}]}
    assert ops(planned(spec(), usb)) == [("attach", "hostDevices[key]")]
    assert ops(planned(usb, spec())) == [("detach", "hostDevices[key]")]


def test_pinning_set_changed_and_removed():
    pinned = spec(cpu={"vcpus": 2, "maxVcpus": 4, "pinning": {"vcpus": [{"vcpu": 1, "cpuset": "2,3"}],
                                                              "emulator": "0"}})
    plain = spec(cpu={"vcpus": 2, "maxVcpus": 4})
    p = planned(plain, pinned)
    assert [(s.op, s.vcpu, s.value) for s in p.steps] == [(Op.PIN_VCPU, 1, "2-3"), (Op.PIN_EMULATOR, None, "0")]
    p = planned(pinned, plain)
    assert [(s.op, s.vcpu, s.value) for s in p.steps] == [(Op.PIN_VCPU, 1, "0-3"), (Op.PIN_EMULATOR, None, "0-3")]


def test_boot_fields_need_a_restart_and_are_named():
    new = spec(boot={"kernel": {"kernel": "/img/vmlinuz", "cmdline": "console=ttyS0 quiet"}})
    p = planned(spec(), new)
    assert p.steps == [] and p.restart == ["boot"]
    assert planned(spec(), {**spec(), "guestAgent": False}).restart == ["guestAgent"]


def test_grow_resizes_and_shrink_is_refused():
    alias = naming.disk_alias("data")
    p = planned(spec(), spec(), sizes={alias: 2 << 30}, capacities={alias: 1 << 30})
    assert [(s.op, s.target, s.value) for s in p.steps] == [(Op.RESIZE, "vda", 2 << 30)]
    p = planned(spec(), spec(), sizes={alias: 1 << 30}, capacities={alias: 2 << 30})
    assert p.steps == [] and p.refused[0][0] == "disks[data].size" and not p.converged


def test_steps_run_detaches_first():
    old = {**spec(), "interfaces": [{"name": "old", "type": "user"}]}
    new = {**spec(cpu={"vcpus": 2, "maxVcpus": 4}), "interfaces": [{"name": "new", "type": "user"}]}
    assert [s.op for s in planned(old, new).steps] == [Op.DETACH, Op.ATTACH, Op.SET_VCPUS]


@pytest.mark.parametrize(("given", "want"), [("0", "0"), ("3,0-1,2", "0-3"), ("0,2,4-5", "0,2,4-5")])
def test_cpuset_canonical(given, want):
    assert canonical(given) == want


def test_an_empty_cdrom_without_a_format_in_the_live_xml_matches():
    empty = {**spec(), "disks": [spec()["disks"][0], {"name": "iso", "device": "cdrom"}]}
    live = render(empty)
    live.devices.by_alias(naming.disk_alias("iso")).driver_type = None
    assert planned(None, empty, live=live).converged
