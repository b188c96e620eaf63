"""The hypervisor layer (Host, Guest, events) against real libvirtd + QEMU (TCG) nodes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import libvirt_qemu
import pytest

from libvirt_operator.hypervisor import ConnectionEvent, DiskSource, Host, HypervisorError, PowerState, events
from localenv.fixtures_libvirt import guest_domain_xml, wait_for_marker
from localenv.nodes import start_nodes

from .hypervisor_support import (
    EventLog,
    background_loop,
    domain_event,
    lifecycle,
    process_exit,
    process_gone,
    qemu_pid,
    run,
)

pytestmark = pytest.mark.world

BOOT_TIMEOUT = 120.0
STOP_LATENCY = 2.0  # seconds from QEMU's exit to the lifecycle STOPPED event
REAPED_TO_EVENT = 0.5  # seconds from the QEMU zombie being reaped to that event


def unique(prefix: str = "hv") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def without_agent_channel(xml: str) -> str:
    root = ET.fromstring(xml)
    devices = root.find("devices")
    for channel in devices.findall("channel"):
        devices.remove(channel)
    return ET.tostring(root, encoding="unicode")


def with_empty_cdrom(xml: str) -> str:
    root = ET.fromstring(xml)
    root.find("devices").append(ET.fromstring(
        "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"))
    return ET.tostring(root, encoding="unicode")


def purge(uri: str, name: str) -> None:
    """Destroys and undefines `name` with plain libvirt (independent of the code under test)."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    finally:
        conn.close()


class Booted:
    """A test guest defined through Host.define and started through Guest.start."""

    def __init__(self, guest, console_log, log: EventLog, marker: str):
        self.guest, self.console_log, self.log, self.marker = guest, console_log, log, marker

    def boots(self) -> int:
        return self.console_log.read_text(errors="replace").count(self.marker)

    async def wait_marker(self, count: int) -> float:
        return await asyncio.to_thread(wait_for_marker, self.console_log, self.marker, BOOT_TIMEOUT, count)

    async def wait_agent(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.guest.agent_ping(1):
            assert time.monotonic() < deadline, "guest agent did not answer"
            await asyncio.sleep(0.2)


# -- fixtures --------------------------------------------------------------------------------


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
def event_log(host):
    log = EventLog()
    unsubscribe = host.subscribe(log)
    yield log
    unsubscribe()


@pytest.fixture
def define(host, node, guest_image, storage_dir):
    """define(xml_transform=None, **kw) -> (Guest, console_log) for a fresh test guest."""
    names = []

    def make(transform=lambda xml: xml, **kwargs):
        name = unique()
        names.append(name)
        console_log = storage_dir / f"{name}.console.log"
        xml = transform(guest_domain_xml(guest_image, name, console_log, **kwargs))
        return run(host.define(xml)), console_log

    yield make
    for name in names:
        purge(node.uri, name)


@pytest.fixture
def booted(define, event_log, guest_image):
    """A started guest that has printed its ready marker and answers the agent."""
    guest, console_log = define()
    b = Booted(guest, console_log, event_log, guest_image.ready_marker)

    async def boot():
        await guest.start()
        waited = await b.wait_marker(1)
        await b.wait_agent()
        print(f"\nTIMING boot to marker: {waited:.2f} s")

    run(boot())
    return b


# -- tests -----------------------------------------------------------------------------------


def test_event_loop_is_bound_once(host):
    loop = background_loop()
    assert events.registered_loop() is loop
    events.register_event_loop(loop)  # the same loop again: accepted
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="another asyncio loop"):
            events.register_event_loop(other)
    finally:
        other.close()


def test_host_info_describes_the_node(host):
    info = run(host.info())
    conn = libvirt.open(host.uri)
    try:
        assert info.libvirt_version == "9.0.0" == "{}.{}.{}".format(*_split(conn.getLibVersion()))
        assert info.hypervisor_version == "{}.{}.{}".format(*_split(conn.getVersion()))
        assert info.hypervisor_version.startswith("7.2.")
    finally:
        conn.close()
    assert info.hostname == os.uname().nodename
    with open("/proc/meminfo") as meminfo:
        total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo.read()).group(1))
    assert info.memory_bytes == total_kib * 1024
    assert info.cpus == os.cpu_count()
    kvm_caps = subprocess.run(["virsh", "-c", host.uri, "domcapabilities", "--virttype", "kvm"],
                              capture_output=True, text=True)
    assert info.has_kvm == (kvm_caps.returncode == 0 and "<domain>kvm</domain>" in kvm_caps.stdout)
    if info.has_kvm:
        assert os.path.exists("/dev/kvm")


