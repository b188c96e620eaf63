"""The agent's migration engine (agent/migrations: precheck, live) on two real libvirt nodes with the test
guest, driven through a MigrationContext whose writers record what the job reports (no API server): the
target's pre-check, a Live migration node-a → node-b, a re-entry at step Migrating after the domain landed,
an abort by deletion, and a WholeMachine migration node-b → node-a into a root at another path. The tests
run in file order with one travelling guest; each proves the same boot goes on with its RAM and disk bytes."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import libvirt
import pytest

from libvirt_operator.agent.migrations import live, precheck
from libvirt_operator.agent.migrations.context import MigrationContext, MigrationFailed
from libvirt_operator.storage.references import References
from localenv.guest import qemu_pid

from .hypervisor_support import run
from .test_migration_hv import (
    DATA_SECTORS,
    MIGRATION_TIMEOUT,
    ROOT_SECTORS,
    VM,
    World,
    disk_paths,
    qemu_img_chain,
    travelling_guest,
)

pytestmark = pytest.mark.world


class Recorder:
    """The job's writes, as the agent would apply them."""

    def __init__(self):
        self.status: dict = {}
        self.vm_states: list[tuple[str, str]] = []
        self.events: list[tuple[str, str]] = []
        self.progress: list[dict] = []


async def make_ctx(world: World, node: str, vm: VM, spec: dict, mig_spec: dict, rec: Recorder, shared: tuple[str, ...],
             status: dict | None = None) -> MigrationContext:
    migration = {"metadata": {"name": "m", "namespace": "test", "uid": str(uuid.uuid4()), "generation": 1},
                 "spec": mig_spec, "status": dict(status or rec.status)}
    chains = [{"name": "root", "device": "disk", "path": vm.root_leaf, "format": "qcow2",
               "backingChain": [vm.root_parent]},
              {"name": "data", "device": "disk", "path": vm.data_file, "format": "qcow2", "backingChain": []}]
    vm_obj = {"metadata": {"namespace": "test", "name": vm.name, "uid": vm.uuid}, "spec": spec,
              "status": {"domain": {"name": vm.name, "uuid": vm.uuid}, "disks": chains}}

    async def write(fields: dict) -> None:
        rec.status.update(fields)
        ctx.migration = {**migration, "status": dict(rec.status)}
        if "progress" in fields:
            rec.progress.append(fields["progress"])

    async def write_vm(state: str, message: str) -> None:
        rec.vm_states.append((state, message))

    async def event(reason: str, message: str, warning: bool = False) -> None:
        rec.events.append((reason, message))

    async def record(guest, chains):  # WholeMachine records on the target through the persist XML
        raise AssertionError("the Live/WholeMachine engine records through the migration's XML")

    ctx = MigrationContext(node=node, host=world.hosts[node], roots=world.roots, shared_roots=shared, vm=vm_obj,
                           migration=migration, guest=await world.hosts[node].lookup(vm.uuid), write=write,
                           write_vm=write_vm, references=References, record=record, event=event,
                           abort=asyncio.Event())
    return ctx


def target_cfg(world: World, node: str, shared: tuple[str, ...], roots: tuple[str, ...]) -> precheck.TargetConfig:
    return precheck.TargetConfig(node=node, roots=roots, shared_roots=shared, migration_uri=world.nodes[node].uri,
                                 address="127.0.0.1")


class Story:
    boot_id = ""
    markers: set[str] = set()
    disk: dict[tuple[int, int], str] = {}


@pytest.fixture(scope="module")
def world(libvirt_nodes, storage_dir):
    w = World(libvirt_nodes, storage_dir)
    yield w
    w.close()


@pytest.fixture(scope="module")
def spec_and_vm(world, guest_image):
    with travelling_guest(world, guest_image, "eng") as pair:
        yield pair


def shared_of(world: World, v: VM) -> tuple[str, ...]:
    return (str(world.shared), v.image_dir)


