"""Device verbs: attach-disk, detach-disk, attach-interface, detach-interface, change-media,
blockresize (spec.disks, spec.interfaces).

Additions append to the list, guarded by the generation they were decided on; edits and
removals of one element are guarded by a test of that element as read, so they apply only to it.
"""

from __future__ import annotations

import argparse
import re

from libvirt_operator.cli.outcomes import spec_applied
from libvirt_operator.cli.plan import PatchVM, Plan, Refused, arg, guard, pointer, verb
from libvirt_operator.cli.vmread import disk_target, disks, find_disk, human, interfaces, reported, size_arg, spec
from libvirt_operator.cli.vmread import to_bytes as bytes_of
from libvirt_operator.domain.targets import BUS_PREFIX

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
TARGET = re.compile(r"(vd|sd|hd)[a-z]{1,2}")
MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
MAX_DISKS, MAX_INTERFACES = 32, 16
CDROM_BUSES = ("sata", "scsi", "ide", "usb")
SAFE_SHRINK = ("disks never shrink (QEMU would cut off data under the guest's filesystem). The safe way: shrink the "
               "filesystem and partition inside the guest, stop the VM, copy the image into a new, smaller one "
               "(e.g. virt-resize --shrink, or qemu-img convert of the shrunk content) and point the disk's path at "
               "it; see the README")


def _name(vm: dict) -> str:
    return vm["metadata"]["name"]


def _label(vm: dict, value: str, what: str) -> str:
    if not DNS_LABEL.fullmatch(value) or len(value) > 63:
        raise Refused(f"{_name(vm)}: {what} {value!r} is not a DNS label (lower-case letters, digits and '-')")
    return value


def _append(vm: dict, field: str, item: dict) -> list[dict]:
    if field in spec(vm):
        return [guard(vm), {"op": "add", "path": f"/spec/{field}/-", "value": item}]
    return [guard(vm), {"op": "add", "path": f"/spec/{field}", "value": [item]}]


def _element_ops(field: str, index: int, item: dict, *ops: dict) -> list[dict]:
    """Operations on spec.<field>[index], applied only while that element is still `item`."""
    base = ["spec", field, index]
    out = [{"op": "test", "path": pointer(base), "value": item}]
    for op in ops:
        out.append({**op, "path": pointer([*base, *op["path"]]) if op["path"] else pointer(base)})
    return out


# -- disks ---------------------------------------------------------------------------------------

@verb("attach-disk", "add a disk or cdrom to the VM (appends to spec.disks)",
      arg("source", metavar="SOURCE", help="host path of the image (under a storage root of the node)"),
      arg("target", metavar="TARGET", help="guest device name, e.g. vdb or sdc"),
      arg("--name", dest="dev_name", metavar="NAME", help="the disk's name in the spec (default: TARGET)"),
      arg("--targetbus", choices=("virtio", "scsi", "usb", "sata", "ide"),
          help="default: from TARGET (vd* virtio, hd* ide, sd* scsi, or sata for a cdrom)"),
      arg("--type", dest="device", choices=("disk", "cdrom"), default="disk", help="default: disk"),
      arg("--driver-type", "--subdriver", dest="driver_type", choices=("qcow2", "raw"),
          help="image format (default: qcow2 for a disk, raw for a cdrom)"),
      arg("--mode", choices=("readonly",), help="readonly: the guest cannot write"))
def attach_disk(vm: dict, args: argparse.Namespace) -> Plan:
    name, items = _name(vm), disks(vm)
    target = args.target
    if not TARGET.fullmatch(target):
        raise Refused(f"{name}: {target!r} is not a disk target (vd*, sd* or hd*, e.g. vdb)")
    disk_name = _label(vm, args.dev_name or target, "disk name")
    if not args.source.startswith("/"):
        raise Refused(f"{name}: SOURCE must be an absolute host path, not {args.source!r}")
    prefix = target[:2]
    bus = args.targetbus or {"vd": "virtio", "hd": "ide"}.get(prefix, "sata" if args.device == "cdrom" else "scsi")
    if BUS_PREFIX[bus] != prefix:
        raise Refused(f"{name}: target {target} does not fit bus {bus} (a {bus} disk is {BUS_PREFIX[bus]}*)")
    if args.device == "cdrom" and bus not in CDROM_BUSES:
        raise Refused(f"{name}: a cdrom must be on bus {', '.join(CDROM_BUSES)}, not {bus}")
    for d in items:
        if d["name"] == disk_name:
            raise Refused(f"{name} already has a disk named {disk_name!r}; give another with --name")
        if disk_target(vm, d) == target:
            raise Refused(f"{name}: target {target} is taken by disk {d['name']!r}")
        if d.get("path") == args.source:
            raise Refused(f"{name}: {args.source} is already attached as disk {d['name']!r}")
    if len(items) >= MAX_DISKS:
        raise Refused(f"{name} has {len(items)} disks, the most a VM may have")
    disk: dict = {"name": disk_name, "device": args.device, "path": args.source, "bus": bus, "target": target}
    if args.driver_type:
        disk["format"] = args.driver_type
    if args.mode == "readonly":
        disk["readOnly"] = True
    return Plan(f"{name}: {args.device} {disk_name} ({args.source} as {target} on {bus}) attach requested",
                actions=[PatchVM(_append(vm, "disks", disk))], check=spec_applied(f"disk {disk_name} attached"))