def _split(version: int) -> tuple[int, int, int]:
    return version // 1_000_000, version // 1000 % 1000, version % 1000


def test_define_start_emits_started_and_lookups_find_the_guest(host, define, event_log):
    guest, _ = define()
    assert run(guest.state()) == PowerState("shutoff", "unknown")
    mark = event_log.mark()
    run(guest.start())
    started = run(event_log.wait_for(lifecycle(guest.uuid, "started"), after=mark))
    assert started.name == guest.name
    assert started.detail == libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED
    assert run(guest.state()) == PowerState("running", "booted")
    assert run(host.lookup(guest.uuid)).name == guest.name
    assert run(host.lookup_by_name(guest.name)).uuid == guest.uuid
    assert guest.uuid in {g.uuid for g in run(host.domains())}
    assert run(host.lookup(str(uuid.uuid4()))) is None
    assert run(host.lookup_by_name(unique("absent"))) is None


def test_agent_connects_after_boot_and_answers_ping(define, event_log, guest_image):
    guest, console_log = define()
    assert run(guest.agent_connected()) is False  # shut off: no live channel state
    mark = event_log.mark()
    run(guest.start())
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)

    async def agent_up():
        deadline = time.monotonic() + 30
        while not await guest.agent_connected():
            assert time.monotonic() < deadline, "agent channel never became connected"
            await asyncio.sleep(0.2)

    run(agent_up())
    connected = run(event_log.wait_for(domain_event(
        guest.uuid, "agent-lifecycle", libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED), after=mark))
    assert connected.name == guest.name
    assert run(guest.agent_ping()) is True


def test_guest_powering_itself_off_emits_stopped_within_2s(booted):
    guest, log = booted.guest, booted.log
    pid = qemu_pid(guest.name)
    mark = log.mark()

    async def scenario():
        exit_watch = asyncio.ensure_future(process_exit(pid))
        # The guest shuts itself down: qemu-ga runs poweroff; libvirt's shutdown API is not used.
        # qemu-ga sends no reply to guest-shutdown, so the command ends in an agent error.
        command = asyncio.ensure_future(guest.call(
            lambda d: libvirt_qemu.qemuAgentCommand(d, '{"execute":"guest-shutdown"}', 5, 0)))
        exited = await asyncio.wait_for(exit_watch, 30)
        reaped = await process_gone(pid)
        stopped = await log.wait_for(lifecycle(guest.uuid, "stopped"), after=mark)
        await asyncio.gather(command, return_exceptions=True)
        return exited, reaped, stopped

    exited, reaped, stopped = run(scenario())
    latency, reap_delay = stopped.at - exited, reaped - exited
    print(f"\nTIMING QEMU exit -> STOPPED event: {latency:.3f} s "
          f"(exit -> reaped by its parent: {reap_delay:.3f} s; reaped -> event: {stopped.at - reaped:.3f} s)")
    assert stopped.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    # libvirt reports STOPPED once the QEMU pid is gone (it polls every 200 ms); our bridge adds ~nothing.
    assert stopped.at - reaped < REAPED_TO_EVENT
    assert latency < STOP_LATENCY
    assert run(guest.state()) == PowerState("shutoff", "shutdown")


@pytest.mark.parametrize("mode", ["agent", "acpi"])
def test_shutdown_modes_power_off(booted, mode):
    guest, log = booted.guest, booted.log
    mark = log.mark()
    started = time.monotonic()
    run(guest.shutdown(mode))
    stopped = run(log.wait_for(lifecycle(guest.uuid, "stopped"), timeout=60, after=mark))
    print(f"\nTIMING {mode} shutdown to STOPPED event: {time.monotonic() - started:.2f} s")
    assert stopped.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    run(log.wait_for(lifecycle(guest.uuid, "shutdown"), timeout=1, after=mark))  # the guest's own request
    assert run(guest.state()) == PowerState("shutoff", "shutdown")


def test_reboot_by_agent_emits_reboot_and_boots_again(booted):
    guest, log = booted.guest, booted.log
    mark = log.mark()
    run(guest.reboot("agent"))
    reboot = run(log.wait_for(domain_event(guest.uuid, "reboot"), after=mark))
    assert reboot.name == guest.name
    run(booted.wait_marker(2))
    assert run(guest.state()).state == "running"
    assert not any(lifecycle(guest.uuid, "stopped")(e) for e in log.events[mark:])