def test_precheck_refuses_what_the_target_cannot_hold_and_names_where_to_go(world, spec_and_vm):
    spec, v = spec_and_vm
    vm_obj = {"metadata": {"uid": v.uuid}, "spec": spec, "status": {}}
    live_mig = {"metadata": {"name": "m"}, "spec": {"type": "Live"}}
    cfg = target_cfg(world, "node-b", shared_of(world, v), (*world.roots, v.image_dir))
    target = run(precheck.run(cfg, world.hosts["node-b"], vm_obj, live_mig))
    assert target == {"node": "node-b", "migrationUri": world.nodes["node-b"].uri, "address": "127.0.0.1"}
    with pytest.raises(MigrationFailed) as err:  # the source node has the domain already
        run(precheck.run(target_cfg(world, "node-a", shared_of(world, v), world.roots), world.hosts["node-a"],
                         vm_obj, live_mig))
    assert err.value.reason == "DomainExists"
    with pytest.raises(MigrationFailed) as err:  # nothing shared: a Live migration cannot keep the disks
        run(precheck.run(target_cfg(world, "node-b", (), world.roots), world.hosts["node-b"], vm_obj, live_mig))
    assert err.value.reason == "StorageRootMismatch"
    big = {**vm_obj, "spec": {**spec, "memory": {"size": "4096Gi"}}}
    with pytest.raises(MigrationFailed) as err:
        run(precheck.run(cfg, world.hosts["node-b"], big, live_mig))
    assert err.value.reason == "InsufficientMemory"
    nic = {**vm_obj, "spec": {**spec, "interfaces": [{"name": "n", "type": "network", "source": "no-such-net"}]}}
    with pytest.raises(MigrationFailed) as err:
        run(precheck.run(cfg, world.hosts["node-b"], nic, live_mig))
    assert err.value.reason == "NetworkNotFound"


def test_live_migration_reports_progress_and_lands_on_the_target(world, spec_and_vm):
    spec, v = spec_and_vm
    Story.boot_id = v.boot_id()
    v.mark("before-live")
    v.write_sector(DATA_SECTORS, 3, "DATA-LIVE")
    Story.markers, Story.disk = {"before-live"}, {(DATA_SECTORS, 3): "DATA-LIVE"}
    v.uptime()
    rec = Recorder()
    rec.status = {"phase": "Running", "sourceNode": "node-a", "targetNode": "node-b",
                  "target": {"node": "node-b", "migrationUri": world.nodes["node-b"].uri, "address": "127.0.0.1"}}

    async def go():
        ctx = await make_ctx(world, "node-a", v, spec, {"type": "Live", "bandwidthMibPerSecond": 40}, rec,
                       shared_of(world, v))
        await live.run(ctx)

    run(go(), MIGRATION_TIMEOUT)
    assert [s for s, _ in rec.vm_states] == ["Migrating", "Landed"]
    assert rec.status["phase"] == "HandingOver" and rec.status["step"] == "HandOver"
    assert rec.progress and any(p.get("dataTotalBytes") for p in rec.progress)
    assert rec.progress[-1]["percent"] == 100
    assert [r for r, _ in rec.events] == ["MigrationLanded"]  # the controller posts MigrationStarted
    v.on("node-b")
    v.nowhere_but("node-b")
    v.prove_same_guest(Story.boot_id, Story.markers, Story.disk)


def test_reentry_at_migrating_after_the_domain_landed_hands_over_without_migrating_again(world, spec_and_vm):
    spec, v = spec_and_vm
    rec = Recorder()
    status = {"phase": "Running", "step": "Migrating", "sourceNode": "node-a", "targetNode": "node-b",
              "target": {"node": "node-b", "migrationUri": world.nodes["node-b"].uri, "address": "127.0.0.1"}}
    rec.status = dict(status)
    pid = qemu_pid(v.uuid)

    async def go():
        await live.run(await make_ctx(world, "node-a", v, spec, {"type": "Live"}, rec, shared_of(world, v)))

    run(go(), MIGRATION_TIMEOUT)  # the source agent was killed after libvirt finished: it finds the domain there
    assert [s for s, _ in rec.vm_states] == ["Landed"]
    assert qemu_pid(v.uuid) == pid
    v.nowhere_but("node-b")


