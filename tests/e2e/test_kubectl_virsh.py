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
    vms.wait_phase(name, "Running", 60)
    return vms.wait(name, lambda v: vms.boots(v) >= 1, "the guest's ready marker", 60)


def with_agent(vms, name) -> dict:
    return vms.wait(name, lambda v: condition(v, "AgentConnected").get("status") == "True", "AgentConnected", 60)


def test_kubectl_finds_the_plugin(virsh):
    out = ok(virsh("--help"))
    for verb in ("list", "start", "shutdown", "destroy", "reboot", "reset", "suspend", "resume"):
        assert verb in out


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
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", 60)
    assert vms.domain(vm).isActive()


def test_reboot_agent_runs_once_per_call(virsh, vms, cluster, vm_name):
    running(vms, cluster, vm_name)
    with_agent(vms, vm_name)
    out = ok(virsh("reboot", vm_name, "--mode", "agent", "--wait"))
    assert "agent reboot requested" in out and f"{vm_name}: Succeeded" in out
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", 60)
    first = vm["status"]["lastReboot"]["id"]
    assert first.startswith("kv-") and vm["spec"]["reboot"] == {"id": first, "mode": "agent"}

    with_agent(vms, vm_name)
    ok(virsh("reboot", vm_name, "--mode", "agent", "--wait"))
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 3, "a third boot", 60)
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
    vm = vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a second boot", 60)
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
    vms.wait(vm_name, lambda v: vms.boots(v) == 2, "a boot after the reset", 60)

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
    st, message = health("VirtualMachine", vms.get(vm_name))
    assert st == "Degraded" and message.startswith("GuestAgentUnavailable")

    ok(virsh("destroy", vm_name, "--wait"))
