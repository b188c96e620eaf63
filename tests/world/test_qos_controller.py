"""The controller resolves QoS against a real kube-apiserver: VMQosPolicies added, edited, out-prioritised,
tied and deleted change each VM's status.qos (value and source) and the policies' status (matched VMs,
phase, conflicts, conditions). Own control plane and controller process, like test_controller."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from libvirt_operator.api import meta
from libvirt_operator.kube import client as kube_client
from libvirt_operator.kube import resources
from localenv.cluster import wait_established
from localenv.controlplane import ControlPlane, expected_bin_dir, require_binaries

from .test_controller import OPERATOR_NS, Controller

pytestmark = pytest.mark.world

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0


def _crd_files(tmp: Path) -> list[Path]:
    return sorted((REPO / "crds").glob("*.yaml"))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[client.CustomObjectsApi]:
    require_binaries(expected_bin_dir())
    tmp = tmp_path_factory.mktemp("qos-world")
    cp = ControlPlane(tmp).start()
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)
    kube_client.api_client.cache_clear()
    api_client = cp.api_client()
    controller = Controller(cp.kubeconfig, tmp / "controller.log")
    kubectl = [str(cp.bin_dir / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    try:
        for f in _crd_files(tmp):
            subprocess.run([*kubectl, "apply", "--server-side", "-f", str(f)], check=True, capture_output=True)
            wait_established(kubectl, f)
        client.CoreV1Api(api_client).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NS)))
        controller.start()
        custom = client.CustomObjectsApi(api_client)
        custom.controller = controller  # restarted by a test
        yield custom
    finally:
        controller.stop()
        if controller.log.exists():
            print(controller.tail(30))
        api_client.close()
        cp.stop()
        kube_client.api_client.cache_clear()
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved


class Ns:
    def __init__(self, api: client.CustomObjectsApi):
        self.api = api
        self.name = f"qos-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(api.api_client).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.name)))

    def vm(self, name: str, labels: dict, qos: dict | None = None) -> None:
        spec = {"memory": {"size": "256Mi"}, "boot": {"kernel": {"kernel": "/images/vmlinuz"}},
                "interfaces": [{"name": "nic0", "type": "user"}]}
        if qos:
            spec["qos"] = qos
        self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, self.name, resources.VMS, {
            "apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
            "metadata": {"name": name, "labels": labels}, "spec": spec})

    def policy(self, name: str, spec: dict) -> None:
        self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, self.name, resources.QOS_POLICIES, {
            "apiVersion": meta.API_VERSION, "kind": "VMQosPolicy", "metadata": {"name": name}, "spec": spec})

    def patch(self, plural: str, name: str, body: dict) -> None:
        self.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, self.name, plural, name, body)

    def delete_policy(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, self.name, resources.QOS_POLICIES, name)

    def get(self, plural: str, name: str) -> dict:
        return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.name, plural, name)

    def wait(self, plural: str, name: str, check: Callable[[dict], bool], what: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            obj = self.get(plural, name)
            if check(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"{plural}/{name}: not {what} within {TIMEOUT} s: {obj.get('status')}")
            time.sleep(0.2)

    def wait_qos(self, vm: str, check: Callable[[dict], bool], what: str) -> dict:
        return self.wait(resources.VMS, vm, lambda o: check((o.get("status") or {}).get("qos") or {}), what)["status"][
            "qos"]

    def wait_policy(self, name: str, check: Callable[[dict], bool], what: str) -> dict:
        return self.wait(resources.QOS_POLICIES, name, lambda o: check(o.get("status") or {}), what)["status"]


def shares(q: dict):
    entry = (q.get("cpu") or {}).get("shares")
    return (entry["value"], entry["source"]) if entry else None


def cond(status: dict, type_: str) -> tuple[str, str] | None:
    for c in status.get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def test_policies_added_edited_outprioritised_tied_and_deleted(api):
    ns = Ns(api)
    ns.vm("web-1", {"app": "web"})
    ns.vm("web-2", {"app": "web"}, qos={"memory": {"softLimit": "128Mi"}})
    ns.vm("db-1", {"app": "db"})

    ns.policy("gold", {"selector": {"matchLabels": {"app": "web"}}, "priority": 10, "cpu": {"shares": 2048}})
    q = ns.wait_qos("web-1", lambda q: shares(q) == (2048, "policy/gold"), "given gold's shares")
    assert q["valid"] and q["policies"] == ["gold"]
    q2 = ns.wait_qos("web-2", lambda q: shares(q) == (2048, "policy/gold"), "given gold's shares")
    assert q2["memory"]["softLimit"] == {"value": "128Mi", "source": "spec"}
    st = ns.wait_policy("gold", lambda s: s.get("matchedVms") == 2, "matching 2 VMs")
    assert st["phase"] == "Active" and cond(st, "Matched") == ("True", "MatchingVMs")
    assert "qos" not in (ns.get(resources.VMS, "db-1").get("status") or {})  # nothing to say about db-1

    # a selector that matches nothing
    ns.policy("nobody", {"selector": {"matchLabels": {"app": "none"}}, "cpu": {"shares": 3}})
    st = ns.wait_policy("nobody", lambda s: s.get("phase") == "Idle", "idle")
    assert st["matchedVms"] == 0 and cond(st, "Matched") == ("False", "NoMatchingVMs")

    # edited
    ns.patch(resources.QOS_POLICIES, "gold", {"spec": {"cpu": {"shares": 3000, "limitPercent": 50}}})
    q = ns.wait_qos("web-1", lambda q: shares(q) == (3000, "policy/gold"), "given gold's new shares")
    assert q["cpu"]["limitPercent"] == {"value": 50, "source": "policy/gold"}

    # out-prioritised
    ns.policy("platinum", {"selector": {}, "priority": 20, "cpu": {"shares": 5000}})
    ns.wait_qos("web-1", lambda q: shares(q) == (5000, "policy/platinum"), "given platinum's shares")
    ns.wait_qos("db-1", lambda q: shares(q) == (5000, "policy/platinum"), "given platinum's shares")
    assert ns.wait_qos("web-1", lambda q: q.get("policies") == ["platinum", "gold"], "ranked")["cpu"][
        "limitPercent"]["source"] == "policy/gold"  # per setting: gold still gives the limit

    # a tie at equal priority: decided by name, reported on both sides
    ns.policy("aaa-rival", {"selector": {"matchLabels": {"app": "web"}}, "priority": 20, "cpu": {"shares": 100}})
    q = ns.wait_qos("web-1", lambda q: shares(q) == (100, "policy/aaa-rival"), "decided by name")
    [conflict] = q["conflicts"]
    assert conflict["field"] == "cpu.shares" and conflict["losers"] == ["policy/platinum"]
    for name in ("aaa-rival", "platinum"):
        st = ns.wait_policy(name, lambda s: s.get("phase") == "Degraded", "degraded by the tie")
        assert cond(st, "Conflict") == ("True", "PolicyConflict")
        assert {c["vm"] for c in st["conflicts"]} == {"web-1", "web-2"}

    # the VM's own labels change: it leaves gold and the rival, keeps platinum
    ns.patch(resources.VMS, "web-1", {"metadata": {"labels": {"app": "batch"}}})
    q = ns.wait_qos("web-1", lambda q: q.get("policies") == ["platinum"], "matched by platinum only")
    assert shares(q) == (5000, "policy/platinum") and "limitPercent" not in q["cpu"] and not q.get("conflicts")
    ns.wait_policy("gold", lambda s: s.get("matchedVms") == 1, "matching 1 VM")

    # deleted: values go away
    for name in ("platinum", "aaa-rival", "gold", "nobody"):
        ns.delete_policy(name)
    q = ns.wait_qos("web-1", lambda q: q.get("policies") == [] and "cpu" not in q, "without policies")
    assert q["valid"]
    q2 = ns.wait_qos("web-2", lambda q: "cpu" not in q, "without policy values")
    assert q2["memory"]["softLimit"]["source"] == "spec"


def idle(status: dict) -> bool:
    return status.get("phase") == "Idle"


def assert_idle(st: dict) -> None:
    assert st["matchedVms"] == 0 and st["conflicts"] == [] and cond(st, "Matched") == ("False", "NoMatchingVMs")


def test_a_policy_whose_selector_matches_nothing_is_idle(api):
    # in a namespace without any VM
    empty = Ns(api)
    empty.policy("lonely", {"selector": {"matchLabels": {"app": "none"}}, "cpu": {"shares": 3}})
    assert_idle(empty.wait_policy("lonely", idle, "idle"))

    # beside VMs it does not select (one with spec.qos of its own)
    ns = Ns(api)
    ns.vm("a", {"app": "a"}, qos={"cpu": {"shares": 700}})
    ns.vm("b", {"app": "b"})
    ns.policy("other", {"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["z"]}]},
                        "memory": {"softLimit": "64Mi"}})
    assert_idle(ns.wait_policy("other", idle, "idle"))

    # selecting a VM, then edited to select nothing: Idle, and its values leave the VM
    ns.policy("was", {"selector": {"matchLabels": {"app": "b"}}, "cpu": {"shares": 900}})
    ns.wait_qos("b", lambda q: shares(q) == (900, "policy/was"), "given was's shares")
    assert ns.wait_policy("was", lambda s: s.get("matchedVms") == 1, "matching b")["phase"] == "Active"
    ns.patch(resources.QOS_POLICIES, "was", {"spec": {"selector": {"matchLabels": {"app": "gone"}}}})
    assert_idle(ns.wait_policy("was", lambda s: idle(s) and s.get("observedGeneration") == 2, "idle"))
    ns.wait_qos("b", lambda q: q.get("policies") == [] and "cpu" not in q, "without was's values")

    # selected again through the VM's labels, then the VM leaves it
    ns.patch(resources.VMS, "a", {"metadata": {"labels": {"app": "gone"}}})
    assert ns.wait_policy("was", lambda s: s.get("matchedVms") == 1, "matching a")["phase"] == "Active"
    assert shares(ns.get(resources.VMS, "a")["status"]["qos"]) == (700, "spec")  # the VM's own spec wins
    ns.patch(resources.VMS, "a", {"metadata": {"labels": {"app": "a"}}})
    assert_idle(ns.wait_policy("was", idle, "idle again"))

    # created while the controller is down, in a namespace without VMs: idle once it is back
    api.controller.stop()
    try:
        later = Ns(api)
        later.policy("later", {"selector": {"matchLabels": {"app": "none"}}, "cpu": {"shares": 5}})
    finally:
        api.controller.start()
    assert_idle(later.wait_policy("later", idle, "idle after the controller's restart"))


def test_contradictions_are_invalid_with_a_reason(api):
    ns = Ns(api)
    ns.vm("small", {"app": "x"}, qos={"cpu": {"reservationPercent": 80}})
    ns.policy("cap", {"selector": {"matchLabels": {"app": "x"}}, "cpu": {"limitPercent": 50}})
    q = ns.wait_qos("small", lambda q: q.get("valid") is False, "invalid")
    assert q["reason"] == "LimitBelowReservation" and "policy/cap" in q["message"] and "cpu" not in q
    ns.patch(resources.QOS_POLICIES, "cap", {"spec": {"cpu": {"limitPercent": 90}}})
    q = ns.wait_qos("small", lambda q: q.get("valid") is True, "valid again")
    assert q["cpu"]["limitPercent"]["value"] == 90 and q["cpu"]["reservationPercent"]["source"] == "spec"


@pytest.mark.parametrize(("spec", "message"), [
    ({"cpu": {"limitPercent": 50, "reservationPercent": 80}}, "cpu.reservationPercent cannot exceed cpu.limitPercent"),
    ({"cpu": {"limitPercent": 50, "minPercent": 60}}, "cpu.minPercent cannot exceed cpu.limitPercent"),
    ({"memory": {"hardLimit": "1Gi", "guarantee": "2Gi"}}, "memory.guarantee cannot exceed memory.hardLimit"),
    ({"memory": {"hardLimit": "1Gi", "softLimit": "1.5Gi"}}, "memory.softLimit cannot exceed memory.hardLimit"),
    ({"network": {"inbound": {"averageKibPerSecond": 100, "peakKibPerSecond": 50}}},
     "peakKibPerSecond cannot be below averageKibPerSecond"),
    ({"network": {"inbound": {"averageKibPerSecond": 100},
                  "queues": [{"dscp": [46], "ratePercent": 60}, {"dscp": [10], "ratePercent": 50}]}},
     "the ratePercent values add up to more than 100"),
    ({"network": {"portGroup": {}}}, "a portGroup needs an inbound or outbound ceiling"),
    ({"diskIo": {"totalIops": 10, "readIops": 5}}, "totalIops excludes readIops and writeIops"),
    ({"cpu": {"shares": 0}}, "should be greater than or equal to 1"),
    ({"network": {"vlan": 4095}}, "should be less than or equal to 4094"),
])
def test_bad_policies_are_refused_by_the_schema(api, spec, message):
    from kubernetes.client.exceptions import ApiException

    ns = Ns(api)
    with pytest.raises(ApiException) as err:
        ns.policy("bad", {"selector": {}, **spec})
    assert err.value.status == 422 and message in err.value.body, err.value.body


def test_a_selector_requirement_needs_values_for_in_and_none_for_exists(api):
    from kubernetes.client.exceptions import ApiException

    ns = Ns(api)
    for req in ({"key": "a", "operator": "In"}, {"key": "a", "operator": "Exists", "values": ["x"]}):
        with pytest.raises(ApiException) as err:
            ns.policy("bad", {"selector": {"matchExpressions": [req]}})
        assert "values must be non-empty for In and NotIn" in err.value.body
