"""Read-only verbs: list, domblklist, domiflist."""

from __future__ import annotations

import argparse
import sys

from libvirt_operator.cli.client import VMClient
from libvirt_operator.cli.output import table
from libvirt_operator.cli.plan import Plan, arg, command, verb
from libvirt_operator.cli.vmread import (
    assigned_targets,
    condition,
    default_bus,
    disks,
    human,
    interfaces,
    node_of,
    power_state,
    reported,
    state_reason,
    to_bytes,
)

NOT_REPORTED = "* not yet reported by the node agent (shown from the spec)"


@command("list", "list VirtualMachines",
         arg("-A", "--all-namespaces", action="store_true", help="VMs of every namespace"),
         arg("-o", "--output", choices=["wide"], help="wide: also the reason's message"))
def list_(vms: VMClient, args: argparse.Namespace) -> int:
    items = vms.list(args.all_namespaces)
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {vms.namespace}"
        print(f"No VirtualMachines found in {where}.", file=sys.stderr)
        return 0
    print(vm_table(items, args.all_namespaces, args.output == "wide"))
    return 0


def vm_table(vms: list[dict], all_namespaces: bool, wide: bool) -> str:
    header = ["NAME", "NODE", "PHASE", "DESIRED", "READY", "REASON"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    if wide:
        header.append("MESSAGE")
    rows = []
    for vm in sorted(vms, key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"])):
        md, st = vm["metadata"], vm.get("status") or {}
        reason, message = state_reason(vm)
        row = [md["name"], node_of(vm), st.get("phase") or "", power_state(vm),
               condition(vm, "Ready").get("status", "Unknown"), reason]
        if all_namespaces:
            row.insert(0, md["namespace"])
        if wide:
            row.append(message)
        rows.append(row)
    return table(header, rows)


@verb("domblklist", "list the VM's disks (from status.disks; the spec's for disks not yet reported)",
      arg("--details", action="store_true", help="also name, device, bus, format, capacity and backing chain"),
      wait=False)
def domblklist(vm: dict, args: argparse.Namespace) -> Plan:
    seen = reported(vm, "disks")
    targets = assigned_targets(vm)
    rows: list[tuple[bool, dict]] = [(True, d) for d in seen.values()]
    for d in disks(vm):
        if d["name"] not in seen:
            size = d.get("size")
            rows.append((False, {
                "name": d["name"], "target": targets.get(d["name"], ""),
                "bus": default_bus(d),
                "device": d.get("device", "disk"), "path": d.get("path"),
                "format": d.get("format") or ("raw" if d.get("device") == "cdrom" else "qcow2"),
                "capacityBytes": to_bytes(size) if size else None}))
    out = []
    for live, d in rows:
        target = (d.get("target") or "") + ("" if live else "*")
        if args.details:
            cap = d.get("capacityBytes")
            out.append([d.get("name", ""), d.get("device", ""), d.get("bus", ""), target, d.get("format") or "",
                        human(cap) if cap is not None else "", d.get("path") or "",
                        " <- ".join(d.get("backingChain") or [])])
        else:
            out.append([target, d.get("path") or ""])
    header = (["NAME", "DEVICE", "BUS", "TARGET", "FORMAT", "CAPACITY", "SOURCE", "BACKING"] if args.details
              else ["TARGET", "SOURCE"])
    text = table(header, out)
    if any(not live for live, _ in rows):
        text += "\n" + NOT_REPORTED
    return Plan(output=text)


@verb("domiflist", "list the VM's network interfaces (from status.interfaces; the spec's for those not yet "
      "reported)", wait=False)
def domiflist(vm: dict, args: argparse.Namespace) -> Plan:
    seen = reported(vm, "interfaces")
    rows: list[tuple[bool, dict]] = [(True, i) for i in seen.values()]
    rows += [(False, i) for i in interfaces(vm) if i["name"] not in seen]
    out = [[i.get("hostDevice") or "", i["name"] + ("" if live else "*"), i.get("type") or "network",
            i.get("source") or i.get("pciAddress") or "", i.get("model") or "", i.get("mac") or ""]
           for live, i in rows]
    text = table(["INTERFACE", "NAME", "TYPE", "SOURCE", "MODEL", "MAC"], out)
    if any(not live for live, _ in rows):
        text += "\n" + NOT_REPORTED
    return Plan(output=text)
