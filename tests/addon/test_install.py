"""The chart as a real cluster add-on: installed by helm into a real API server, its identities
run the real controller and agents, and the agents' node restriction holds.

See world.py for the world (own control plane with an audit log, own libvirt nodes).
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from localenv import identities
from localenv.controlplane import REPO_DIR
from tests.addon.world import AGENT_SA, CHART, CONTROLLER_SA, NAMESPACE, RELEASE, AddonWorld

pytestmark = pytest.mark.world

SAMPLE = REPO_DIR / "examples" / "vm-demo.yaml"
VMS = "virtualmachines"


# --- helpers ------------------------------------------------------------------------------------


def sample_text(addon: AddonWorld) -> str:
    """examples/vm-demo.yaml for this world: its storage root and the guest's kernel file."""
    text = SAMPLE.read_text().replace("@STORAGE@", str(addon.dir / "storage"))
    return text.replace("/images/vmlinuz", f"/images/{addon.image.kernel.name}")


def vms_api(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def get_vm(api: client.ApiClient, name: str, namespace: str = "default") -> dict:
    return vms_api(api).get_namespaced_custom_object(meta.GROUP, meta.VERSION, namespace, VMS, name)


def wait_vm(world: AddonWorld, name: str, check: Callable[[dict], bool], what: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        vm = get_vm(world.api, name)
        if check(vm):
            return vm
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: no {what} within {timeout:.0f}s; status {vm.get('status')}\n{world.logs()}")
        time.sleep(0.2)


def phase(vm: dict) -> str | None:
    return (vm.get("status") or {}).get("phase")


def denied(call: Callable[[], object]) -> ApiException:
    """Run an API call that must be refused; return the refusal."""
    with pytest.raises(ApiException) as err:
        call()
    assert err.value.status == 403, f"expected 403, got {err.value.status}: {err.value.body}"
    return err.value


def message(exc: ApiException) -> str:
    return json.loads(exc.body)["message"]


def annotate(api: client.ApiClient, name: str, value: str, plural: str = VMS, manager: str | None = None) -> dict:
    return vms_api(api).patch_namespaced_custom_object(
        meta.GROUP, meta.VERSION, "default", plural, name, {"metadata": {"annotations": {"addon-test": value}}},
        field_manager=manager)


def apply_status(api: client.ApiClient, name: str, status: dict, manager: str, force: bool = True) -> dict:
    """A server-side apply of the VM's status, as the agents write it."""
    body = {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine", "metadata": {"name": name}, "status": status}
    return vms_api(api).patch_namespaced_custom_object_status(
        meta.GROUP, meta.VERSION, "default", VMS, name, body, field_manager=manager, force=force,
        _content_type="application/apply-patch+yaml")


def legacy_token_kubeconfig(world: AddonWorld) -> Path:
    """A kubeconfig with a long-lived Secret token of the agent ServiceAccount (filled by the token controller)."""
    core = client.CoreV1Api(world.api)
    secret = client.V1Secret(type="kubernetes.io/service-account-token", metadata=client.V1ObjectMeta(
        name="agent-legacy-token", annotations={"kubernetes.io/service-account.name": AGENT_SA}))
    core.create_namespaced_secret(NAMESPACE, secret)
    deadline = time.monotonic() + 20
    while not (data := core.read_namespaced_secret("agent-legacy-token", NAMESPACE).data or {}).get("token"):
        assert time.monotonic() < deadline, "the token controller did not fill the Secret"
        time.sleep(0.1)
    token = base64.b64decode(data["token"]).decode()
    return identities.write_token_kubeconfig(world.dir / "identities" / "agent-legacy.kubeconfig", world.cp.server,
                                             world.cp.pki / "ca.crt", token, "agent-legacy")


def renew(api: client.ApiClient, lease: str, holder: str) -> object:
    """A heartbeat as the agent sends it: a merge patch without a prior read."""
    now = datetime.now(UTC).isoformat()
    return client.CoordinationV1Api(api).patch_namespaced_lease(
        lease, NAMESPACE, {"spec": {"holderIdentity": holder, "renewTime": now, "leaseDurationSeconds": 40}})


# --- scenario fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_agents(addon: AddonWorld) -> dict[str, str]:
    """Lease name -> holder, once every agent has renewed its Lease (the controller places VMs only then)."""
    wanted = {f"{meta.AGENT_LEASE_PREFIX}{n.name}" for n in addon.nodes}
    deadline = time.monotonic() + 30
    while True:
        leases = client.CoordinationV1Api(addon.api).list_namespaced_lease(NAMESPACE).items
        held = {lease.metadata.name: lease.spec.holder_identity for lease in leases}
        if wanted <= set(held):
            return held
        if time.monotonic() > deadline:
            raise AssertionError(f"agent leases: {held}\n{addon.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def demo_vm(addon: AddonWorld, live_agents) -> dict:
    """The README's sample VM, applied by kubectl as a user would, taken to Running by the chart's identities."""
    manifest = sample_text(addon)
    manifest = manifest.replace('"console=ttyS0 quiet loglevel=0"', json.dumps(addon.image.cmdline))
    began = time.monotonic()
    addon.kubectl("apply", "-f", "-", input=manifest)
    vm = wait_vm(addon, "demo", lambda vm: phase(vm) == "Running", "phase Running")
    addon.timings["sample VM to Running"] = time.monotonic() - began
    return vm


@pytest.fixture(scope="module")
def pinned_vms(addon: AddonWorld, live_agents) -> dict[str, dict]:
    """A stopped VM pinned to each node (placed there, taken over by that node's agent)."""
    base = yaml.safe_load(sample_text(addon))
    names = {}
    for node in ("node-a", "node-b"):
        body = json.loads(json.dumps(base))
        body["metadata"]["name"] = f"pinned-{node}"
        body["spec"].update(nodeName=node, powerState="Stopped")
        vms_api(addon.api).create_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", VMS, body)
        names[node] = body["metadata"]["name"]
    return {node: wait_vm(addon, name, lambda vm: phase(vm) == "Stopped" and
                          meta.AGENT_FINALIZER in vm["metadata"].get("finalizers", []), "agent takeover")
            for node, name in names.items()}


# --- tests --------------------------------------------------------------------------------------


def test_helm_install_creates_crds_rbac_and_policies(addon: AddonWorld):
    status = json.loads(addon.helm("status", RELEASE, "--namespace", NAMESPACE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert addon.install_seconds < 30, f"helm install took {addon.install_seconds:.1f}s"

    ext = client.ApiextensionsV1Api(addon.api)
    for path in sorted((REPO_DIR / "crds").glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        conditions = {c.type: c.status for c in ext.read_custom_resource_definition(name).status.conditions}
        assert conditions.get("Established") == "True", f"{name}: {conditions}"

    rbac = client.RbacAuthorizationV1Api(addon.api)
    core = client.CoreV1Api(addon.api)
    for sa in (CONTROLLER_SA, AGENT_SA):
        core.read_namespaced_service_account(sa, NAMESPACE)
        assert rbac.read_cluster_role_binding(sa).subjects[0].name == sa
        assert rbac.read_namespaced_role_binding(sa, NAMESPACE).subjects[0].name == sa
    for svc in (f"{CONTROLLER_SA}-metrics", f"{AGENT_SA}-metrics"):
        assert [p.name for p in core.read_namespaced_service(svc, NAMESPACE).spec.ports] == ["metrics"]

    apps = client.AppsV1Api(addon.api)
    assert apps.read_namespaced_deployment(CONTROLLER_SA, NAMESPACE).spec.template.spec.service_account_name \
        == CONTROLLER_SA
    ds = apps.read_namespaced_daemon_set(AGENT_SA, NAMESPACE)
    node_env = next(e for e in ds.spec.template.spec.containers[0].env if e.name == "NODE_NAME")
    assert node_env.value_from.field_ref.field_path == "spec.nodeName"

    adm = client.AdmissionregistrationV1Api(addon.api)
    for policy in (f"{AGENT_SA}-vms", f"{AGENT_SA}-leases"):
        assert adm.read_validating_admission_policy(policy).spec.failure_policy == "Fail"
        binding = adm.read_validating_admission_policy_binding(policy)
        assert binding.spec.policy_name == policy and binding.spec.validation_actions == ["Deny"]


def test_embedded_mode_objects_accepted_by_the_api_server(addon: AddonWorld):
    """The embedded-mode DaemonSet (native libvirtd sidecar) is valid for the real API server."""
    rendered = addon.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", "v1.34.0",
                          "--set", "agent.libvirt.mode=embedded", "--show-only", "templates/agent-daemonset.yaml")
    ds = yaml.safe_load(rendered.stdout)
    sidecar = ds["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always" and sidecar["securityContext"]["privileged"] is True
    done = addon.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=rendered.stdout)
    accepted = json.loads(done.stdout)["spec"]["template"]["spec"]
    assert accepted["initContainers"][0]["restartPolicy"] == "Always"


def test_tokens_carry_the_identity_the_policy_relies_on(addon: AddonWorld):
    """Verified on the real API server: a Pod-bound token authenticates with the Pod's node."""
    for node in ("node-a", "node-b"):
        with addon.client_for(addon.kubeconfigs[f"agent-{node}"]) as api:
            me = identities.whoami(api)
        assert me["username"] == f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
        assert me["extra"][identities.NODE_NAME_EXTRA] == [node]
    with addon.client_for(addon.kubeconfigs["controller"]) as api:
        me = identities.whoami(api)
    assert me["username"] == f"system:serviceaccount:{NAMESPACE}:{CONTROLLER_SA}"
    assert identities.NODE_NAME_EXTRA not in me["extra"]


def test_sample_vm_runs_under_the_chart_identities(addon: AddonWorld, live_agents, demo_vm: dict):
    node = demo_vm["status"]["nodeName"]
    assert demo_vm["metadata"]["labels"][meta.NODE_LABEL] == node
    conditions = {c["type"]: c["status"] for c in demo_vm["status"]["conditions"]}
    assert conditions["Scheduled"] == "True" and conditions["Ready"] == "True"
    conn = libvirt.open(next(n for n in addon.nodes if n.name == node).uri)
    try:
        assert conn.lookupByUUIDString(demo_vm["metadata"]["uid"]).isActive()
    finally:
        conn.close()
    assert live_agents == {f"{meta.AGENT_LEASE_PREFIX}node-a": "node-a", f"{meta.AGENT_LEASE_PREFIX}node-b": "node-b"}
    for name, ref in addon.operator.processes.items():
        assert ref.running(), f"{name} died:\n{ref.log_tail()}"


def test_agent_may_only_modify_vms_of_its_own_node(addon: AddonWorld, pinned_vms: dict[str, dict]):
    own, other = pinned_vms["node-a"]["metadata"]["name"], pinned_vms["node-b"]["metadata"]["name"]
    with addon.client_for(addon.mint("test-agent-a", AGENT_SA, node="node-a")) as agent_a, \
            addon.client_for(addon.mint("test-agent-b", AGENT_SA, node="node-b")) as agent_b:
        annotate(agent_a, own, "a")  # its own node's VM: allowed
        annotate(agent_b, other, "b")

        refusal = denied(lambda: annotate(agent_a, other, "a"))
        assert f"{AGENT_SA}-vms" in message(refusal)
        assert 'placed on node "node-b", not on this agent\'s node "node-a"' in message(refusal)

        status_patch = {"status": {"phase": "Failed"}}
        refusal = denied(lambda: vms_api(agent_a).patch_namespaced_custom_object_status(
            meta.GROUP, meta.VERSION, "default", VMS, other, status_patch))
        assert 'placed on node "node-b"' in message(refusal)

        # Moving a VM onto (or off) its node is refused as well.
        relabel = {"metadata": {"labels": {meta.NODE_LABEL: "node-b"}}}
        refusal = denied(lambda: vms_api(agent_a).patch_namespaced_custom_object(
            meta.GROUP, meta.VERSION, "default", VMS, own, relabel))
        assert "may not change the node label" in message(refusal) and "of a VirtualMachine" in message(refusal)
        assert get_vm(addon.api, own)["metadata"]["labels"][meta.NODE_LABEL] == "node-a"

        # Each agent writes under its own field managers (<manager>@<node>): one that names another
        # node's manager is refused, even on its own VM (it would take over, or erase, that agent's fields).
        current = {"phase": phase(get_vm(addon.api, own))}
        refusal = denied(lambda: apply_status(agent_a, own, current, meta.agent_manager("node-b")))
        assert f'field manager "{meta.agent_manager("node-b")}" is not this agent\'s own' in message(refusal)
        assert "writes as <manager>@node-a" in message(refusal)
        denied(lambda: annotate(agent_a, own, "a", manager=meta.agent_jobs_manager("node-b")))  # a merge patch too
        denied(lambda: annotate(agent_a, own, "a", manager=meta.AGENT_MANAGER))  # the node-less name as well
        # Its own node's manager is accepted (a co-owner of the same value: the agent's own fields stay).
        apply_status(agent_a, own, current, "addon-test@node-a", force=False)
        annotate(agent_a, own, "a", manager="addon-test@node-a")

        # VMMigrations are held to the node in their label like VMs (the node that acts on one now).
        migration = {"apiVersion": meta.API_VERSION, "kind": "VMMigration",
                     "metadata": {"name": "addon-policy", "labels": {meta.NODE_LABEL: "node-b"}},
                     "spec": {"vmName": "no-such-vm-addon-policy"}}
        vms_api(addon.api).create_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "vmmigrations",
                                                          migration)
        try:
            refusal = denied(lambda: annotate(agent_a, "addon-policy", "a", plural="vmmigrations"))
            assert 'VMMigration default/addon-policy is placed on node "node-b"' in message(refusal)
            annotate(agent_b, "addon-policy", "b", plural="vmmigrations", manager=meta.agent_manager("node-b"))
        finally:
            vms_api(addon.api).delete_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "vmmigrations",
                                                              "addon-policy")

        # RBAC, not the policy, keeps agents from creating or deleting VMs.
        refusal = denied(lambda: vms_api(agent_a).delete_namespaced_custom_object(
            meta.GROUP, meta.VERSION, "default", VMS, own))
        assert "cannot delete resource" in message(refusal)

    # A token of the agent ServiceAccount that is not bound to a node may write nothing:
    # neither a TokenRequest token without a Pod nor a legacy Secret token.
    with addon.client_for(addon.mint("test-agent-unbound", AGENT_SA)) as unbound:
        refusal = denied(lambda: annotate(unbound, own, "x"))
        assert "bound to a Pod on a node" in message(refusal)
    with addon.client_for(legacy_token_kubeconfig(addon)) as legacy:
        refusal = denied(lambda: annotate(legacy, own, "x"))
        assert "bound to a Pod on a node" in message(refusal)

    # Other identities are not affected by the policy.
    annotate(addon.api, other, "admin")
    assert get_vm(addon.api, other)["metadata"]["annotations"]["addon-test"] == "admin"


def test_agent_may_only_write_its_own_lease(addon: AddonWorld, live_agents):
    own, other = f"{meta.AGENT_LEASE_PREFIX}node-a", f"{meta.AGENT_LEASE_PREFIX}node-b"
    with addon.client_for(addon.mint("test-agent-a-leases", AGENT_SA, node="node-a")) as agent_a:
        renew(agent_a, own, "node-a")

        refusal = denied(lambda: renew(agent_a, other, "node-b"))
        assert f"may only write its own Lease {own}, not {other}" in message(refusal)

        refusal = denied(lambda: renew(agent_a, own, "node-b"))  # claiming another node's liveness
        assert "held by the agent's node node-a" in message(refusal)

        body = client.V1Lease(metadata=client.V1ObjectMeta(name="lvo-agent-node-c"),
                              spec=client.V1LeaseSpec(holder_identity="node-c"))
        denied(lambda: client.CoordinationV1Api(agent_a).create_namespaced_lease(NAMESPACE, body))
        denied(lambda: client.CoordinationV1Api(agent_a).create_namespaced_lease("default", body))  # RBAC


def test_components_were_never_refused_and_rbac_holds_no_unused_rule(addon: AddonWorld, demo_vm, pinned_vms):
    """The audit log of the scenario: no request of the controller or an agent was refused, and every
    verb the chart grants them was used (apart from the few listed here with the reason why not)."""
    not_exercised = {
        # kopf observes namespaces only with namespace patterns (controller.watchNamespaces).
        ("controller", "namespaces", "list"), ("controller", "namespaces", "watch"),
        # An agent reads a VM by name only when recovering a domain its watch has not delivered.
        ("agent", "virtualmachines", "get"),
        # The controller reads a VM by name only to retry a placement (a label patch that conflicted, a
        # retry timer); whether the scenario's placements need one depends on timing.
        ("controller", "virtualmachines", "get"),
        # The controller writes a VMQosPolicy's status only when one exists; the scenario has none.
        ("controller", "vmqospolicies/status", "patch"),
        # The scenario takes no snapshot (tests/e2e/test_snapshots.py does): handing one over, the agent's
        # finalizer and the jobs' status writes.
        ("controller", "vmsnapshots", "get"), ("controller", "vmsnapshots", "patch"),
        ("controller", "vmsnapshots/status", "patch"),
        ("agent", "vmsnapshots", "get"), ("agent", "vmsnapshots", "patch"), ("agent", "vmsnapshots/status", "patch"),
        # Nor a migration (tests/e2e/test_migration*.py do): the controller's and the agents' VMMigration rules.
        *((component, "vmmigrations", verb) for component in ("controller", "agent")
          for verb in ("get", "list", "watch", "patch")),
        ("controller", "vmmigrations/status", "patch"), ("agent", "vmmigrations/status", "patch"),
    }
    owners = addon.process_token_ids()
    rendered = yaml.safe_load_all(addon.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                                             "--kube-version", "v1.34.0").stdout)
    granted = set()
    for doc in rendered:
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            granted |= {(component, res, verb) for rule in doc["rules"] for res in rule["resources"]
                        for verb in rule["verbs"]}
    # Events are posted in the background: read the audit log again until they show (or 30 s pass).
    deadline = time.monotonic() + 30
    while True:
        used, refused = _audited(addon, owners)
        unused = sorted(g for g in granted - not_exercised if (g[1], g[2]) not in used[g[0]])
        if not unused or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not refused, "requests refused:\n" + "\n".join(refused)

    assert not unused, f"granted but never used: {unused}; used: {dict(used)}"
    assert not_exercised <= granted, "the not-exercised list names rules the chart no longer grants"


def _audited(addon: AddonWorld, owners: dict) -> tuple[dict[str, set[tuple[str, str]]], list[str]]:
    """(component -> (resource, verb) answered, requests refused) from the audit log so far."""
    used: dict[str, set[tuple[str, str]]] = defaultdict(set)
    refused = []
    for event in addon.cp.audit_events():
        owner = owners.get(next(iter(event["user"].get("extra", {}).get("authentication.kubernetes.io/credential-id",
                                                                            [])), None))
        ref = event.get("objectRef")
        if owner is None or ref is None:
            continue
        component = "controller" if owner == "controller" else "agent"
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        code = event.get("responseStatus", {}).get("code", 0)
        if code == 403:
            refused.append(f"{owner}: {event['verb']} {resource} {ref.get('namespace', '')}/{ref.get('name', '')}")
        else:  # answered, if only by 404 (a lease renewed before it exists) or 409 (a stale placement)
            used[component].add((resource, event["verb"]))
    return used, refused
