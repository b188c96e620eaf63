"""The four CustomResourceDefinitions, assembled from the pydantic models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from libvirt_operator.api import meta
from libvirt_operator.api.schema import structural_schema
from libvirt_operator.api.virtualmachine import VirtualMachine
from libvirt_operator.api.vmmigration import VMMigration
from libvirt_operator.api.vmqospolicy import VMQosPolicy
from libvirt_operator.api.vmsnapshot import VMSnapshot


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: list[str]
    model: type[BaseModel]
    columns: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, jsonPath

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{meta.GROUP}"


_PHASE = ("Phase", "string", ".status.phase")
_AGE = ("Age", "date", ".metadata.creationTimestamp")

KINDS = [
    Kind("VirtualMachine", "virtualmachines", ["lvm", "lvms"], VirtualMachine, [
        _PHASE,
        ("Node", "string", ".status.nodeName"),
        ("vCPUs", "integer", ".spec.cpu.vcpus"),
        ("Memory", "string", ".spec.memory.size"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        _AGE,
    ]),
    Kind("VMSnapshot", "vmsnapshots", ["vmsnap"], VMSnapshot, [
        ("VM", "string", ".spec.vmName"), _PHASE, ("Memory", "boolean", ".spec.memory"), _AGE,
    ]),
    Kind("VMMigration", "vmmigrations", ["vmmig"], VMMigration, [
        ("VM", "string", ".spec.vmName"), ("Type", "string", ".spec.type"), _PHASE,
        ("Source", "string", ".status.sourceNode"), ("Target", "string", ".status.targetNode"),
        ("Progress", "integer", ".status.progress.percent"), _AGE,
    ]),
    Kind("VMQosPolicy", "vmqospolicies", ["vmqos"], VMQosPolicy, [
        _PHASE, ("Priority", "integer", ".spec.priority"), ("VMs", "integer", ".status.matchedVms"), _AGE,
    ]),
]


def crd(kind: Kind) -> dict[str, Any]:
    schema = structural_schema(kind.model)
    props = schema["properties"]
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    schema.pop("description", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {
            "group": meta.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": kind.short_names,
                "categories": ["libvirt-operator"],
            },
            "versions": [{
                "name": meta.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": n, "type": t, "jsonPath": p} for n, t, p in kind.columns
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    return {f"{meta.GROUP}_{k.plural}.yaml": crd(k) for k in KINDS}
