"""`kubectl virsh` through the real kubectl binary (the plugin found on PATH), the real API server,
controller, agents, libvirtd and QEMU. The Argo CD health checks are run on the live objects
along the way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from tests.e2e.vmtools import NS, condition, manifest
from tests.unit.test_argocd_health import health

PLUGIN_DIR = Path(sys.executable).parent  # the venv's bin, where pip puts console scripts
BOOT = 180  # seconds a TCG guest may take to boot (or reboot) on a loaded two-core machine


@pytest.fixture(scope="module")
def virsh(cluster):
    """Runs `kubectl virsh ARGS` with the plugin on PATH; returns the CompletedProcess."""
    if not os.access(PLUGIN_DIR / "kubectl-virsh", os.X_OK):
        pytest.fail(f"no kubectl-virsh in {PLUGIN_DIR}: install the project (pip install -e .)")
    kubectl = str(cluster.control_plane.bin_dir / "kubectl")

    def run(*args: str, kubeconfig_env: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{PLUGIN_DIR}:{os.environ.get('PATH', '')}"}
        env.pop("KUBECONFIG", None)
        if kubeconfig_env:
            env["KUBECONFIG"] = str(cluster.control_plane.kubeconfig)
        return subprocess.run([kubectl, "virsh", *args], env=env, capture_output=True, text=True, timeout=timeout)

    return run


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def running(vms, cluster, name, **spec) -> dict:
    vms.create(manifest(cluster, name, **spec))
    vms.wait_phase(name, "Running", BOOT)
    return vms.wait(name, lambda v: vms.boots(v) >= 1, "the guest's ready marker", BOOT)


def with_agent(vms, name) -> dict:
    return vms.wait(name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", BOOT)


VERBS = ("list", "start", "shutdown", "destroy", "reboot", "reset", "suspend", "resume", "restart", "setvcpus",
         "setmem", "vcpupin", "emulatorpin", "attach-disk", "detach-disk", "attach-interface", "detach-interface",
         "change-media", "blockresize", "domblklist", "domiflist")


def test_kubectl_finds_the_plugin(virsh):
    out = ok(virsh("--help"))
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(VERBS) <= listed, set(VERBS) - listed


def test_list_shows_node_phase_and_reason(virsh, vms, cluster, vm_name):
    vm = running(vms, cluster, vm_name)
    node = vm["status"]["nodeName"]
    out = ok(virsh("list", "-n", NS))
    assert out.splitlines()[0].split() == ["NAME", "NODE", "PHASE", "DESIRED", "READY", "REASON"]
    row = next(line.split() for line in out.splitlines() if line.split()[0] == vm_name)
    assert row == [vm_name, node, "Running", "Running", "True", "Running"]
    # --kubeconfig instead of KUBECONFIG, all namespaces, wide
    out = ok(virsh("list", "-A", "-o", "wide", "--kubeconfig", str(cluster.control_plane.kubeconfig),
                   kubeconfig_env=False))
    assert out.splitlines()[0].split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == [NS, vm_name] for line in out.splitlines())
    assert health("VirtualMachine", vms.get(vm_name)) == ("Healthy", f"Running on {node}")


def test_shutdown_agent_then_start(virsh, vms, cluster, vm_name):
    running(vms, cluster, vm_name)
    with_agent(vms, vm_name)
    out = ok(virsh("shutdown", vm_name, "--mode", "agent", "--wait", "-n", NS))
    assert f"{vm_name}: agent shutdown requested" in out and f"{vm_name}: Stopped on" in out
    vm = vms.get(vm_name)
    assert vm["spec"]["powerState"] == "Stopped" and vm["spec"]["shutdown"]["mode"] == "agent"
    assert vms.domain(vm).state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]
    assert any(e.reason == "ShuttingDown" and "agent" in e.message for e in vms.events(vm_name))
    assert health("VirtualMachine", vm) == ("Healthy", "Stopped as the spec asks")

    out = ok(virsh("start", vm_name, "--wait"))
    assert f"{vm_name}: Running on" in out
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", BOOT)
    assert vms.domain(vm).isActive()


def test_reboot_agent_runs_once_per_call(virsh, vms, cluster, vm_name):
    running(vms, cluster, vm_name)
    with_agent(vms, vm_name)
    out = ok(virsh("reboot", vm_name, "--mode", "agent", "--wait"))
    assert "agent reboot requested" in out and f"{vm_name}: Succeeded" in out
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", BOOT)
    first = vm["status"]["lastReboot"]["id"]
    assert first.startswith("kv-") and vm["spec"]["reboot"] == {"id": first, "mode": "agent"}

    with_agent(vms, vm_name)
    ok(virsh("reboot", vm_name, "--mode", "agent", "--wait"))
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 3, "a third boot", BOOT)
    assert vm["status"]["lastReboot"]["id"] != first


def test_start_after_the_guest_stopped_on_its_own(virsh, vms, cluster, vm_name):
    vm = with_agent(vms, running(vms, cluster, vm_name, restartPolicy="Never")["metadata"]["name"])
    # From outside the operator, through the guest agent: the guest powers itself off.
    vms.domain(vm).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    vm = vms.wait(vm_name, lambda v: v["status"].get("haltedGeneration") == v["metadata"]["generation"],
                  "the VM halted at its generation", 60)
    st, message = health("VirtualMachine", vm)
    assert st == "Degraded" and "GuestShutdown" in message
    generation = vm["metadata"]["generation"]

    result = virsh("start", vm_name, "--wait")
    out = ok(result)
    assert "stopped on its own" in result.stderr and f"{vm_name}: Running on" in out
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", BOOT)
    assert vm["metadata"]["generation"] == generation + 2 and vm["spec"]["powerState"] == "Running"
    assert health("VirtualMachine", vms.get(vm_name))[0] == "Healthy"


def test_suspend_resume_reset_destroy(virsh, vms, cluster, vm_name):
    vm = running(vms, cluster, vm_name)
    ok(virsh("suspend", vm_name, "--wait"))
    assert vms.domain(vm).state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert health("VirtualMachine", vms.get(vm_name)) == ("Healthy", "Paused as the spec asks")
    ok(virsh("resume", vm_name, "--wait"))
    assert vms.domain(vm).state()[0] == libvirt.VIR_DOMAIN_RUNNING

    out = ok(virsh("reset", vm_name, "--wait", "--id", "plugin-r1"))
    assert "reset requested (id plugin-r1)" in out and "Succeeded" in out
    vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a boot after the reset", BOOT)

    out = ok(virsh("destroy", vm_name, "--wait"))
    assert "forced power-off requested" in out
    assert vms.domain(vm).state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]


def test_refusals_and_failures_are_clear(virsh, vms, cluster, vm_name):
    result = virsh("start", "no-such-vm")
    assert result.returncode == 1 and 'virtualmachine "no-such-vm" not found in namespace "default"' in result.stderr

    img = cluster.image
    running(vms, cluster, vm_name, boot={"kernel": {"kernel": str(img.kernel), "initrd": str(img.initrd),
                                                    "cmdline": f"{img.cmdline} lvo.agent=off"}})
    result = virsh("resume", vm_name)
    assert result.returncode == 1 and "is not paused" in result.stderr

    # No guest agent in this guest: the agent shutdown fails, --wait says why and exits 1.
    result = virsh("shutdown", vm_name, "--mode", "agent", "--wait", "--timeout", "60")
    assert result.returncode == 1 and "GuestAgentUnavailable" in result.stderr, result.stderr
    # Argo CD sees it Degraded too: the agent re-sends the request until shutdown.timeoutSeconds (60 s here), so
    # its refusal shows only on the passes that re-send; at the latest the timeout is reported.
    vms.wait(vm_name, lambda v: health("VirtualMachine", v)[0] == "Degraded"
             and health("VirtualMachine", v)[1].startswith(("GuestAgentUnavailable", "ShutdownTimeout")),
             "Degraded health", 120)

    ok(virsh("destroy", vm_name, "--wait"))


# -- the device and resource verbs (issue 7): each edits the spec ---------------------------------

def refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1 and message in result.stderr, \
        f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def stopped(vms, cluster, name, **spec) -> dict:
    """A VM that never boots (cheap): defined on its node, Stopped as its spec asks."""
    vms.create(manifest(cluster, name, powerState="Stopped", **spec))
    return vms.wait(name, lambda v: (v.get("status") or {}).get("phase") == "Stopped"
                    and condition(v, "Ready").get("status") == "True", "Stopped and Ready", 60)


def image(cluster, name: str, size: str = "64M") -> Path:
    path = cluster.storage_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def iso(cluster, name: str, label: str) -> Path:
    src = cluster.storage_dir / f"{name}-iso"
    src.mkdir(exist_ok=True)
    (src / "hello.txt").write_text("hello\n")
    path = cluster.storage_dir / f"{name}.iso"
    subprocess.run(["genisoimage", "-quiet", "-V", label, "-o", str(path), str(src)], check=True)
    return path


def test_setvcpus_and_setmem_reach_the_definition_of_a_stopped_vm(virsh, vms, cluster, vm_name):
    vm = stopped(vms, cluster, vm_name, cpu={"vcpus": 1, "maxVcpus": 2}, memory={"size": "160Mi", "maxSize": "256Mi"})
    out = ok(virsh("setvcpus", vm_name, "2", "--wait"))
    assert f"{vm_name}: vCPUs 1 -> 2 requested" in out and "2 vCPUs applied" in out
    vm = vms.get(vm_name)
    assert vm["spec"]["cpu"]["vcpus"] == 2
    assert vms.domain(vm).vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2

    out = ok(virsh("setmem", vm_name, "229376", "--wait"))  # KiB, as virsh takes it: 224Mi
    assert "memory 160Mi -> 229376Ki requested" in out and "applied" in out
    assert vms.get(vm_name)["spec"]["memory"] == {"size": "229376Ki", "maxSize": "256Mi"}

    generation = vms.get(vm_name)["metadata"]["generation"]
    refused(virsh("setvcpus", vm_name, "3"), "above cpu.maxVcpus (2)")
    refused(virsh("setmem", vm_name, "512Mi"), "above memory.maxSize (256Mi)")
    assert vms.get(vm_name)["metadata"]["generation"] == generation  # nothing was patched


def test_pinning_verbs_edit_the_spec(virsh, vms, cluster, vm_name):
    stopped(vms, cluster, vm_name, cpu={"vcpus": 2})
    ok(virsh("vcpupin", vm_name, "1", "0"))
    ok(virsh("vcpupin", vm_name, "0", "0-1,^1"))
    ok(virsh("emulatorpin", vm_name, "0"))
    assert vms.get(vm_name)["spec"]["cpu"]["pinning"] == {
        "vcpus": [{"vcpu": 0, "cpuset": "0"}, {"vcpu": 1, "cpuset": "0"}], "emulator": "0"}
    rows = [line.split() for line in ok(virsh("vcpupin", vm_name)).splitlines()]
    assert rows == [["VCPU", "CPU", "AFFINITY"], ["0", "0"], ["1", "0"]]
    ok(virsh("vcpupin", vm_name, "0", "--clear"))
    assert vms.get(vm_name)["spec"]["cpu"]["pinning"]["vcpus"] == [{"vcpu": 1, "cpuset": "0"}]
    refused(virsh("vcpupin", vm_name, "2", "0"), "has no vCPU 2")


def test_disk_verbs_edit_the_spec(virsh, vms, cluster, vm_name):
    data = image(cluster, f"{vm_name}-data")
    stopped(vms, cluster, vm_name, disks=[{"name": "data", "path": str(data)}, {"name": "cd", "device": "cdrom"}])
    extra = image(cluster, f"{vm_name}-extra")
    out = ok(virsh("attach-disk", vm_name, str(extra), "vdc", "--name", "extra", "--wait"))
    assert "disk extra attached" in out
    disk = next(d for d in vms.get(vm_name)["spec"]["disks"] if d["name"] == "extra")
    assert disk == {"name": "extra", "device": "disk", "path": str(extra), "bus": "virtio", "target": "vdc",
                    "readOnly": False}
    # --wait saw the generation applied: the agent reports the stopped VM's disks from its definition
    rows = [line.split() for line in ok(virsh("domblklist", vm_name)).splitlines()]
    assert rows[0] == ["TARGET", "SOURCE"] and ["vdc", str(extra)] in rows and ["vda", str(data)] in rows, rows
    details = [line.split() for line in ok(virsh("domblklist", vm_name, "--details")).splitlines()]
    assert details[0] == ["NAME", "DEVICE", "BUS", "TARGET", "FORMAT", "CAPACITY", "SOURCE", "BACKING"]
    assert next(r for r in details if r[0] == "extra")[:5] == ["extra", "disk", "virtio", "vdc", "qcow2"]
    refused(virsh("attach-disk", vm_name, str(extra), "vdd"), "already attached as disk 'extra'")
    ok(virsh("detach-disk", vm_name, "vdc", "--wait"))
    assert [d["name"] for d in vms.get(vm_name)["spec"]["disks"]] == ["data", "cd"]
    assert "vdc" not in ok(virsh("domblklist", vm_name))

    media = iso(cluster, vm_name, "KVMEDIA")
    ok(virsh("change-media", vm_name, "cd", str(media)))
    assert vms.get(vm_name)["spec"]["disks"][1]["path"] == str(media)
    refused(virsh("change-media", vm_name, "cd", str(media), "--insert"), "already has media")
    ok(virsh("change-media", vm_name, "cd", "--eject"))
    assert "path" not in vms.get(vm_name)["spec"]["disks"][1]
    refused(virsh("change-media", vm_name, "data", str(media)), "not a cdrom")

    ok(virsh("blockresize", vm_name, "data", "128Mi"))
    assert vms.get(vm_name)["spec"]["disks"][0]["size"] == "128Mi"
    refused(virsh("blockresize", vm_name, "data", "64Mi"), "disks never shrink")
    refused(virsh("blockresize", vm_name, "cd", "1Gi"), "is a cdrom")


def test_interface_verbs_edit_the_spec(virsh, vms, cluster, vm_name):
    stopped(vms, cluster, vm_name)
    out = ok(virsh("attach-interface", vm_name, "user", "--mac", "52:54:00:4B:56:01", "--wait"))
    assert "interface nic0 (user user-mode networking) attach requested" in out and "attached" in out
    assert vms.get(vm_name)["spec"]["interfaces"] == [
        {"name": "nic0", "type": "user", "mac": "52:54:00:4b:56:01", "model": "virtio"}]
    rows = [line.split() for line in ok(virsh("domiflist", vm_name)).splitlines()]
    assert rows[0] == ["INTERFACE", "NAME", "TYPE", "SOURCE", "MODEL", "MAC"]
    assert rows[1][1:] == ["nic0", "user", "-", "virtio", "52:54:00:4b:56:01"], rows  # reported, as --wait saw
    refused(virsh("attach-interface", vm_name, "user", "--mac", "52:54:00:4b:56:01"), "already used")
    refused(virsh("detach-interface", vm_name, "bridge"), "no interface of type bridge")
    ok(virsh("detach-interface", vm_name, "user", "--mac", "52:54:00:4b:56:01", "--wait"))
    assert vms.get(vm_name)["spec"]["interfaces"] == []


def test_restart_requests_a_cold_restart(virsh, vms, cluster, vm_name):
    running(vms, cluster, vm_name)
    out = ok(virsh("restart", vm_name, "--id", "plugin-restart-1"))
    assert "restart requested (id plugin-restart-1)" in out
    assert vms.get(vm_name)["spec"]["restart"] == {"id": "plugin-restart-1"}
    ok(virsh("destroy", vm_name, "--wait"))
    refused(virsh("restart", vm_name), "changes apply when it starts")


def test_wait_gives_up_at_its_timeout(virsh, vms, cluster, vm_name):
    vms.create(manifest(cluster, vm_name, powerState="Stopped", nodeName="no-such-node"))
    result = virsh("start", vm_name, "--wait", "--timeout", "2")
    refused(result, "timed out after 2s")


def test_wait_reestablishes_an_expired_watch(vms, cluster, vm_name):
    """--wait's watch starts at a resourceVersion the API server no longer has (410 Gone): it reads
    the VM again and decides on it."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    from libvirt_operator.api import meta
    from libvirt_operator.cli.client import VMClient
    from libvirt_operator.cli.outcomes import power_reached
    from libvirt_operator.cli.wait import wait

    vm = stopped(vms, cluster, vm_name)
    client = VMClient(cluster.control_plane.api_client(), NS)
    with pytest.raises(ApiException) as gone:  # the precondition: version 1 has expired
        for _ in watch.Watch().stream(client.api.list_namespaced_custom_object, meta.GROUP, meta.VERSION, NS,
                                      "virtualmachines", field_selector=f"metadata.name={vm_name}",
                                      resource_version="1", timeout_seconds=5):
            break
    assert gone.value.status == 410
    stale = {"metadata": {**vm["metadata"], "resourceVersion": "1"}, "spec": vm["spec"]}  # no status yet
    lines: list[str] = []
    outcome = wait(client, vm_name, power_reached("Stopped")(vm), 60, start=stale, progress=lines.append)
    assert outcome.ok and outcome.message.startswith("Stopped on "), (outcome, lines)
    assert lines == [f"  {vm_name}: no status yet"]  # the stale object was seen first, then the VM as read


