"""The pure parts of the agent's migration job: progress figures, the watchdog, the target's file checks,
and the WholeMachine plan (which files go where, and the retargeted domain XML)."""

from __future__ import annotations

import pytest

from libvirt_operator.agent.migrations import live, precheck
from libvirt_operator.agent.migrations.context import MigrationFailed
from libvirt_operator.agent.migrations.progress import GIB, Watchdog, completion_timeout, progress_fields
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain import DomainConfig, render_domain
from libvirt_operator.hypervisor.migration import JobStats
from libvirt_operator.storage.chain import Chain

UID = "5d7c0e1a-1111-4222-8333-944455556666"


def test_progress_fields_keep_only_what_libvirt_reported():
    stats = JobStats(type="unbounded", data_total=200, data_processed=50, data_remaining=150, iteration=2,
                     memory_bps=1000)
    got = progress_fields(stats, when="t")
    assert got == {"percent": 25, "dataTotalBytes": 200, "dataProcessedBytes": 50, "dataRemainingBytes": 150,
                   "iteration": 2, "memoryBytesPerSecond": 1000, "updateTime": "t"}
    assert progress_fields(JobStats(type="unbounded", data_total=0)) == {"dataTotalBytes": 0}
    assert progress_fields(JobStats(type="unbounded"), postcopy=True)["postcopy"] is True


@pytest.mark.parametrize(("per_gib", "memory", "disk", "expected"), [
    (150, 192 << 20, 0, 150.0),  # a small guest still gets the per-GiB figure
    (150, 2 * GIB, 0, 300.0),
    (10, GIB, 3 * GIB, 40.0),  # copied disks count
])
def test_completion_timeout(per_gib, memory, disk, expected):
    assert completion_timeout(per_gib, memory, disk) == expected


@pytest.mark.parametrize(("samples", "expected"), [
    ([(0, 100), (5, 90), (9, 80)], None),  # shrinking
    ([(0, 100), (5, 100), (9, 120), (10, 100)], "NoProgress"),  # no new low for 10 s
    ([(0, 100), (5, 90), (12, 95)], None),  # the last low was 7 s ago
    ([(0, None), (11, None)], "NoProgress"),  # setup that never reports
    ([(0, 100), (30, 1)], "Timeout"),  # completion beats progress
])
def test_watchdog(samples, expected):
    dog = Watchdog(started=0.0, completion_s=30.0, progress_s=10.0)
    verdicts = [dog.observe(t, r) for t, r in samples]
    assert verdicts[:-1] == [None] * (len(samples) - 1)
    assert verdicts[-1] == expected


def cfg(tmp_path, shared=True):
    shared_root, local = tmp_path / "shared", tmp_path / "local-b"
    shared_root.mkdir(exist_ok=True)
    local.mkdir(exist_ok=True)
    return precheck.TargetConfig(node="node-b", roots=(str(shared_root), str(local)),
                                 shared_roots=(str(shared_root),) if shared else (), migration_uri="qemu+tcp://b",
                                 address="127.0.0.1")


def vm(paths, kernel=None):
    spec = {"memory": {"size": "192Mi"}, "disks": [{"name": n, "path": p} for n, p in paths.items()]}
    if kernel:
        spec["boot"] = {"kernel": {"kernel": kernel}}
    return {"metadata": {"uid": UID, "namespace": "default", "name": "web"}, "spec": spec, "status": {}}


def mig(kind, disks=()):
    return {"metadata": {"name": "m"}, "spec": {"type": kind, "disks": [dict(d) for d in disks]}}


def test_live_needs_every_file_on_shared_storage(tmp_path):
    c = cfg(tmp_path)
    assert precheck.check_files(c, vm({"root": f"{tmp_path}/shared/root.qcow2"}), mig("Live")) is None
    with pytest.raises(MigrationFailed) as err:
        precheck.check_files(c, vm({"root": f"{tmp_path}/elsewhere/root.qcow2"}), mig("Live"))
    assert err.value.reason == "StorageRootMismatch"
    with pytest.raises(MigrationFailed) as err:  # the backing file counts too
        precheck.check_files(c, {**vm({"root": f"{tmp_path}/shared/r.qcow2"}), "status": {"disks": [
            {"name": "root", "path": f"{tmp_path}/shared/r.qcow2", "backingChain": ["/other/base.raw"]}]}},
            mig("Live"))
    assert "/other/base.raw" in err.value.message
    with pytest.raises(MigrationFailed) as err:
        precheck.check_files(cfg(tmp_path, shared=False), vm({}, kernel=f"{tmp_path}/shared/k"), mig("Live"))
    assert err.value.reason == "StorageRootMismatch"