def test_abort_by_deletion_leaves_the_vm_on_its_source_unchanged(world, spec_and_vm):
    spec, v = spec_and_vm
    pid = qemu_pid(v.uuid)
    xml_before = v.dom().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    rec = Recorder()
    rec.status = {"phase": "Running", "sourceNode": "node-b", "targetNode": "node-a",
                  "target": {"node": "node-a", "migrationUri": world.nodes["node-a"].uri, "address": "127.0.0.1"}}

    async def go():
        ctx = await make_ctx(world, "node-b", v, spec, {"type": "Live", "bandwidthMibPerSecond": 1}, rec,
                       shared_of(world, v))
        task = asyncio.ensure_future(live.run(ctx))
        while not rec.progress:  # the job runs and reports
            await asyncio.sleep(0.2)
            if task.done():
                break
        ctx.abort.set()
        with pytest.raises(MigrationFailed) as err:
            await task
        return err.value

    failed = run(go(), MIGRATION_TIMEOUT)
    assert failed.reason == "MigrationAborted"
    assert [s for s, _ in rec.vm_states] == ["Migrating"]  # the caller writes Aborted
    assert qemu_pid(v.uuid) == pid
    v.nowhere_but("node-b")
    assert v.dom().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml_before
    v.prove_same_guest(Story.boot_id, Story.markers, Story.disk)


def test_whole_machine_copies_the_local_disks_into_a_root_at_another_path(world, spec_and_vm):
    spec, v = spec_and_vm
    v.mark("before-whole")
    v.write_sector(ROOT_SECTORS, 9, "ROOT-WHOLE")
    Story.markers.add("before-whole")
    Story.disk[(ROOT_SECTORS, 9)] = "ROOT-WHOLE"
    # node-b's view: the disks are local (nothing but the boot files is shared); node-a's root is world.a_root
    shared = (v.image_dir,)
    cfg = target_cfg(world, "node-a", shared, (str(world.a_root), v.image_dir))
    vm_obj = {"metadata": {"uid": v.uuid}, "spec": spec,
              "status": {"disks": [{"name": "root", "path": v.root_leaf, "backingChain": [v.root_parent]},
                                   {"name": "data", "path": v.data_file}]}}
    mig_spec = {"type": "WholeMachine", "bandwidthMibPerSecond": 64}
    target = run(precheck.run(cfg, world.hosts["node-a"], vm_obj, {"metadata": {"name": "m"}, "spec": mig_spec}))
    assert target["storageRoot"] == str(world.a_root)
    rec = Recorder()
    rec.status = {"phase": "Running", "sourceNode": "node-b", "targetNode": "node-a", "target": target}

    async def go():
        await live.run(await make_ctx(world, "node-b", v, spec, mig_spec, rec, shared))

    run(go(), MIGRATION_TIMEOUT)
    assert [s for s, _ in rec.vm_states] == ["Migrating", "Landed"]
    new_leaf, new_parent = world.a_root / Path(v.root_leaf).name, world.a_root / Path(v.root_parent).name
    new_data = world.a_root / Path(v.data_file).name
    assert rec.status["disks"] == [
        {"name": "data", "sourceFile": v.data_file, "destinationFile": str(new_data), "copiedFiles": []},
        {"name": "root", "sourceFile": v.root_leaf, "destinationFile": str(new_leaf),
         "copiedFiles": [str(new_parent)]}]
    v.on("node-a")
    v.nowhere_but("node-a")
    v.prove_same_guest(Story.boot_id, Story.markers, Story.disk)
    assert qemu_img_chain(str(new_leaf)) == [str(new_leaf), str(new_parent)]
    for old in (v.root_leaf, v.root_parent, v.data_file):  # nothing else referenced them
        assert not Path(old).exists(), old
    persistent = v.dom().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert sorted(disk_paths(persistent).values()) == sorted([str(new_data), str(new_leaf)])
    assert sorted(disk_paths(v.dom().XMLDesc(0)).values()) == sorted([str(new_data), str(new_leaf)])
    assert '"root":"' + v.root_leaf + '"' in persistent.replace("&quot;", '"')  # the disk's origin is recorded
