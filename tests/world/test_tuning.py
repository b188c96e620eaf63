"""hypervisor/tuning on a real libvirt node with the test guest: CPU shares and quota, memory hard and soft
limits and block I/O limits applied live to a running guest, seen in the domain's cgroup files (cgroup v1
under the node's own cgroup subtree) and in libvirt's readback; the QEMU process is never replaced."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import libvirt_qemu
import pytest

from libvirt_operator.api.qos import CpuQos, DiskIoTune, MemoryQos
from libvirt_operator.hypervisor import Host, HypervisorError, tuning
from libvirt_operator.hypervisor.tuning import BlockIoTune
from localenv.fixtures_libvirt import guest_domain_xml, wait_for_marker

from .hypervisor_support import qemu_pid, run

pytestmark = pytest.mark.world

MI = 2**20
BURN_SECONDS = 10.0
UNLIMITED_BYTES_V1 = 9223372036854771712  # memory.limit_in_bytes when unlimited (v1, 4 KiB pages)


@pytest.fixture(scope="module")
def node(libvirt_nodes):
    return libvirt_nodes[0]


@pytest.fixture(scope="module")
def host(node):
    h = Host(node.uri)
    run(h.connect())
    yield h
    run(h.close())


@pytest.fixture
def running(host, node, guest_image, storage_dir):
    """A booted test guest with a qcow2 disk (vda); yields (Guest, domain name)."""
    name = f"tune-{uuid.uuid4().hex[:8]}"
    disk = storage_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    console = storage_dir / f"{name}.console.log"
    guest = run(host.define(guest_domain_xml(guest_image, name, console, disk=disk)))
    run(guest.start())
    wait_for_marker(console, guest_image.ready_marker, timeout=180)
    yield guest, name
    conn = node.connect()
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    finally:
        conn.close()
    disk.unlink(missing_ok=True)


def cgroups(node, name: str) -> dict[str, Path]:
    found = tuning.domain_cgroup_dirs(node.inside("/sys/fs/cgroup"), name)
    assert {"cpu", "memory"} <= set(found), f"domain cgroups of {name} not found: {found}"
    return found


def read(path: Path) -> str:
    return path.read_text().strip()


def domain_id(guest) -> int:
    return run(guest.call(lambda d: d.ID()))


def burn(guest) -> None:
    """Starts a busy loop inside the guest (through qemu-ga's guest-exec)."""
    cmd = {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", "while :; do :; done"]}}
    deadline = time.monotonic() + 60
    while True:
        try:
            run(guest.call(lambda d: libvirt_qemu.qemuAgentCommand(d, json.dumps(cmd), 10, 0)))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def cpu_use(cpu_dir: Path, cpuacct_dir: Path | None, guest) -> float:
    """Host CPUs the domain used over BURN_SECONDS (cpuacct.usage of its cgroup, and libvirt's cpu_time)."""
    usage = (cpuacct_dir / "cpuacct.usage") if cpuacct_dir else None
    t0, u0, c0 = time.monotonic(), int(read(usage)) if usage else 0, run(guest.cpu_time_ns())
    time.sleep(BURN_SECONDS)
    t1, u1, c1 = time.monotonic(), int(read(usage)) if usage else 0, run(guest.cpu_time_ns())
    libvirt_view = (c1 - c0) / 1e9 / (t1 - t0)
    if usage:
        cgroup_view = (u1 - u0) / 1e9 / (t1 - t0)
        assert abs(cgroup_view - libvirt_view) < 0.05, (cgroup_view, libvirt_view)
        return cgroup_view
    return libvirt_view


def test_node_capabilities_here(node):
    caps = tuning.detect(2)
    assert caps.cgroup_version == 1 and caps.shares_range == (2, 262144)
    assert caps.network_mechanism == "tc" and not caps.libvirt_bandwidth and not caps.vlan


def test_cpu_shares_and_quota_live_in_cgroup_and_libvirt(running, node):
    guest, name = running
    pid, dom_id = qemu_pid(name), domain_id(guest)
    cpu = cgroups(node, name)["cpu"]
    run(guest.apply_cpu(CpuQos(limit_percent=25), shares=512, default_shares=1024))
    assert read(cpu / "cpu.shares") == "512"
    assert (read(cpu / "cpu.cfs_period_us"), read(cpu / "cpu.cfs_quota_us")) == ("100000", "25000")
    live, config = run(guest.scheduler()), run(guest.scheduler(live=False))
    assert (live.cpu_shares, live.global_period, live.global_quota) == (512, 100000, 25000)
    assert (config.cpu_shares, config.global_quota) == (512, 25000)  # survives a restart
    # removed: default shares, no quota
    run(guest.apply_cpu(CpuQos(), shares=None, default_shares=1024))
    assert read(cpu / "cpu.shares") == "1024" and read(cpu / "cpu.cfs_quota_us") == "-1"
    assert run(guest.scheduler()).global_quota in (-1, 0, 17592186044415)
    assert (qemu_pid(name), domain_id(guest)) == (pid, dom_id)


@pytest.fixture
def node_first(node):
    """The node's own cgroup gets the highest cpu.shares on the host for the test: other tests' work on this
    2-CPU machine then cannot starve the guest below its quota (a quota is a ceiling, not a guarantee)."""
    cpu_dirs = [Path(d) for d in node.cgroup_dirs if (Path(d) / "cpu.shares").exists()]
    before = [read(d / "cpu.shares") for d in cpu_dirs]
    for d in cpu_dirs:
        (d / "cpu.shares").write_text("262144")
    yield
    for d, value in zip(cpu_dirs, before, strict=True):
        (d / "cpu.shares").write_text(value)


def test_q10_a_burning_guest_is_held_to_its_limit_and_released_live(running, node, node_first):
    guest, name = running
    pid = qemu_pid(name)
    dirs = cgroups(node, name)
    burn(guest)
    run(guest.apply_cpu(CpuQos(limit_percent=25), shares=None, default_shares=1024))
    limited = cpu_use(dirs["cpu"], dirs.get("cpuacct"), guest)
    print(f"\nMEASURED limit 25 %: {limited:.1%} of a host CPU")
    assert abs(limited - 0.25) <= 0.15 * 0.25, f"{limited:.1%} of a host CPU under a 25 % limit"
    run(guest.apply_cpu(CpuQos(), shares=None, default_shares=1024))
    lifted = cpu_use(dirs["cpu"], dirs.get("cpuacct"), guest)
    print(f"MEASURED limit lifted: {lifted:.1%} of a host CPU")
    assert lifted > 1.6 * limited, f"lifting the limit: {limited:.1%} -> {lifted:.1%}"
    assert qemu_pid(name) == pid


def test_memory_hard_and_soft_limits_live(running, node):
    guest, name = running
    pid, dom_id = qemu_pid(name), domain_id(guest)
    mem = cgroups(node, name)["memory"]
    run(guest.apply_memory(MemoryQos(hard_limit="1Gi", soft_limit="200Mi")))
    assert int(read(mem / "memory.limit_in_bytes")) == 1024 * MI
    assert int(read(mem / "memory.soft_limit_in_bytes")) == 200 * MI
    params = run(guest.memory_parameters())
    assert (params.hard_limit_kib, params.soft_limit_kib) == (1024 * 1024, 200 * 1024)
    assert run(guest.memory_parameters(live=False)).hard_limit_kib == 1024 * 1024
    # Q7: the guarantee lifts the soft limit to itself
    run(guest.apply_memory(MemoryQos(hard_limit="1Gi", soft_limit="100Mi", guarantee="240Mi")))
    assert int(read(mem / "memory.soft_limit_in_bytes")) == 240 * MI
    # removed: unlimited again
    run(guest.apply_memory(MemoryQos()))
    assert int(read(mem / "memory.limit_in_bytes")) >= UNLIMITED_BYTES_V1
    params = run(guest.memory_parameters())
    assert (params.hard_limit_kib, params.soft_limit_kib) == (None, None)
    assert (qemu_pid(name), domain_id(guest)) == (pid, dom_id)


def test_block_io_tune_live_and_removed(running):
    guest, name = running
    pid = qemu_pid(name)
    tune = BlockIoTune.from_api(DiskIoTune(total_bytes_per_second=4 * MI, read_iops=300, write_iops=100))
    run(guest.set_block_io_tune("vda", tune))
    assert run(guest.block_io_tune("vda")) == tune
    assert run(guest.block_io_tune("vda", live=False)) == tune
    run(guest.set_block_io_tune("vda", BlockIoTune()))
    assert run(guest.block_io_tune("vda")) == BlockIoTune()
    assert qemu_pid(name) == pid


def test_a_value_out_of_range_is_refused_by_libvirt_with_a_reason(running):
    guest, _ = running
    with pytest.raises(HypervisorError) as err:
        run(guest.set_scheduler(global_period=10))  # below the 1000 us minimum
    assert err.value.reason and err.value.message


# -- contention: shares (Q9) and floors (Q11/Q12) between two burning guests on one host CPU --------------

@pytest.fixture
def two_burning(host, node, guest_image, storage_dir):
    """Two booted test guests, vCPU and emulator pinned to host CPU 0, each burning CPU; yields [Guest, Guest]."""
    import libvirt

    conn = node.connect()
    names, guests = [], []
    try:
        for i in range(2):
            name = f"tune{i}-{uuid.uuid4().hex[:6]}"
            console = storage_dir / f"{name}.console.log"
            names.append(name)
            guests.append((run(host.define(guest_domain_xml(guest_image, name, console))), console))
            run(guests[-1][0].start())
        cpus = conn.getInfo()[2]
        cpu0 = tuple(i == 0 for i in range(cpus))
        for guest, console in guests:
            wait_for_marker(console, guest_image.ready_marker, timeout=240)
            dom = conn.lookupByName(guest.name)
            dom.pinVcpuFlags(0, cpu0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            dom.pinEmulator(cpu0, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            burn(guest)
        yield [g for g, _ in guests]
    finally:
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()


def shares_of_time(guests) -> list[float]:
    """Each guest's part of the CPU time the two used over BURN_SECONDS."""
    before = [run(g.cpu_time_ns()) for g in guests]
    time.sleep(BURN_SECONDS)
    used = [run(g.cpu_time_ns()) - b for g, b in zip(guests, before, strict=True)]
    return [u / sum(used) for u in used]


def test_q9_q12_shares_and_a_reservation_under_contention(two_burning):
    a, b = two_burning
    pids = [qemu_pid(a.name), qemu_pid(b.name)]
    # Q9: shares 4:1
    run(a.apply_cpu(CpuQos(shares=4096), shares=4096, default_shares=1024))
    run(b.apply_cpu(CpuQos(shares=1024), shares=1024, default_shares=1024))
    part_a, part_b = shares_of_time([a, b])
    print(f"\nMEASURED shares 4096:1024 -> {part_a / part_b:.2f}:1")
    assert 4 * 0.7 <= part_a / part_b <= 4 * 1.3
    # Q12: a reservation of 60 % of the CPU for b, against a's much larger weight (node = the one pinned CPU)
    qos = {"a": CpuQos(shares=4096), "b": CpuQos(reservation_percent=60)}
    plan = tuning.floor_shares(qos, 1)
    for guest, key in ((a, "a"), (b, "b")):
        run(guest.apply_cpu(qos[key], shares=plan.shares[key], default_shares=1024))
    _, reserved = shares_of_time([a, b])
    print(f"MEASURED reservation 60 % (shares {plan.shares}) -> b gets {reserved:.1%}")
    assert reserved >= 0.6 * (1 - 0.15)
    # cancelled: back to the weights alone
    plan = tuning.floor_shares({"a": CpuQos(shares=4096), "b": CpuQos()}, 1)
    for guest, key in ((a, "a"), (b, "b")):
        run(guest.apply_cpu(CpuQos(), shares=plan.shares[key], default_shares=1024))
    _, cancelled = shares_of_time([a, b])
    print(f"MEASURED reservation cancelled -> b gets {cancelled:.1%}")
    assert cancelled < 0.35
    assert [qemu_pid(a.name), qemu_pid(b.name)] == pids


def test_q6_a_limit_below_usage_is_refused_and_growing_past_it_is_a_named_oom_kill(running, node):
    import libvirt

    guest, name = running
    pid = qemu_pid(name)
    mem = cgroups(node, name)["memory"]
    usage_kib = int(read(mem / "memory.usage_in_bytes")) // 1024
    with pytest.raises(HypervisorError) as err:  # cgroup v1 cannot shrink below what is in use
        run(guest.set_memory_parameters(hard_limit_kib=usage_kib // 2, soft_limit_kib=None))
    assert "Device or resource busy" in err.value.message
    assert run(guest.memory_parameters()).hard_limit_kib is None  # nothing was applied
    run(guest.set_memory_parameters(hard_limit_kib=usage_kib + 30 * 1024, soft_limit_kib=None))
    cmd = {"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": [
        "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=220"]}}
    run(guest.call(lambda d: libvirt_qemu.qemuAgentCommand(d, json.dumps(cmd), 10, 0)))
    deadline = time.monotonic() + 120
    while run(guest.call(lambda d: d.state()))[0] == libvirt.VIR_DOMAIN_RUNNING:
        assert time.monotonic() < deadline, "the guest outgrew its limit but kept running"
        time.sleep(0.5)
    assert run(guest.call(lambda d: d.state())) == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
    kills = [k for k in tuning.oom_kills(tuning.read_kernel_log()) if k.pid == pid]
    assert kills and kills[0].is_domain(name), "the kernel log names the memcg OOM kill of this QEMU"


def test_apply_qos_of_one_vm_and_nothing_when_the_node_cannot_honour_it(running, node):
    from libvirt_operator.api.qos import DiskQos, EffectiveQos, NicEffective

    guest, name = running
    pid = qemu_pid(name)
    caps = tuning.detect(2)
    qos = EffectiveQos(cpu=CpuQos(shares=300, limit_percent=50),
                       memory=MemoryQos(hard_limit="1Gi", soft_limit="100Mi", guarantee="200Mi"),
                       disks=[DiskQos(name="root", total_iops=100)])
    applied = run(tuning.apply_qos(guest, qos, caps, shares=None, disk_targets={"root": "vda"}))
    assert applied == {"cpu": {"shares": 300, "periodMicroseconds": 100000, "quotaMicroseconds": 50000},
                       "memory": {"hardLimitKib": 1024 * 1024, "softLimitKib": 200 * 1024},
                       "disks": {"root": {"total_iops_sec": 100}}}
    # the node cannot tag VLANs: nothing at all is applied, the reason names the field
    with pytest.raises(tuning.QosUnsupported) as err:
        run(tuning.apply_qos(guest, EffectiveQos(cpu=CpuQos(shares=5000),
                                                 network=[NicEffective(name="nic0", vlan=42)]),
                             caps, shares=None, disk_targets={"root": "vda"}))
    assert err.value.reason == "HostUnsupported" and "VLAN 42" in str(err.value)
    assert run(guest.scheduler()).cpu_shares == 300
    # everything removed
    applied = run(tuning.apply_qos(guest, EffectiveQos(), caps, shares=None, disk_targets={"root": "vda"},
                                   tuned_before=["root"]))
    assert applied["cpu"] == {"shares": 1024, "periodMicroseconds": 100000, "quotaMicroseconds": None}
    assert applied["memory"] == {"hardLimitKib": None, "softLimitKib": None}
    assert run(guest.block_io_tune("vda")) == BlockIoTune()
    assert qemu_pid(name) == pid