def test_wait_follows_a_live_change_and_a_restart_required_one(virsh, vms, cluster, vm_name):
    """Against the live-update agent: a vCPU hot-add up to maxVcpus is applied live; a change that
    needs a restart ends --wait at once with RestartRequired, and `restart --wait` applies it."""
    running(vms, cluster, vm_name, cpu={"vcpus": 1, "maxVcpus": 2})
    out = ok(virsh("setvcpus", vm_name, "2", "--wait"))
    assert "2 vCPUs applied" in out
    assert vms.get(vm_name)["status"]["vcpus"] == 2

    # Raising the ceiling cannot be done live (and the plugin has no verb for it: kubectl patch).
    cluster.kubectl("patch", "lvm", vm_name, "-n", NS, "--type", "merge", "-p", '{"spec": {"cpu": {"maxVcpus": 3}}}')
    result = virsh("setvcpus", vm_name, "3", "--wait", "--timeout", "120")
    refused(result, "RestartRequired")
    assert "cpu.maxVcpus" in result.stderr, result.stderr
    out = ok(virsh("restart", vm_name, "--wait"))
    assert "restart requested" in out and f"{vm_name}: Succeeded" in out
    vm = vms.wait(vm_name, lambda v: (v["status"].get("observedGeneration") or 0) >= v["metadata"]["generation"]
                  and condition(v, "Ready").get("status") == "True", "the restarted VM Ready", BOOT)
    assert vm["status"]["vcpus"] == 3 and condition(vm, "RestartRequired").get("status") != "True"