def test_reset_restarts_the_guest_without_stopping_it(booted):
    guest, log = booted.guest, booted.log
    mark = log.mark()
    run(guest.reset())
    run(log.wait_for(domain_event(guest.uuid, "reboot"), after=mark))
    run(booted.wait_marker(2))
    assert booted.boots() == 2
    assert run(guest.state()).state == "running"
    assert not any(lifecycle(guest.uuid, "stopped")(e) for e in log.events[mark:])


def test_suspend_and_resume(booted):
    guest, log = booted.guest, booted.log
    mark = log.mark()
    run(guest.suspend())
    run(log.wait_for(lifecycle(guest.uuid, "suspended"), after=mark))
    assert run(guest.state()) == PowerState("paused", "user")
    run(guest.resume())
    run(log.wait_for(lifecycle(guest.uuid, "resumed"), after=mark))
    assert run(guest.state()) == PowerState("running", "unpaused")
    assert run(guest.agent_ping()) is True


def test_destroy_reports_destroyed(booted):
    guest, log = booted.guest, booted.log
    mark = log.mark()
    run(guest.destroy())
    stopped = run(log.wait_for(lifecycle(guest.uuid, "stopped"), after=mark))
    assert stopped.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED
    assert run(guest.state()).reason == "destroyed"
    assert run(guest.state()).state == "shutoff"


def test_guest_without_agent_channel(define, guest_image):
    guest, console_log = define(without_agent_channel)
    run(guest.start())
    wait_for_marker(console_log, guest_image.ready_marker, BOOT_TIMEOUT)
    for call in (guest.shutdown("agent"), guest.reboot("agent")):
        with pytest.raises(HypervisorError) as err:
            run(call)
        assert err.value.reason == "GuestAgentUnavailable"
        assert "agent is not configured" in err.value.message
        assert err.value.code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
    assert run(guest.agent_ping()) is False
    assert run(guest.agent_connected()) is False
    assert run(guest.state()).state == "running"


def test_errors_carry_reasons_and_libvirt_messages(host, define):
    guest, _ = define()
    with pytest.raises(HypervisorError) as err:
        run(guest.suspend())
    assert (err.value.reason, err.value.code) == ("OperationInvalid", libvirt.VIR_ERR_OPERATION_INVALID)
    assert "not running" in err.value.message

    run(guest.start())
    with pytest.raises(HypervisorError) as err:
        run(guest.start())
    assert err.value.reason == "OperationInvalid"
    assert "already running" in err.value.message

    with pytest.raises(HypervisorError) as err:
        run(host.define("<domain type='qemu'><name>x</name></domain>"))
    assert err.value.reason == "DefineFailed"
    assert err.value.message  # libvirt's text, e.g. "an os <type> must be specified"

    with pytest.raises(ValueError):
        run(guest.shutdown("force"))

    run(guest.destroy())
    run(guest.undefine())
    with pytest.raises(HypervisorError) as err:
        run(guest.state())
    assert err.value.reason == "DomainNotFound"


def test_disk_sources_and_xml(define, storage_dir):
    disk = storage_dir / f"{unique('disk')}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    guest, _ = define(with_empty_cdrom, disk=disk)
    assert run(guest.disk_sources()) == [
        DiskSource(target="vda", path=str(disk), device="disk", read_only=False),
        DiskSource(target="hdc", path=None, device="cdrom", read_only=True),
    ]
    assert ET.fromstring(run(guest.xml(inactive=True))).findtext("name") == guest.name
    run(guest.start())
    live = ET.fromstring(run(guest.xml()))
    assert live.get("id") is not None  # only a running domain's live XML has an id
    assert ET.fromstring(run(guest.xml(inactive=True))).get("id") is None
    migratable = ET.fromstring(run(guest.xml(migratable=True)))
    # Migratable XML leaves out what the destination adds itself: ids, aliases, the implicit pci-root.
    assert live.find(".//alias") is not None and live.find(".//controller[@model='pci-root']") is not None
    assert migratable.get("id") is None
    assert migratable.find(".//alias") is None
    assert migratable.find(".//controller[@model='pci-root']") is None


def test_undefine_is_not_blocked_by_snapshot_metadata(host, define, storage_dir):
    disk = storage_dir / f"{unique('disk')}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    guest, _ = define(disk=disk)
    conn = libvirt.open(host.uri)
    try:
        dom = conn.lookupByUUIDString(guest.uuid)
        dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
        with pytest.raises(libvirt.libvirtError, match="snapshot"):
            dom.undefine()  # plain undefine refuses: the flags are what makes ours work
    finally:
        conn.close()
    run(guest.undefine())
    assert run(host.lookup(guest.uuid)) is None