@verb("detach-disk", "remove a disk from the VM (from spec.disks)",
      arg("disk", metavar="TARGET", help="the disk's target (vdb), name, or source path"))
def detach_disk(vm: dict, args: argparse.Namespace) -> Plan:
    name = _name(vm)
    index, disk = find_disk(vm, args.disk)
    if len(disks(vm)) == 1 and not (spec(vm).get("boot") or {}).get("kernel"):
        raise Refused(f"{name}: {disk['name']} is the VM's only disk and it boots from no kernel; "
                      "a VM needs something to boot from")
    return Plan(f"{name}: disk {disk['name']} detach requested",
                actions=[PatchVM(_element_ops("disks", index, disk, {"op": "remove", "path": []}))],
                check=spec_applied(f"disk {disk['name']} detached"))


@verb("change-media", "insert, change or eject the media of a cdrom (spec.disks[].path)",
      arg("disk", metavar="DISK", help="the cdrom's target (sdc), name, or current source path"),
      arg("source", metavar="SOURCE", nargs="?", help="host path of the new media"),
      arg("--eject", action="store_true", help="remove the media"),
      arg("--insert", action="store_true", help="insert media into an empty drive"),
      arg("--update", action="store_true", help="change the media, or eject without SOURCE (the default)"))
def change_media(vm: dict, args: argparse.Namespace) -> Plan:
    name = _name(vm)
    if args.eject + args.insert + args.update > 1:
        raise Refused("give one of --eject, --insert, --update")
    index, disk = find_disk(vm, args.disk)
    if disk.get("device", "disk") != "cdrom":
        raise Refused(f"{name}: disk {disk['name']} is not a cdrom (device: {disk.get('device', 'disk')}); "
                      "media changes apply to cdroms only")
    current, source = disk.get("path"), args.source
    if source is not None and not source.startswith("/"):
        raise Refused(f"{name}: SOURCE must be an absolute host path, not {source!r}")
    if args.eject and source is not None:
        raise Refused("--eject takes no SOURCE")
    if args.insert and source is None:
        raise Refused("--insert needs a SOURCE")
    if args.insert and current:
        raise Refused(f"{name}: cdrom {disk['name']} already has media ({current}); use --update to change it")
    if args.eject and not current:
        raise Refused(f"{name}: cdrom {disk['name']} has no media to eject")
    if source is None:  # eject (or --update without a source)
        if not current:
            return Plan(f"{name}: cdrom {disk['name']} is already empty", check=spec_applied("media"))
        return Plan(f"{name}: cdrom {disk['name']} eject requested",
                    actions=[PatchVM(_element_ops("disks", index, disk, {"op": "remove", "path": ["path"]}))],
                    check=spec_applied(f"{disk['name']} ejected"))
    if current == source:
        return Plan(f"{name}: cdrom {disk['name']} already holds {source}", check=spec_applied("media"))
    return Plan(f"{name}: cdrom {disk['name']} media {source} requested",
                actions=[PatchVM(_element_ops("disks", index, disk,
                                              {"op": "add", "path": ["path"], "value": source}))],
                check=spec_applied(f"{disk['name']} holds {source}"))


@verb("blockresize", "grow a disk (spec.disks[].size; online); shrinking is refused",
      arg("disk", metavar="DISK", help="the disk's target (vda), name, or source path"),
      arg("size", metavar="SIZE", help="new virtual size: a number of KiB (as virsh takes it) or a quantity, e.g. 2Gi"))
def blockresize(vm: dict, args: argparse.Namespace) -> Plan:
    name = _name(vm)
    index, disk = find_disk(vm, args.disk)
    if disk.get("device", "disk") != "disk":
        raise Refused(f"{name}: disk {disk['name']} is a {disk.get('device')}, which has no size to change")
    size = size_arg(args.size)
    new = bytes_of(size)
    if new <= 0:
        raise Refused(f"{name}: size {size} is not a size")
    if disk.get("size"):
        current, known = bytes_of(disk["size"]), disk["size"]
    else:
        cap = (reported(vm, "disks").get(disk["name"]) or {}).get("capacityBytes")
        current, known = (int(cap), human(int(cap))) if cap is not None else (None, None)
    if current is not None and new < current:
        raise Refused(f"{name}: {size} is smaller than disk {disk['name']}'s {known}: {SAFE_SHRINK}")
    if current is not None and new == current:
        return Plan(f"{name}: disk {disk['name']} is already {known}", check=spec_applied(f"size {size}"))
    return Plan(f"{name}: disk {disk['name']} grow to {size} requested",
                actions=[PatchVM(_element_ops("disks", index, disk, {"op": "add", "path": ["size"], "value": size}))],
                check=spec_applied(f"disk {disk['name']} size {size}"))


