"""Bad input is refused with a specific message, and nothing changes on any node."""

import json

import libvirt
import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.vmtools import condition, manifest

# (name, spec changes, words the API server's rejection must contain)
REJECTED_BY_SCHEMA = [
    ("zero-vcpus", {"cpu": {"vcpus": 0}}, "should be greater than or equal to 1"),
    ("memory-garbage", {"memory": {"size": "lots"}}, "spec.memory.size"),
    ("power-enum", {"powerState": "Sleeping"}, 'supported values: "Running", "Stopped", "Paused"'),
    ("max-vcpus-below", {"cpu": {"vcpus": 4, "maxVcpus": 2}}, "maxVcpus must be at least vcpus"),
    ("max-memory-below", {"memory": {"size": "256Mi", "maxSize": "128Mi"}},
     "memory.maxSize must be at least memory.size"),
    ("memory-tiny", {"memory": {"size": "1Mi"}}, "memory.size must be at least 16Mi"),
    ("agent-shutdown-no-agent", {"guestAgent": False, "shutdown": {"mode": "agent"}},
     "shutdown.mode 'agent' needs guestAgent: true"),
    ("agent-reboot-no-agent", {"guestAgent": False, "reboot": {"id": "r1", "mode": "agent"}},
     "reboot.mode 'agent' needs guestAgent: true"),
    ("disk-without-path", {"disks": [{"name": "root"}]}, "a disk of device 'disk' needs a path"),
    ("cdrom-on-virtio", {"disks": [{"name": "cd", "device": "cdrom", "bus": "virtio"}]},
     "a cdrom must be on bus sata, scsi, ide or usb"),
    ("bridge-without-source", {"interfaces": [{"name": "nic0", "type": "bridge"}]},
     "interfaces of type network or bridge need a source"),
    ("duplicate-disks", {"disks": [{"name": "a", "path": "/x/a"}, {"name": "a", "path": "/x/b"}]},
     "Duplicate value"),
    ("bad-mac", {"interfaces": [{"name": "nic0", "type": "user", "mac": "zz:00:00:00:00:00"}]},
     "spec.interfaces[0].mac"),
    ("zero-timeout", {"shutdown": {"timeoutSeconds": 0}}, "spec.shutdown.timeoutSeconds"),
    ("bad-request-id", {"reset": {"id": "two words"}}, "spec.reset.id"),
    ("relative-path", {"disks": [{"name": "a", "path": "images/a.qcow2"}]}, "spec.disks[0].path"),
]


@pytest.mark.parametrize(("case", "change", "expected"), REJECTED_BY_SCHEMA, ids=[c[0] for c in REJECTED_BY_SCHEMA])
def test_schema_and_cel_reject(vms, cluster, case, change, expected):
    with pytest.raises(ApiException) as err:
        vms.create(manifest(cluster, f"bad-{case}", **change))
    assert err.value.status == 422
    assert expected in json.loads(err.value.body)["message"]
    assert vms.get(f"bad-{case}") is None


@pytest.mark.parametrize(("spec", "expected"), [
    ({"domainType": "qemu"}, "spec.memory: Required value"),
    ({"memory": {"size": "64Mi"}}, "a VM needs a disk or a kernel to boot from"),
], ids=["no-memory", "no-boot-source"])
def test_missing_memory_or_boot_source_is_rejected(vms, cluster, spec, expected):
    body = manifest(cluster, "bad-empty")
    body["spec"] = spec
    with pytest.raises(ApiException) as err:
        vms.create(body)
    assert expected in json.loads(err.value.body)["message"]


def test_unknown_field_is_rejected_by_kubectl(cluster):
    body = manifest(cluster, "bad-unknown-field", cpus=2)
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.cpus"' in result.stderr


def test_node_name_cannot_change(vms, cluster, vm_name):
    vms.create(manifest(cluster, vm_name, nodeName=cluster.nodes[0].name, powerState="Stopped"))
    with pytest.raises(ApiException) as err:
        vms.patch_spec(vm_name, {"nodeName": cluster.nodes[1].name})
    assert "nodeName cannot be changed once set" in json.loads(err.value.body)["message"]


def _no_domain_anywhere(cluster, uid):
    for node in cluster.nodes:
        conn = libvirt.open(node.uri)
        try:
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByUUIDString(uid)
        finally:
            conn.close()


def test_unknown_node_is_reported(vms, cluster, vm_name):
    vm = vms.create(manifest(cluster, vm_name, nodeName="no-such-node"))
    vm = vms.wait(vm_name, lambda v: condition(v, "Scheduled").get("reason") == "NodeNotFound", "NodeNotFound", 30)
    assert "no-such-node" in condition(vm, "Scheduled")["message"]
    _no_domain_anywhere(cluster, vm["metadata"]["uid"])


def test_memory_above_every_node_is_reported(vms, cluster, vm_name):
    vm = vms.create(manifest(cluster, vm_name, memory={"size": "4Ti"}))
    vm = vms.wait(vm_name, lambda v: condition(v, "Scheduled").get("reason") == "InsufficientMemory",
                  "InsufficientMemory", 30)
    assert condition(vm, "Scheduled")["status"] == "False"
    _no_domain_anywhere(cluster, vm["metadata"]["uid"])


@pytest.mark.parametrize("where", ["outside", "dotdot", "kernel"])
def test_paths_outside_storage_roots_are_refused(vms, cluster, vm_name, where):
    root = cluster.storage_dir
    if where == "kernel":
        spec = {"boot": {"kernel": {"kernel": "/boot/../etc/shadow"}}}
    else:
        path = "/etc/passwd" if where == "outside" else f"{root}/../../etc/passwd"
        spec = {"disks": [{"name": "data", "path": path, "format": "raw"}]}
    vm = vms.create(manifest(cluster, vm_name, **spec))
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("reason") == "PathNotAllowed", "PathNotAllowed", 30)
    assert "outside the storage roots" in condition(vm, "Failure")["message"]
    assert vm["status"]["phase"] == "Failed"
    _no_domain_anywhere(cluster, vm["metadata"]["uid"])


def test_missing_disk_file_is_reported(vms, cluster, vm_name):
    missing = cluster.storage_dir / f"{vm_name}-nothing.qcow2"
    vm = vms.create(manifest(cluster, vm_name, disks=[{"name": "data", "path": str(missing)}]))
    vm = vms.wait(vm_name, lambda v: condition(v, "Failure").get("reason") == "FileNotFound", "FileNotFound", 30)
    assert str(missing) in condition(vm, "Failure")["message"]
    _no_domain_anywhere(cluster, vm["metadata"]["uid"])
    assert not missing.exists()