def test_a_failing_subscriber_does_not_starve_the_others(host, define):
    guest, _ = define()
    seen_sync, seen_async = EventLog(), EventLog()

    def broken(_event):
        raise RuntimeError("subscriber bug")

    async def slow_async(event):
        await asyncio.sleep(0)
        seen_async(event)

    unsubscribe = [host.subscribe(broken), host.subscribe(seen_sync), host.subscribe(slow_async)]
    try:
        run(guest.start())
        run(seen_sync.wait_for(lifecycle(guest.uuid, "started")))
        run(seen_async.wait_for(lifecycle(guest.uuid, "started")))
    finally:
        for u in unsubscribe:
            u()


def test_host_reconnects_after_libvirtd_restart(world_dir, guest_image, storage_dir):
    """A node of its own, so restarting it disturbs no other test's domains."""
    (node,) = start_nodes(world_dir, [unique("hv-restart")])
    name = unique()
    console_log = storage_dir / f"{name}.console.log"
    host = Host(node.uri, connections=3)  # the whole pool reconnects
    log = EventLog()
    try:
        host.subscribe(log)
        run(host.connect())
        guest = run(host.define(guest_domain_xml(guest_image, name, console_log)))

        restart = getattr(node, "restart", None)
        if restart is None:  # LibvirtNode has no restart: stop (kills its daemons) and start
            def restart():
                node.stop()
                node.start()
        mark = log.mark()
        restarted_at = time.monotonic()
        restart()
        lost = run(log.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.state == "lost", after=mark))
        restored = run(log.wait_for(
            lambda e: isinstance(e, ConnectionEvent) and e.state == "restored", timeout=60, after=mark))
        print(f"\nTIMING restart took {time.monotonic() - restarted_at:.2f} s; lost ({lost.reason}), "
              f"restored {restored.at - lost.at:.2f} s after lost")
        assert lost.uri == restored.uri == node.uri
        assert host.connected

        # The Guest from before the restart works on the new connection, and events flow.
        mark = log.mark()
        run(guest.start())
        started = run(log.wait_for(lifecycle(guest.uuid, "started"), after=mark))
        assert started.name == name
        run(guest.destroy())
        run(log.wait_for(lifecycle(guest.uuid, "stopped"), after=mark))
    finally:
        run(host.close())
        node.stop()


def test_a_pool_of_connections_spreads_domains_and_keeps_each_on_one(node, guest_image, storage_dir):
    """libvirtd serves 5 calls per connection at a time: a Host with a pool sends each domain's calls to
    one connection of it, chosen by UUID, and the domains of a node spread over the pool."""
    host = Host(node.uri, connections=4)
    names = [unique("pool") for _ in range(8)]
    try:
        run(host.connect())
        guests = [run(host.define(guest_domain_xml(guest_image, n, storage_dir / f"{n}.console.log")))
                  for n in names]
        conns = [run(g.call(lambda d: d.connect())) for g in guests]
        assert len({id(c) for c in conns}) >= 2, "the domains all went to one connection"
        for g, c in zip(guests, conns, strict=True):
            again = run(host.lookup(g.uuid))
            assert run(again.call(lambda d: d.connect())) is c, "a domain's calls stay on its connection"
            assert run(g.state()).state == "shutoff"
    finally:
        for n in names:
            found = run(host.lookup_by_name(n))
            if found is not None:
                run(found.undefine())
        run(host.close())


def test_calls_during_an_outage_raise_connection_lost(world_dir):
    (node,) = start_nodes(world_dir, [unique("hv-outage")])
    host = Host(node.uri, max_backoff=0.5)
    log = EventLog()
    try:
        host.subscribe(log)
        run(host.connect())
        node.stop()
        run(log.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.state == "lost"))
        assert not host.connected
        with pytest.raises(HypervisorError) as err:
            run(host.domains())
        assert err.value.reason == "ConnectionLost"
        node.start()
        run(log.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.state == "restored", timeout=60))
        assert run(host.domains()) == []

        # Closing while it is trying to reconnect ends the retries for good.
        node.stop()
        mark = log.mark()
        run(log.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.state == "lost"))
        time.sleep(1)  # a few failed attempts
        run(host.close(), timeout=10)
        node.start()
        time.sleep(2)
        assert not host.connected
        assert [e for e in log.events[mark:] if isinstance(e, ConnectionEvent)] == log.events[mark:mark + 1]
    finally:
        run(host.close())
        node.stop()