def test_whole_machine_destinations(tmp_path):
    c = cfg(tmp_path)
    here = vm({"root": "/src/local-a/root.qcow2"})
    assert precheck.check_files(c, here, mig("WholeMachine")) == f"{tmp_path}/local-b"
    (tmp_path / "local-b" / "root.qcow2").write_text("")
    with pytest.raises(MigrationFailed) as err:
        precheck.check_files(c, here, mig("WholeMachine"))
    assert err.value.reason == "FileExists"
    ok = [{"name": "root", "destinationPath": f"{tmp_path}/local-b/other.qcow2"}]
    assert precheck.check_files(c, here, mig("WholeMachine", ok))
    for dest, reason in ((f"{tmp_path}/nope/x.qcow2", "PathNotAllowed"),
                         (f"{tmp_path}/local-b/root.qcow2", "FileExists")):
        with pytest.raises(MigrationFailed) as err:
            precheck.check_files(c, here, mig("WholeMachine", [{"name": "root", "destinationPath": dest}]))
        assert err.value.reason == reason
    with pytest.raises(MigrationFailed) as err:
        precheck.check_files(c, here, mig("WholeMachine", [{"name": "data", "destinationPath": f"{tmp_path}/x"}]))
    assert err.value.reason == "DiskNotFound"


class Ctx:
    def __init__(self, vm_, migration, shared=()):
        self.vm, self.migration, self.shared_roots = vm_, migration, shared

    spec = property(lambda self: self.migration["spec"])
    status = property(lambda self: self.migration.get("status") or {})


def test_whole_machine_plan_and_new_chains():
    chains = {"root": Chain.of(("/a/root.qcow2", "qcow2"), ("/a/base.raw", "raw")),
              "data": Chain.of(("/a/data.qcow2", "qcow2")),
              "iso": Chain.of(("/shared/seed.qcow2", "qcow2"))}
    m = {"spec": {"type": "WholeMachine", "disks": [{"name": "data", "destinationPath": "/b/x/data2.qcow2"}]},
         "status": {"target": {"storageRoot": "/b"}}}
    planned = live.plan_whole(Ctx(vm({}), m, shared=("/shared",)), chains)
    assert planned == [
        {"name": "data", "sourceFile": "/a/data.qcow2", "destinationFile": "/b/x/data2.qcow2", "copiedFiles": []},
        {"name": "root", "sourceFile": "/a/root.qcow2", "destinationFile": "/b/root.qcow2",
         "copiedFiles": ["/b/base.raw"]}]
    assert live.new_chains(planned, chains) == {
        "data": Chain.of(("/b/x/data2.qcow2", "qcow2")),
        "root": Chain.of(("/b/root.qcow2", "qcow2"), ("/b/base.raw", "raw"))}
    deep = {"root": Chain.of(("/a/r2", "qcow2"), ("/a/r1", "qcow2"), ("/a/base", "raw"))}
    with pytest.raises(MigrationFailed) as err:
        live.plan_whole(Ctx(vm({}), m), deep)
    assert err.value.reason == "UnsupportedChain"


def test_retarget_points_the_disks_and_the_record_at_the_new_files():
    spec = VirtualMachineSpec.model_validate({"memory": {"size": "192Mi"}, "disks": [
        {"name": "root", "path": "/a/root.qcow2"}, {"name": "data", "path": "/a/data.qcow2"}]})
    old = {"root": Chain.of(("/a/root.qcow2", "qcow2"), ("/a/base.raw", "raw"))}
    xml = render_domain(spec, name="default_web", uuid=UID, namespace="default", vm_name="web", generation=1,
                        domain_type="qemu", console_log=None, disk_chains=old).to_xml()
    moved = {"root": Chain.of(("/b/root.qcow2", "qcow2"), ("/b/base.raw", "raw"))}
    dom = DomainConfig.from_xml(live.retarget(xml, moved, {"root": "/a/root.qcow2"}))
    files = {d.findtext("target[@dev]") or d.find("target").get("dev"): d.find("source").get("file")
             for d in dom.element.iterfind("./devices/disk")}
    assert sorted(files.values()) == ["/a/data.qcow2", "/b/root.qcow2"]
    assert not dom.element.findall("./devices/disk/backingStore")
    assert dom.operator_metadata.disks["root"] == moved["root"]
    assert dom.operator_metadata.disk_origins == {"root": "/a/root.qcow2"}
