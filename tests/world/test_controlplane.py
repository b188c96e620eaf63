"""The local control plane is a real, working Kubernetes API (real binaries, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localenv.controlplane import ControlPlane, build_binaries, pinned_versions
from localenv.kubenodes import LIBVIRT_NODE_LABEL, register_node

pytestmark = pytest.mark.world

VERSIONS = pinned_versions()


def meta(name: str, **fields: object) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(name=name, **fields)


def run_tool(cp: ControlPlane, tool: str, *args: str, home: Path | None = None) -> str:
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
    if home is not None:  # keep helm's cache/config out of the real home
        env |= {"HELM_CACHE_HOME": str(home), "HELM_CONFIG_HOME": str(home), "HELM_DATA_HOME": str(home)}
    done = subprocess.run([str(cp.bin_dir / tool), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def gone(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


@pytest.fixture
def namespace(kube_api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube_api).create_namespace(client.V1Namespace(metadata=meta(name)))
    yield name
    client.CoreV1Api(kube_api).delete_namespace(name)


def test_kubectl_reports_the_pinned_server_version(control_plane: ControlPlane) -> None:
    versions = json.loads(run_tool(control_plane, "kubectl", "version", "-o", "json"))
    assert versions["serverVersion"]["gitVersion"] == VERSIONS["KUBERNETES_VERSION"] == "v1.34.4"
    assert versions["clientVersion"]["gitVersion"] == VERSIONS["KUBERNETES_VERSION"]


def test_api_server_is_healthy(control_plane: ControlPlane) -> None:
    assert control_plane.healthy()
    assert "readyz check passed" in run_tool(control_plane, "kubectl", "get", "--raw", "/readyz?verbose")


def test_build_script_is_cached_and_reports_the_bin_dir_in_use(control_plane: ControlPlane) -> None:
    began = time.monotonic()
    assert build_binaries() == control_plane.bin_dir
    assert time.monotonic() - began < 5


def test_namespace_deletion_completes(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=meta(name)))
    core.create_namespaced_config_map(name, client.V1ConfigMap(metadata=meta("content")))
    core.delete_namespace(name)
    eventually(lambda: gone(lambda: core.read_namespace(name)), f"namespace {name} to be deleted")


def test_garbage_collector_deletes_dependents(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta("owner")))
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    dependent = client.V1ConfigMap(metadata=meta("dependent", owner_references=[ref]))
    core.create_namespaced_config_map(namespace, dependent)
    core.delete_namespaced_config_map("owner", namespace)
    eventually(lambda: gone(lambda: core.read_namespaced_config_map("dependent", namespace)), "dependent GC")


def test_default_service_account_appears(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    eventually(lambda: not gone(lambda: core.read_namespaced_service_account("default", namespace)), "SA")


def test_token_request_authenticates_and_rbac_limits_the_service_account(
    control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str
) -> None:
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=meta("agent")))
    rule = client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])
    rbac.create_namespaced_role(namespace, client.V1Role(metadata=meta("cm-reader"), rules=[rule]))
    binding = client.V1RoleBinding(
        metadata=meta("agent-cm-reader"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="agent", namespace=namespace)],
    )
    rbac.create_namespaced_role_binding(namespace, binding)
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    token = core.create_namespaced_service_account_token("agent", namespace, request).status.token

    config = client.Configuration(host=control_plane.server)
    config.ssl_ca_cert = str(control_plane.pki / "ca.crt")
    config.api_key = {"BearerToken": token}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    with client.ApiClient(config) as as_agent:
        review = client.AuthenticationV1Api(as_agent).create_self_subject_review(client.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:agent"
        client.CoreV1Api(as_agent).list_namespaced_config_map(namespace)  # granted
        for forbidden in (
            lambda: client.CoreV1Api(as_agent).list_namespaced_secret(namespace),
            lambda: client.CoreV1Api(as_agent).list_node(),
        ):
            with pytest.raises(ApiException) as denied:
                forbidden()
            assert denied.value.status == 403


def test_registered_node_is_listed_ready_by_kubectl(control_plane: ControlPlane, kube_api: client.ApiClient) -> None:
    register_node(kube_api, "lvo-node-a", 8 * 2**30, 4, {"topology.kubernetes.io/zone": "a"})
    register_node(kube_api, "lvo-node-a", 6 * 2**30, 2, {"topology.kubernetes.io/zone": "b"})  # idempotent
    assert "lvo-node-a   Ready" in run_tool(control_plane, "kubectl", "get", "nodes")

    node = json.loads(run_tool(control_plane, "kubectl", "get", "node", "lvo-node-a", "-o", "json"))
    assert node["metadata"]["labels"][LIBVIRT_NODE_LABEL] == "true"
    assert node["metadata"]["labels"]["topology.kubernetes.io/zone"] == "b"
    assert node["status"]["capacity"] == {"cpu": "2", "memory": str(6 * 2**30), "pods": "110"}
    assert node["status"]["allocatable"] == node["status"]["capacity"]
    assert not node["spec"].get("taints")


def test_helm_talks_to_the_cluster(control_plane: ControlPlane, tmp_path: Path) -> None:
    version = run_tool(control_plane, "helm", "version", "--template", "{{.Version}}", home=tmp_path)
    assert version == VERSIONS["HELM_VERSION"]
    run_tool(control_plane, "helm", "list", "--all-namespaces", home=tmp_path)


def test_cli_world_outlives_up_and_stops_from_a_fresh_process(tmp_path: Path) -> None:
    world = tmp_path / "cli-world"

    def cli(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "localenv", *args, "--world", str(world)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=180)

    up = cli("up")
    cp = ControlPlane.load(world)  # recorded even if `up` failed half-way
    try:
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={cp.kubeconfig}" in up.stdout
        assert cp.healthy()  # the `up` process has exited, the world has not
        assert cli("status").returncode == 0
        assert cli("kubeconfig").stdout.strip() == str(cp.kubeconfig)
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert cp.processes and not any(ref.running() for ref in cp.processes.values())
    assert cli("status").returncode == 1
