"""The controller at scale: 5,000 VirtualMachines placed across 50 simulated nodes; RSS and throughput.

Starts a control plane and the controller only. The nodes are Node objects whose agent Leases a
thread of this process renews (localenv.simnodes); no agent runs, so the VMs are placed and never
start. Measures:

  placement throughput  VMs placed per second while they are created at once (16 client threads),
                        and after a restart of the controller with every VM still unplaced (--cold);
  controller RSS        idle, and with all VMs placed (growth per VM), and its peak (VmHWM).

Prints the figures against issue 11's targets (RSS <= 200 MB, growth <= 20 KB per VM) and writes
bench/results/controller_scale.json.

    .venv/bin/python bench/controller_scale.py [--vms 5000] [--nodes 50] [--cold] [--profile DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

import benchlib as b
from libvirt_operator.api import meta
from localenv.cluster import ensure_namespace, install_crds
from localenv.operator import NAMESPACE, OperatorProcesses
from localenv.simnodes import SimNodes

MI = 2**20
VM_MEMORY = "64Mi"


def settle(pid: int, seconds: float = 5.0) -> int:
    """RSS once it has stopped changing by more than 1% over `seconds` (at most 60 s)."""
    deadline = time.monotonic() + 60
    last = b.rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = b.rss_bytes(pid)
        if abs(now - last) <= last * 0.01:
            return now
        last = now
    return last


def hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def create_all(api: client.ApiClient, names: list[str]) -> dict[str, float]:
    crd = client.CustomObjectsApi(api)
    spec = {"memory": {"size": VM_MEMORY}, "boot": {"kernel": {"kernel": "/images/vmlinuz"}}}
    began: dict[str, float] = {}

    def create(name: str) -> None:
        began[name] = time.perf_counter()
        crd.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", b.vm_body(name, spec))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    return began


def spy(profile: Path | None, pid: int, name: str) -> subprocess.Popen | None:
    if not profile:
        return None
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid), "-r", "50",
                             "-f", "raw", "-o", str(profile / f"{name}.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unspy(proc: subprocess.Popen | None) -> None:
    if proc:
        proc.send_signal(2)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=5000)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--cold", action="store_true", help="also: create all with the controller stopped, then "
                    "start it and time the placement of all")
    ap.add_argument("--profile", type=Path, help="py-spy the controller while it places")
    ap.add_argument("--out", default="controller_scale")
    args = ap.parse_args()
    per_node = -(-args.vms // args.nodes)
    node_memory = 2 * per_node * 64 * MI  # room for all, with half to spare
    result: dict = {"vms": args.vms, "nodes": args.nodes, "vm_memory": VM_MEMORY}

    with b.world(node_names=(), operator=False) as w:
        api = w.api
        install_crds(w.cp)
        ensure_namespace(api, NAMESPACE)
        sim = SimNodes(api, NAMESPACE, args.nodes, node_memory).start()
        ops = OperatorProcesses(w.dir)
        try:
            ref = ops.start_controller(w.cp.kubeconfig)
            idle = settle(ref.pid)
            result["rss_idle"] = idle
            vms = b.VMWatch(api)
            names = [f"vm-{i:05d}" for i in range(args.vms)]
            prof = spy(args.profile, ref.pid, "controller-live")
            meter = b.CPUMeter({"controller": ref.pid, "kube-apiserver": w.cp.processes["kube-apiserver"].pid,
                                "etcd": w.cp.processes["etcd"].pid}).start()
            t0 = time.perf_counter()
            began = create_all(api, names)
            created = time.perf_counter() - t0
            vms.wait(names, "scheduled", 3600)
            cpu = meter.stop()
            result["load_average"] = b.load_average()
            unspy(prof)
            done = max(vms.marks[n]["scheduled"] for n in names)
            wall = done - t0
            latency = [vms.marks[n]["scheduled"] - began[n] for n in names]
            result["live"] = {"create_seconds": created, "create_rate": args.vms / created,
                              "place_seconds": wall, "placement_rate": args.vms / wall,
                              "apply_to_scheduled": b.summary(latency), "cpu_seconds": cpu,
                              "controller_cpu_ms_per_vm": cpu["controller"] * 1000 / args.vms}
            placed = settle(ref.pid)
            result["rss_placed"] = placed
            result["rss_hwm"] = hwm_bytes(ref.pid)
            result["growth_per_vm"] = (placed - idle) / args.vms
            items = client.CustomObjectsApi(api).list_namespaced_custom_object(
                meta.GROUP, meta.VERSION, b.NS, "virtualmachines")["items"]
            spread = Counter(vm["metadata"].get("labels", {}).get(meta.NODE_LABEL) for vm in items)
            result["per_node"] = {"min": min(spread.values()), "max": max(spread.values()), "nodes": len(spread)}
            # A restart with every VM placed: the initial listing of all of them, nothing to do.
            ref = ops.restart("controller")
            result["rss_after_restart"] = settle(ref.pid)
            if args.cold:
                ops.stop()
                client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(
                    meta.GROUP, meta.VERSION, b.NS, "virtualmachines")
                vms.wait(names, "deleted", 600)
                for n in names:
                    vms.reset(n)
                cold = [f"cold-{i:05d}" for i in range(args.vms)]
                create_all(api, cold)
                ref = ops.restart("controller")
                prof = spy(args.profile, ref.pid, "controller-cold")
                t0 = time.perf_counter()
                vms.wait(cold, "scheduled", 3600)
                unspy(prof)
                wall = max(vms.marks[n]["scheduled"] for n in cold) - t0
                result["cold"] = {"place_seconds": wall, "placement_rate": args.vms / wall,
                                  "rss_placed": settle(ref.pid), "rss_hwm": hwm_bytes(ref.pid)}
            vms.close()
        finally:
            ops.stop()
            sim.stop()

    live = result["live"]
    print(f"controller with {args.vms} VMs on {args.nodes} simulated nodes")
    print(f"  created in {live['create_seconds']:.1f} s ({live['create_rate']:.0f}/s); all placed after "
          f"{live['place_seconds']:.1f} s: {live['placement_rate']:.0f} VMs/s")
    lat = live["apply_to_scheduled"]
    print(f"  apply -> Scheduled p50 {lat['p50'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, "
          f"max {lat['max'] * 1000:.0f} ms")
    print(f"  spread: {result['per_node']['min']}..{result['per_node']['max']} VMs per node on "
          f"{result['per_node']['nodes']} nodes")
    print("  CPU while placing: " + ", ".join(f"{k} {v:.1f} s" for k, v in live["cpu_seconds"].items())
          + f"; controller {live['controller_cpu_ms_per_vm']:.1f} ms per VM (load average {result['load_average']})")
    if "cold" in result:
        print(f"  cold start, all unplaced: {result['cold']['place_seconds']:.1f} s, "
              f"{result['cold']['placement_rate']:.0f} VMs/s")
    rss, growth = result["rss_placed"], result["growth_per_vm"]
    print(f"  RSS idle {result['rss_idle'] / MI:.0f} MiB, with {args.vms} VMs {rss / MI:.0f} MiB "
          f"(peak {result['rss_hwm'] / MI:.0f} MiB, after a restart {result['rss_after_restart'] / MI:.0f} MiB); "
          f"growth {growth / 1024:.1f} KiB per VM")
    result["targets"] = [
        {"what": "controller RSS <= 200 MB", "value": rss, "met": rss <= 200e6},
        {"what": "growth per VM <= 20 KB", "value": growth, "met": growth <= 20e3},
    ]
    for t in result["targets"]:
        print(f"  {'met ' if t['met'] else 'MISS'} {t['what']}")
    print(f"wrote {b.write_result(args.out, result)}")


if __name__ == "__main__":
    sys.exit(main())