# -- interfaces ----------------------------------------------------------------------------------

@verb("attach-interface", "add a network interface (appends to spec.interfaces)",
      arg("type", metavar="TYPE", choices=("network", "bridge", "user", "hostdev"),
          help="network (libvirt network), bridge (host bridge), user (user-mode), hostdev (SR-IOV VF)"),
      arg("source", metavar="SOURCE", nargs="?",
          help="network or bridge name; the VF's PCI address for hostdev; none for user"),
      arg("--model", choices=("virtio", "e1000", "e1000e", "rtl8139"), help="default: virtio"),
      arg("--mac", help="MAC address (default: generated)"),
      arg("--name", dest="dev_name", metavar="NAME",
          help="the interface's name in the spec (default: the first free nicN)"))
def attach_interface(vm: dict, args: argparse.Namespace) -> Plan:
    name, items = _name(vm), interfaces(vm)
    names = {i["name"] for i in items}
    nic = _label(vm, args.dev_name, "interface name") if args.dev_name else \
        next(f"nic{n}" for n in range(len(items) + 1) if f"nic{n}" not in names)
    if nic in names:
        raise Refused(f"{name} already has an interface named {nic!r}; give another with --name")
    if len(items) >= MAX_INTERFACES:
        raise Refused(f"{name} has {len(items)} interfaces, the most a VM may have")
    iface: dict = {"name": nic, "type": args.type}
    if args.type == "user":
        if args.source:
            raise Refused("user-mode networking takes no SOURCE")
    elif not args.source:
        raise Refused(f"an interface of type {args.type} needs a SOURCE "
                      + ("(the VF's PCI address)" if args.type == "hostdev" else f"(the {args.type}'s name)"))
    elif args.type == "hostdev":
        if not PCI.fullmatch(args.source.lower()):
            raise Refused(f"{args.source!r} is not a PCI address (domain:bus:slot.function, e.g. 0000:03:00.1)")
        iface["pciAddress"] = args.source.lower()
    else:
        iface["source"] = args.source
    if args.model:
        if args.type == "hostdev":
            raise Refused("a hostdev interface (VF passthrough) has no model")
        iface["model"] = args.model
    if args.mac:
        mac = args.mac.lower()
        if not MAC.fullmatch(mac):
            raise Refused(f"{args.mac!r} is not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)")
        taken = [i["name"] for i in items if (i.get("mac") or "").lower() == mac] + \
            [i["name"] for i in reported(vm, "interfaces").values() if (i.get("mac") or "").lower() == mac]
        if taken:
            raise Refused(f"{name}: MAC {mac} is already used by interface {taken[0]!r}")
        iface["mac"] = mac
    where = args.source or "user-mode networking"
    return Plan(f"{name}: interface {nic} ({args.type} {where}) attach requested",
                actions=[PatchVM(_append(vm, "interfaces", iface))], check=spec_applied(f"interface {nic} attached"))


@verb("detach-interface", "remove a network interface (from spec.interfaces)",
      arg("type", metavar="TYPE", choices=("network", "bridge", "user", "hostdev"), help="the interface's type"),
      arg("--mac", help="the interface's MAC (needed when several have TYPE)"),
      arg("--name", dest="dev_name", metavar="NAME", help="or its name in the spec"))
def detach_interface(vm: dict, args: argparse.Namespace) -> Plan:
    name = _name(vm)
    if args.mac and args.dev_name:
        raise Refused("give --mac or --name, not both")
    live = reported(vm, "interfaces")

    def mac_of(i: dict) -> str:
        return (i.get("mac") or (live.get(i["name"]) or {}).get("mac") or "").lower()

    found = [(n, i) for n, i in enumerate(interfaces(vm)) if i.get("type", "network") == args.type
             and (not args.mac or mac_of(i) == args.mac.lower())
             and (not args.dev_name or i["name"] == args.dev_name)]
    if not found:
        which = f" with MAC {args.mac}" if args.mac else f" named {args.dev_name!r}" if args.dev_name else ""
        raise Refused(f"{name} has no interface of type {args.type}{which}")
    if len(found) > 1:
        listed = ", ".join(f"{i['name']} ({mac_of(i) or 'MAC not yet reported'})" for _, i in found)
        raise Refused(f"{name} has {len(found)} interfaces of type {args.type} ({listed}); choose one with --mac or "
                      "--name")
    index, iface = found[0]
    return Plan(f"{name}: interface {iface['name']} detach requested",
                actions=[PatchVM(_element_ops("interfaces", index, iface, {"op": "remove", "path": []}))],
                check=spec_applied(f"interface {iface['name']} detached"))
