"""An agent with 100 VMs on its node: its RSS and growth per VM, the node's processes, and watch traffic.

Starts its own world with two libvirt nodes and the operator. Every VM goes to the first node
(`spec.nodeName`) and boots a 36-byte multiboot kernel that halts at once (benchlib.halt_kernel),
so 100 QEMUs cost memory but no CPU. Measures:

  agent RSS       idle, then with all VMs Ready (growth per VM);
  processes       the node's processes by name, idle and with the VMs (only QEMU may grow);
  watch traffic   the VM watch events each agent received (libvirt_operator_vm_watch_events_total)
                  while the VMs start, change (a label, 3 times each) and are deleted: the first
                  node's agent gets O(its VMs), the other agent none at all.

Prints them against issue 11's targets (RSS <= 120 MB, growth <= 200 KB per VM) and writes
bench/results/agent_scale.json.

    .venv/bin/python bench/agent_scale.py [--vms 100] [--profile DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

import benchlib as b
from libvirt_operator.api import meta

MI = 2**20
EVENTS = "libvirt_operator_vm_watch_events_total"
CHANGES = 3


def census(node) -> dict[str, int]:
    return dict(Counter(b.comm(pid) for pid in node.processes()))


def settle(pid: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + 90
    last = b.rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = b.rss_bytes(pid)
        if abs(now - last) <= last * 0.01:
            return now
        last = now
    return last


def events_of(port: int) -> dict[str, float]:
    s = b.scrape(port)
    return {scope: b.metric(s, EVENTS, scope=scope) for scope in ("own", "other")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--profile", type=Path, help="py-spy the agent while the VMs start")
    ap.add_argument("--out", default="agent_scale")
    args = ap.parse_args()
    result: dict = {"vms": args.vms}

    with b.world(("node-a", "node-b")) as w:
        cluster = w.cluster
        busy, quiet = w.nodes
        kernel = b.halt_kernel(cluster.storage_dir / "images")
        spec = {**b.halt_spec(kernel), "nodeName": busy.name}
        agent = cluster.operator.processes[f"agent-{busy.name}"]
        ports = {n.name: int(cluster.operator.envs[f"agent-{n.name}"]["LVO_METRICS_PORT"]) for n in w.nodes}
        crd = client.CustomObjectsApi(w.api)
        vms = b.VMWatch(w.api)
        names = [f"small-{i:03d}" for i in range(args.vms)]
        try:
            # One VM first: the first domain's costs (capabilities, connections) out of the baseline.
            crd.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                                b.vm_body("first", spec))
            vms.wait(["first"], "ready", 300)
            crd.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", "first")
            vms.wait(["first"], "deleted", 300)
            time.sleep(2)
            idle_census = census(busy)
            rss_idle = settle(agent.pid)
            before = {n: events_of(p) for n, p in ports.items()}
            prof = None
            if args.profile:
                import subprocess
                args.profile.mkdir(parents=True, exist_ok=True)
                prof = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                                         str(agent.pid), "-r", "50", "-f", "raw", "-o",
                                         str(args.profile / "agent-100.txt"), "--nonblocking"])
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: crd.create_namespaced_custom_object(
                    meta.GROUP, meta.VERSION, b.NS, "virtualmachines", b.vm_body(n, spec)), names))
            vms.wait(names, "ready", 1800)
            all_ready = time.perf_counter() - t0
            if prof:
                prof.send_signal(2)
                prof.wait(60)
            rss_full = settle(agent.pid)
            full_census = census(busy)
            started = {n: events_of(p) for n, p in ports.items()}
            for i in range(CHANGES):
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda n, i=i: crd.patch_namespaced_custom_object(
                        meta.GROUP, meta.VERSION, b.NS, "virtualmachines", n,
                        {"metadata": {"labels": {"bench/touch": str(i)}}}), names))
            time.sleep(3)
            changed = {n: events_of(p) for n, p in ports.items()}
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: crd.delete_namespaced_custom_object(
                    meta.GROUP, meta.VERSION, b.NS, "virtualmachines", n), names))
            vms.wait(names, "deleted", 900)
            time.sleep(2)
            after = {n: events_of(p) for n, p in ports.items()}
        finally:
            vms.close()

    growth = (rss_full - rss_idle) / args.vms
    grew = {k: v - idle_census.get(k, 0) for k, v in full_census.items() if v != idle_census.get(k, 0)}
    traffic = {}
    for n in ports:
        traffic[n] = {
            "start": {k: started[n][k] - before[n][k] for k in ("own", "other")},
            "change": {k: changed[n][k] - started[n][k] for k in ("own", "other")},
            "delete": {k: after[n][k] - changed[n][k] for k in ("own", "other")},
        }
        traffic[n]["total"] = sum(v for phase in traffic[n].values() for v in phase.values())
    result.update({"rss_idle": rss_idle, "rss_full": rss_full, "growth_per_vm": growth,
                   "all_ready_seconds": all_ready, "processes_idle": idle_census, "processes_full": full_census,
                   "processes_grown": grew, "watch_events": traffic, "changes_per_vm": CHANGES,
                   "busy_node": busy.name, "quiet_node": quiet.name})
    print(f"agent of {busy.name} with {args.vms} VMs (all Ready after {all_ready:.1f} s)")
    print(f"  RSS idle {rss_idle / MI:.1f} MiB, with {args.vms} VMs {rss_full / MI:.1f} MiB: "
          f"{growth / 1024:.0f} KiB per VM")
    print(f"  processes on the node, idle: {idle_census}; with the VMs, grown: {grew}")
    for n, t in traffic.items():
        print(f"  watch events received by the agent of {n}: " + ", ".join(
            f"{phase} own {v['own']:.0f} other {v['other']:.0f}" for phase, v in t.items() if phase != "total"))
    result["targets"] = [
        {"what": "agent RSS <= 120 MB", "value": rss_full, "met": rss_full <= 120e6},
        {"what": "growth per VM <= 200 KB", "value": growth, "met": growth <= 200e3},
        {"what": "no per-VM process besides QEMU", "value": grew,
         "met": set(grew) <= {"qemu-system-x86", "qemu-system-x86_64"}},
        {"what": f"agent of {quiet.name} receives no event of {busy.name}'s VMs",
         "value": traffic[quiet.name]["total"], "met": traffic[quiet.name]["total"] == 0},
        {"what": f"agent of {busy.name} receives no event of other nodes' VMs",
         "value": sum(v["other"] for k, v in traffic[busy.name].items() if k != "total"),
         "met": all(v["other"] == 0 for k, v in traffic[busy.name].items() if k != "total")},
    ]
    for t in result["targets"]:
        print(f"  {'met ' if t['met'] else 'MISS'} {t['what']}")
    print(f"wrote {b.write_result(args.out, result)}")


if __name__ == "__main__":
    sys.exit(main())
