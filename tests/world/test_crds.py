"""crds/ is accepted by the real API server, and each kind round-trips with its defaults."""

import subprocess

import pytest
from kubernetes import client

from libvirt_operator.api import meta
from libvirt_operator.api.crds import KINDS
from localenv.cluster import install_crds

SAMPLES = {
    "VirtualMachine": {"memory": {"size": "128Mi"}, "disks": [{"name": "root", "path": "/var/lib/libvirt/images/a"}]},
    "VMSnapshot": {"vmName": "demo", "memory": True, "disks": [{"name": "root"}]},
    "VMMigration": {"vmName": "demo", "targetNode": "node-b"},
    "VMQosPolicy": {"selector": {"matchLabels": {"tier": "web"}}, "cpu": {"shares": 512}},
}
DEFAULTS = {
    "VirtualMachine": {"powerState": "Running", "domainType": "auto", "restartPolicy": "OnFailure",
                       "cpu": {"vcpus": 1}, "shutdown": {"mode": "acpi", "timeoutSeconds": 120,
                                                         "forceAfterTimeout": False}},
    "VMSnapshot": {"disks": [{"name": "root", "snapshot": "external", "reuseExisting": False}]},
    "VMMigration": {"type": "Live", "autoConverge": True, "allowPostCopy": False, "completionTimeoutPerGiB": 150,
                    "progressTimeoutSeconds": 150},
    "VMQosPolicy": {"priority": 0},
}


def contains(actual, expected) -> bool:
    """Whether `actual` has everything `expected` has (recursively; extra defaults allowed)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            contains(a, e) for a, e in zip(actual, expected, strict=True))
    return actual == expected


@pytest.fixture(scope="module")
def crds_installed(control_plane):
    install_crds(control_plane)


@pytest.mark.parametrize("kind", KINDS, ids=[k.kind for k in KINDS])
def test_each_kind_round_trips_with_defaults(control_plane, crds_installed, kind):
    api = client.CustomObjectsApi(control_plane.api_client())
    name = f"roundtrip-{kind.kind.lower()}"
    body = {"apiVersion": meta.API_VERSION, "kind": kind.kind,
            "metadata": {"name": name, "namespace": "default"}, "spec": SAMPLES[kind.kind]}
    api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", kind.plural, body)
    try:
        got = api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", kind.plural, name)
        assert contains(got["spec"], SAMPLES[kind.kind]), got["spec"]
        assert contains(got["spec"], DEFAULTS[kind.kind]), got["spec"]
        # The status subresource accepts what the models describe.
        phase = "Active" if kind.kind == "VMQosPolicy" else "Pending"
        status = {"phase": phase, "observedGeneration": 1}
        api.patch_namespaced_custom_object_status(meta.GROUP, meta.VERSION, "default", kind.plural, name,
                                                  {"status": status})
        got = api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", kind.plural, name)
        assert got["status"]["phase"] == phase
        # The model parses what the server returns.
        kind.model.model_validate({"spec": got["spec"], "status": got["status"]})
    finally:
        api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", kind.plural, name)


def test_printer_columns_show_phase_and_node(control_plane, crds_installed):
    kubectl = [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig)]
    out = subprocess.run([*kubectl, "get", "crd", "virtualmachines.virt.libvirt-operator.io", "-o",
                          "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Phase", "Node", "vCPUs", "Memory", "Ready", "Age"]
