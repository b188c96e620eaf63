"""Apply -> Ready latency of VirtualMachines vs raw libvirt define+create of the same domains.

Starts its own local world (control plane, one libvirt node, controller, agent), then:
  raw:      defineXML + create of the XML the agent renders, timed to "running";
  operator: create the VirtualMachine object, timed until status Ready=True (phase Running).
Each for 1 VM (repeated) and for N VMs at once. Prints p50/p95 and the operator/raw ratio.

    .venv/bin/python bench/vm_start.py [--burst 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
from kubernetes import client

from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain
from localenv.cluster import install
from localenv.controlplane import ControlPlane
from localenv.guest import ensure_guest_image
from localenv.nodes import start_nodes, stop_nodes
from localenv.operator import OperatorProcesses


def spec_dict(image) -> dict:
    # shutdown force: deleting a VM whose guest is still booting then takes no ACPI timeout.
    return {"domainType": "qemu", "memory": {"size": "128Mi"}, "shutdown": {"mode": "force"},
            "boot": {"kernel": {"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": image.cmdline}}}


def raw_start(uri: str, spec: dict, console_dir: Path, names: list[str]) -> list[float]:
    """Seconds from defineXML to a running domain, for each name, all started at once."""
    parsed = VirtualMachineSpec.model_validate(spec)
    barrier = threading.Barrier(len(names))

    def one(name: str) -> float:
        conn = libvirt.open(uri)
        xml = render_domain(parsed, name=f"raw_{name}", uuid=str(uuid.uuid4()), namespace="raw", vm_name=name,
                            generation=1, domain_type="qemu",
                            console_log=str(console_dir / f"raw_{name}.log")).to_xml()
        barrier.wait()
        began = time.perf_counter()
        dom = conn.defineXML(xml)
        dom.create()
        elapsed = time.perf_counter() - began
        dom.destroy()
        dom.undefine()
        conn.close()
        return elapsed

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(one, names))


def operator_start(api: client.CustomObjectsApi, spec: dict, names: list[str], node: str) -> list[float]:
    """Seconds from the create call to status Ready=True, for each VM, all created at once."""
    created: dict[str, float] = {}
    for name in names:
        body = {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": "default"}, "spec": {**spec, "nodeName": node}}
        created[name] = time.perf_counter()
        api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines", body)
    ready: dict[str, float] = {}
    deadline = time.perf_counter() + 300
    while len(ready) < len(names) and time.perf_counter() < deadline:
        items = api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines")["items"]
        now = time.perf_counter()
        for vm in items:
            name = vm["metadata"]["name"]
            conds = {c["type"]: c["status"] for c in (vm.get("status") or {}).get("conditions", [])}
            if name in created and name not in ready and conds.get("Ready") == "True":
                ready[name] = now - created[name]
        time.sleep(0.02)
    if len(ready) < len(names):
        raise SystemExit(f"only {len(ready)}/{len(names)} VMs became Ready")
    for name in names:
        api.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines", name)
    return [ready[n] for n in names]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def row(label: str, raw: list[float], op: list[float]) -> str:
    r50, r95, o50, o95 = pct(raw, 50), pct(raw, 95), pct(op, 50), pct(op, 95)
    return (f"{label:<22} raw p50 {r50 * 1000:7.0f} ms  p95 {r95 * 1000:7.0f} ms | "
            f"operator p50 {o50 * 1000:7.0f} ms  p95 {o95 * 1000:7.0f} ms | ratio p50 {o50 / r50:5.1f}x  "
            f"p95 {o95 / r95:5.1f}x")


def wait_deleted(api: client.CustomObjectsApi) -> None:
    while api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, "default", "virtualmachines")["items"]:
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    world = Path(tempfile.mkdtemp(prefix="lvo-bench-", dir="/var/tmp"))
    cp = ControlPlane(world).start()
    try:
        nodes = start_nodes(world, ["bench-node"])
        cluster = install(cp, nodes, world / "storage", ensure_guest_image(), world)
        node = nodes[0]
        spec = spec_dict(cluster.image)
        console = world / "storage" / "console"
        api = client.CustomObjectsApi(cp.api_client())
        operator_start(api, spec, ["warmup"], node.name)  # first-use costs out of the numbers
        wait_deleted(api)
        raw_one, op_one = [], []
        for i in range(args.repeat):
            raw_one += raw_start(node.uri, spec, console, [f"one-{i}"])
            op_one += operator_start(api, spec, [f"one-{i}"], node.name)
            wait_deleted(api)
        names = [f"burst-{i}" for i in range(args.burst)]
        raw_burst = raw_start(node.uri, spec, console, names)
        op_burst = operator_start(api, spec, names, node.name)
        wait_deleted(api)
        print(f"apply -> Ready vs raw libvirt define+create ({statistics.mean(raw_one) * 1000:.0f} ms mean raw)")
        print(row(f"1 VM (x{args.repeat})", raw_one, op_one))
        print(row(f"{args.burst} VMs at once", raw_burst, op_burst))
    finally:
        OperatorProcesses.load(world).stop()
        stop_nodes(world)
        cp.stop()
        shutil.rmtree(world, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
