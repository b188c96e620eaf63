"""`kubectl virsh` migration verbs against the real API server, without controller or agents: the
VMMigrations they create are accepted by the CRD's schema and CEL rules and hold what the command line
asked, migrate-cancel deletes the active one, --wait follows a status written here (as the agents would)
through a real watch, domjobinfo prints it; and the examples/vmmigration-*.yaml pass a server-side dry run.
The migrations themselves (with agents and libvirt) are tested in tests/e2e."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.cli import virsh
from localenv.cluster import install_crds

pytestmark = pytest.mark.world

REPO = Path(__file__).resolve().parents[2]
NS = "migrate-verbs"
MIGRATIONS = "vmmigrations"
IMG = "/var/lib/libvirt/images"


@pytest.fixture(scope="module")
def api(control_plane) -> client.CustomObjectsApi:
    install_crds(control_plane)
    core = client.CoreV1Api(control_plane.api_client())
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    return client.CustomObjectsApi(control_plane.api_client())


@pytest.fixture(scope="module")
def run(control_plane, api):
    """`kubectl virsh ARGS` in this process (as the kubectl-virsh console script runs it): (status, out, err)."""

    def call(capsys, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = virsh.run(["--kubeconfig", str(control_plane.kubeconfig), "-n", NS, *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def make_vm(api: client.CustomObjectsApi, name: str, node: str = "node-a", memory: str = "512Mi") -> dict:
    """A VM as the controller and its agent would leave it: labelled with its node, status Running there."""
    body = {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NS, "labels": {meta.NODE_LABEL: node}},
            "spec": {"powerState": "Running", "memory": {"size": memory},
                     "disks": [{"name": "root", "path": f"{IMG}/{name}.qcow2"},
                               {"name": "data", "path": f"{IMG}/{name}-data.qcow2"}]}}
    api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, "virtualmachines", body)
    return api.patch_namespaced_custom_object_status(meta.GROUP, meta.VERSION, NS, "virtualmachines", name,
                                                     {"status": {"phase": "Running", "nodeName": node}})


def get(api: client.CustomObjectsApi, name: str) -> dict | None:
    try:
        return api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, MIGRATIONS, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def set_status(api: client.CustomObjectsApi, name: str, status: dict) -> dict:
    return api.patch_namespaced_custom_object_status(meta.GROUP, meta.VERSION, NS, MIGRATIONS, name,
                                                     {"status": status})


def test_migrate_creates_what_was_asked_cancel_deletes_it_and_domjobinfo_shows_it(api, run, capsys):
    make_vm(api, "mv1")
    rc, out, err = run(capsys, "migrate", "mv1", "qemu+tcp://node-b/system", "--bandwidth", "32", "--timeout", "60",
                       "--no-auto-converge", "--name", "mv1-m1")
    assert rc == 0, err
    assert "mv1: migration mv1-m1 requested (live, to node node-b)" in out
    assert "completionTimeoutPerGiB 120" in err and "migrating to node node-b" in err
    s = get(api, "mv1-m1")["spec"]
    assert s == {"vmName": "mv1", "type": "Live", "targetNode": "node-b", "disks": [], "autoConverge": False,
                 "allowPostCopy": False, "bandwidthMibPerSecond": 32, "completionTimeoutPerGiB": 120,
                 "progressTimeoutSeconds": 150}  # with the CRD's defaults

    # One migration of a VM at a time (said before anything is created).
    rc, _, err = run(capsys, "migrate", "mv1", "node-b", "--name", "mv1-m2")
    assert rc == 1 and "has a migration in progress (mv1-m1)" in err and get(api, "mv1-m2") is None

    # domjobinfo: the active migration's progress, as an agent writes it.
    set_status(api, "mv1-m1", {"phase": "Running", "sourceNode": "node-a", "targetNode": "node-b", "step": "Migrate",
                               "progress": {"percent": 42, "dataTotalBytes": 1 << 30, "dataProcessedBytes": 440 << 20,
                                            "dataRemainingBytes": 584 << 20, "iteration": 2,
                                            "memoryDirtyRateBytesPerSecond": 3 << 20, "elapsedMilliseconds": 4520}})
    rc, out, _ = run(capsys, "domjobinfo", "mv1")
    assert rc == 0
    assert out.splitlines()[:7] == ["Job type:         Unbounded", "Operation:        Outgoing migration",
                                    "Time elapsed:     4520         ms", "Data processed:   440.000 MiB",
                                    "Data remaining:   584.000 MiB", "Data total:       1.000 GiB",
                                    "Dirty rate:       3.000 MiB/s"]
    assert "Phase:            Running, step Migrate" in out and "Progress:         42 %" in out

    # migrate-cancel deletes it (no agent here holds a finalizer: it is gone at once).
    rc, out, err = run(capsys, "migrate-cancel", "mv1", "--wait", "--wait-timeout", "60")
    assert rc == 0, err
    assert "mv1: migration mv1-m1 cancelled" in out and "mv1: on node node-a" in out
    assert get(api, "mv1-m1") is None
    rc, _, err = run(capsys, "migrate-cancel", "mv1")
    assert rc == 1 and "mv1 has no migration in progress" in err
    rc, out, _ = run(capsys, "domjobinfo", "mv1")
    assert out.strip() == "Job type:         None"


def test_whole_machine_and_blockcopy_manifests_pass_the_api_servers_rules(api, run, capsys):
    make_vm(api, "mv2")
    rc, out, err = run(capsys, "migrate", "mv2", "node-b", "--copy-storage-inc", "--destblock",
                       "vda:/var/lib/libvirt/local/mv2.qcow2,data:/var/lib/libvirt/local/mv2-data.qcow2",
                       "--name", "mv2-whole")
    assert rc == 0, err
    s = get(api, "mv2-whole")["spec"]
    assert s["type"] == "WholeMachine" and s["disks"] == [
        {"name": "root", "destinationPath": "/var/lib/libvirt/local/mv2.qcow2"},
        {"name": "data", "destinationPath": "/var/lib/libvirt/local/mv2-data.qcow2"}]
    # The Live spec refuses disks (the CRD's CEL rule), which the verb never sends: it refuses first.
    rc, _, err = run(capsys, "migrate", "mv2", "node-b", "--destblock", "vda=/x.qcow2")
    assert rc == 1 and "goes with --copy-storage-inc" in err
    api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, MIGRATIONS, "mv2-whole")

    rc, out, err = run(capsys, "blockcopy", "mv2", "vdb", f"{IMG}/moved/mv2-data.qcow2", "--shallow",
                       "--reuse-external", "--pivot", "--name", "mv2-bc")
    assert rc == 0, err
    assert f"block copy mv2-bc of disk data to {IMG}/moved/mv2-data.qcow2 requested" in out
    assert get(api, "mv2-bc")["spec"]["type"] == "Storage"
    assert get(api, "mv2-bc")["spec"]["disks"] == [{"name": "data", "destinationPath": f"{IMG}/moved/mv2-data.qcow2"}]
    # The VMMigration is immutable (the CRD's rule): a new one is the way to change it.
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, MIGRATIONS, "mv2-bc",
                                           {"spec": {"bandwidthMibPerSecond": 5}})
    assert refused.value.status == 422 and "immutable" in refused.value.body
    api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, MIGRATIONS, "mv2-bc")


def test_wait_follows_the_status_to_the_end_with_the_percent(api, run, capsys):
    """--wait --verbose through a real watch, the status written meanwhile as the agents and the controller would."""
    make_vm(api, "mv3")
    errors: list[BaseException] = []

    def agent() -> None:
        try:
            deadline = time.monotonic() + 60
            while get(api, "mv3-m") is None:
                assert time.monotonic() < deadline, "the verb created no VMMigration"
                time.sleep(0.05)
            for status in ({"phase": "PreChecking", "sourceNode": "node-a", "targetNode": "node-b"},
                           {"phase": "Running", "step": "Migrate", "progress": {"percent": 10}},
                           {"phase": "Running", "step": "Migrate", "progress": {"percent": 73}},
                           {"phase": "HandingOver", "progress": {"percent": 100, "downtimeMilliseconds": 31}},
                           {"phase": "Succeeded", "durationMilliseconds": 2100}):
                time.sleep(0.2)
                set_status(api, "mv3-m", status)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    writer = threading.Thread(target=agent)
    writer.start()
    rc, out, err = run(capsys, "migrate", "mv3", "node-b", "--name", "mv3-m", "--wait", "--verbose",
                       "--wait-timeout", "120")
    writer.join()
    assert not errors, errors
    assert rc == 0, err
    assert "mv3: migration mv3-m Succeeded: running on node-b (downtime 31 ms, took 2100 ms)" in out
    assert "  mv3-m: step Migrate" in err and "Migration: [100 %]" in err
    # Each percent the watch delivered was said once, in order (a fast writer may skip some).
    said = [line for line in err.splitlines() if line.startswith("Migration: [")]
    assert said == sorted(set(said), key=said.index) and said[-1] == "Migration: [100 %]", said

    # A failure ends the wait with exit 1 and the reason.
    def fail() -> None:
        deadline = time.monotonic() + 60
        while get(api, "mv3-f") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        set_status(api, "mv3-f", {"phase": "Failed", "conditions": [
            {"type": "Ready", "status": "False", "reason": "TargetUnavailable", "message": "no live agent on node-b",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]})

    api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, NS, MIGRATIONS, "mv3-m")
    writer = threading.Thread(target=fail)
    writer.start()
    rc, _, err = run(capsys, "migrate", "mv3", "node-b", "--name", "mv3-f", "--wait", "--wait-timeout", "120")
    writer.join()
    assert rc == 1 and "mv3: migration mv3-f Failed: TargetUnavailable: no live agent on node-b" in err


@pytest.mark.parametrize("name", ["vmmigration-live.yaml", "vmmigration-storage.yaml",
                                  "vmmigration-whole-machine.yaml"])
def test_the_examples_pass_a_server_side_dry_run(control_plane, api, name):
    text = (REPO / "examples" / name).read_text().replace("@STORAGE@", "/var/lib/libvirt/images")
    done = subprocess.run([str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig),
                           "apply", "--dry-run=server", "-f", "-"], input=text, text=True, capture_output=True)
    assert done.returncode == 0, (name, done.stdout, done.stderr)
    assert "(server dry run)" in done.stdout, done.stdout
