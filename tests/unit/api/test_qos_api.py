"""The QoS API blocks: parsing, wire form, schema rules carried into the CRDs."""

import pytest
from pydantic import ValidationError

from libvirt_operator.api.crds import KINDS, crd
from libvirt_operator.api.qos import QosSpec, QosStatus, effective
from libvirt_operator.api.schema import structural_schema
from libvirt_operator.api.vmqospolicy import VMQosPolicy


def rules(schema: dict) -> list[str]:
    found = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    for sub in (schema.get("properties") or {}).values():
        found += rules(sub)
    if "items" in schema:
        found += rules(schema["items"])
    return found


def test_vm_qos_spec_parses_its_wire_form():
    wire = {"network": [{"name": "nic0", "inbound": {"averageKibPerSecond": 1000, "peakKibPerSecond": 2000},
                         "queues": [{"dscp": [46], "ratePercent": 30}], "priority": 5, "vlan": 42}],
            "cpu": {"shares": 2048, "limitPercent": 150, "minPercent": 20, "reservationPercent": 50},
            "memory": {"hardLimit": "1Gi", "softLimit": "512Mi", "guarantee": "256Mi"},
            "disks": [{"name": "root", "totalIops": 500, "readBytesPerSecond": 10485760}]}
    spec = QosSpec.model_validate(wire)
    assert spec.to_wire() == wire


@pytest.mark.parametrize("bad", [
    {"cpu": {"shares": 0}},
    {"cpu": {"limitPercent": 0}},
    {"network": [{"name": "nic0", "priority": 8}]},
    {"network": [{"name": "nic0", "vlan": 4095}]},
    {"network": [{"name": "nic0", "queues": [{"dscp": [64], "ratePercent": 10}]}]},
    {"network": [{"name": "nic0", "queues": [{"dscp": [1]} for _ in range(5)]}]},
    {"memory": {"hardLimit": "lots"}},
    {"disks": [{"name": "Root"}]},
    {"bogus": 1},
])
def test_field_ranges_are_enforced(bad):
    with pytest.raises(ValidationError):
        QosSpec.model_validate(bad)


def test_the_policy_crd_carries_the_cross_field_rules():
    [kind] = [k for k in KINDS if k.kind == "VMQosPolicy"]
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found = " | ".join(rules(schema))
    for needle in ("self.reservationPercent <= self.limitPercent", "self.minPercent <= self.limitPercent",
                   "quantity(self.guarantee).compareTo(quantity(self.hardLimit)) <= 0",
                   "self.peakKibPerSecond >= self.averageKibPerSecond", "q.ratePercent).sum() <= 100",
                   "!has(self.totalIops)",
                   "has(self.inbound) || has(self.outbound)", "self.operator in ['Exists', 'DoesNotExist']"):
        assert needle in found, needle


def test_vm_side_blocks_are_structural():
    spec, status = structural_schema(QosSpec), structural_schema(QosStatus)
    assert spec["properties"]["network"]["x-kubernetes-list-map-keys"] == ["name"]
    assert "x-kubernetes-preserve-unknown-fields" not in status  # every field of status.qos is typed
    assert status["properties"]["cpu"]["properties"]["shares"]["required"] == ["value", "source"]


def test_a_policy_round_trips():
    wire = {"spec": {"selector": {"matchLabels": {"tier": "gold"}}, "priority": 10,
                     "network": {"interfaces": ["nic0"], "portGroup": {"outbound": {"averageKibPerSecond": 5000}}},
                     "cpu": {"shares": 4096}, "diskIo": {"disks": ["root"], "totalIops": 100}}}
    assert VMQosPolicy.model_validate(wire).to_wire() == wire


def test_effective_of_nothing_or_invalid_is_none():
    assert effective(None) is None
    assert effective({"valid": False, "reason": "X", "message": "m"}) is None
    assert effective({"valid": True}).cpu.shares is None
