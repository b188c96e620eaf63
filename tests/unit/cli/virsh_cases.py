"""Helpers for the pure tests of the kubectl-virsh verbs (imported by the test modules beside it,
whose directory pytest puts on sys.path): a VM dict in, the verb's plan out, its patches applied
with a real RFC 6902 implementation (jsonpatch, which kopf depends on) the way the API server
would (a spec change bumps metadata.generation)."""

from __future__ import annotations

import copy

import jsonpatch

from libvirt_operator.cli import virsh
from libvirt_operator.cli.plan import CreateObject, PatchVM, Plan


def _merge(target: dict, patch: dict) -> dict:
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply(vm: dict, p: Plan) -> dict:
    """The VM after the plan's patches (raises jsonpatch.JsonPatchTestFailed when a guard fails)."""
    for action in p.actions:
        assert not isinstance(action, CreateObject), "no verb of this wave creates objects"
        assert isinstance(action, PatchVM)
        before = vm
        vm = jsonpatch.apply_patch(vm, action.body) if isinstance(action.body, list) else _merge(vm, action.body)
        if vm.get("spec") != before.get("spec"):
            vm = copy.deepcopy(vm)
            vm["metadata"]["generation"] = before["metadata"]["generation"] + 1
    return vm


def make_vm(name: str = "web", generation: int = 3, status: dict | None = None, **spec) -> dict:
    """A VM as the API server returns it: schema defaults filled in."""
    base = {
        "domainType": "qemu", "powerState": "Running", "restartPolicy": "OnFailure",
        "cpu": {"vcpus": 2, "maxVcpus": 4}, "memory": {"size": "256Mi", "maxSize": "1Gi"},
        "boot": {"firmware": "bios"},
        "disks": [{"name": "root", "device": "disk", "path": "/var/lib/libvirt/images/web.qcow2",
                   "readOnly": False},
                  {"name": "iso", "device": "cdrom", "path": "/var/lib/libvirt/images/a.iso", "readOnly": False}],
        "interfaces": [{"name": "nic0", "type": "network", "source": "default", "model": "virtio",
                        "mac": "52:54:00:00:00:01"}],
        "hostDevices": [], "guestAgent": True,
        "shutdown": {"mode": "acpi", "timeoutSeconds": 120, "forceAfterTimeout": False},
        "diskDeletionPolicy": "Retain",
    }
    base.update(spec)
    vm = {"apiVersion": "virt.libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
          "metadata": {"name": name, "namespace": "default", "generation": generation, "resourceVersion": "42"},
          "spec": base}
    if status is not None:
        vm["status"] = status
    return vm


def plan(argv: list[str] | str, vm: dict) -> Plan:
    return virsh.plan(argv.split() if isinstance(argv, str) else argv, vm)


def applied_status(vm: dict, generation: int | None = None, ready: bool = True, phase: str = "Running",
                   **conditions: tuple[str, str]) -> dict:
    """`vm` with a status as the agent writes it for `generation` (default: the VM's)."""
    gen = generation if generation is not None else vm["metadata"]["generation"]
    conds = [{"type": "Ready", "status": "True" if ready else "False", "reason": phase if ready else "Pending",
              "message": "", "observedGeneration": gen}]
    for type_, (reason, message) in conditions.items():
        conds.append({"type": type_, "status": "True", "reason": reason, "message": message,
                      "observedGeneration": gen})
    out = copy.deepcopy(vm)
    out["status"] = {**(vm.get("status") or {}), "phase": phase, "nodeName": "node-a", "observedGeneration": gen,
                     "conditions": conds}
    return out

