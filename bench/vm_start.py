"""Fair start and delete latency: VirtualMachines through the operator against raw libvirt, phase by phase.

Starts its own world (control plane, one libvirt node, controller, agent), then for each burst
size (default 1, 10 and 50 VMs at once; a single VM is repeated):

  raw       defineXML + create of the XML the agent renders, every domain of the burst kept running
            until all have started, then destroy + undefine of all at once;
  operator  create the VirtualMachine objects at once, then delete them all at once.

Phases, each from the create (or delete) call of that VM, seen through a Kubernetes watch and
libvirt lifecycle events received by this process (nothing polls):

  apply -> Scheduled     the controller's Scheduled=True in status (operator only)
        -> defined       libvirt DEFINED event
        -> running       libvirt STARTED event
        -> Ready         the agent's Ready=True in status (compared with raw's running)
  delete -> deleting     the watch shows deletionTimestamp (operator only: the API server's part)
         -> stopped      libvirt STOPPED event (the destroy done)
         -> domain gone  libvirt UNDEFINED event
         -> object gone  the watch's DELETED (compared with raw's domain gone)

Prints p50 / p95 / max per phase and the operator/raw ratios, checks issue 11's targets, counts
the node's processes with the largest burst running (nothing per VM but QEMU), and writes
bench/results/vm_start.json (bench/report.py draws the chart). --profile DIR: py-spy stacks of the
controller and agent for the largest burst's start and its delete apart, their logs (the agent logs each
teardown's steps in ms) and the wall-clock time of each delete call (delete-wall.json).

    .venv/bin/python bench/vm_start.py [--sizes 1,10,50] [--repeat 5] [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
from kubernetes import client

import benchlib as b  # bench/ is the script's directory, first on sys.path
from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain

START_PHASES = ("scheduled", "defined", "running", "ready")
DELETE_PHASES = ("deleting", "stopped", "domain_gone", "object_gone")
# operator phase -> the raw phase it is compared with
RAW_OF = {"defined": "defined", "running": "running", "ready": "running",
          "stopped": "stopped", "domain_gone": "domain_gone", "object_gone": "domain_gone"}
LABELS = {"scheduled": "apply -> Scheduled", "defined": "      -> defined", "running": "      -> running (libvirt)",
          "ready": "      -> Ready", "deleting": "delete -> watch: deleting",
          "stopped": "       -> domain stopped",
          "domain_gone": "       -> domain gone", "object_gone": "       -> object gone"}
TIMEOUT = 900
DELETE_WALL: dict[str, float] = {}  # VM -> wall-clock time of its delete call


def raw_burst(uri: str, spec: dict, console_dir: Path, names: list[str], events: b.DomainEvents) -> dict:
    """define+create all at once, all kept running until every one has started, then destroy+undefine."""
    parsed = VirtualMachineSpec.model_validate(spec)
    ids = {n: str(uuid.uuid4()) for n in names}
    conns = {n: libvirt.open(uri) for n in names}
    began: dict[str, float] = {}
    barrier = threading.Barrier(len(names))

    def start(name: str) -> libvirt.virDomain:
        xml = render_domain(parsed, name=f"raw_{name}", uuid=ids[name], namespace="raw", vm_name=name,
                            generation=1, domain_type="qemu",
                            console_log=str(console_dir / f"raw_{name}.log")).to_xml()
        barrier.wait()
        began[name] = time.perf_counter()
        dom = conns[name].defineXML(xml)
        dom.create()
        return dom

    with ThreadPoolExecutor(len(names)) as pool:
        doms = dict(zip(names, pool.map(start, names), strict=True))
    events.wait(ids.values(), "started", TIMEOUT)
    ended: dict[str, float] = {}

    def stop(name: str) -> None:
        barrier.wait()
        ended[name] = time.perf_counter()
        doms[name].destroy()
        doms[name].undefine()

    barrier = threading.Barrier(len(names))
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(stop, names))
    events.wait(ids.values(), "undefined", TIMEOUT)
    for c in conns.values():
        c.close()
    ev = {n: events.marks[ids[n]] for n in names}
    return {
        "defined": [ev[n]["defined"] - began[n] for n in names],
        "running": [ev[n]["started"] - began[n] for n in names],
        "stopped": [ev[n]["stopped"] - ended[n] for n in names],
        "domain_gone": [ev[n]["undefined"] - ended[n] for n in names],
    }


def operator_burst(api: client.ApiClient, vms: b.VMWatch, events: b.DomainEvents, spec: dict, names: list[str],
                   node: str, at_peak=None, around=lambda phase: contextlib.nullcontext()) -> dict:
    """Create all at once, wait for Ready, then delete all at once and wait until objects and domains are gone."""
    crd = client.CustomObjectsApi(api)
    for n in names:
        vms.reset(n)
    began: dict[str, float] = {}
    uids: dict[str, str] = {}

    def create(name: str) -> None:
        began[name] = time.perf_counter()
        obj = crd.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                                  b.vm_body(name, {**spec, "nodeName": node}))
        uids[name] = obj["metadata"]["uid"]

    with around("start"), ThreadPoolExecutor(min(len(names), 8)) as pool:
        list(pool.map(create, names))
        vms.wait(names, "ready", TIMEOUT)
        events.wait(uids.values(), "started", TIMEOUT)
    if at_peak is not None:
        at_peak()
    ended: dict[str, float] = {}

    def delete(name: str) -> None:
        ended[name] = time.perf_counter()
        DELETE_WALL[name] = time.time()  # against the agent's log (--profile)
        crd.delete_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", name)

    with around("delete"), ThreadPoolExecutor(min(len(names), 8)) as pool:
        list(pool.map(delete, names))
        vms.wait(names, "deleted", TIMEOUT)
        events.wait(uids.values(), "undefined", TIMEOUT)
    m = {n: vms.marks[n] for n in names}
    ev = {n: events.marks[uids[n]] for n in names}
    return {
        "scheduled": [m[n]["scheduled"] - began[n] for n in names],
        "defined": [ev[n]["defined"] - began[n] for n in names],
        "running": [ev[n]["started"] - began[n] for n in names],
        "ready": [m[n]["ready"] - began[n] for n in names],
        "deleting": [m[n]["deleting"] - ended[n] for n in names],
        "stopped": [ev[n]["stopped"] - ended[n] for n in names],
        "domain_gone": [ev[n]["undefined"] - ended[n] for n in names],
        "object_gone": [m[n]["deleted"] - ended[n] for n in names],
    }


def merge(runs: list[dict]) -> dict:
    out: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run.items():
            out.setdefault(k, []).extend(v)
    return out


def print_size(label: str, raw: dict, op: dict) -> None:
    print(f"\n{label}")
    print(f"  {'phase':<26}{'raw p50':>8} {'p95':>7} {'max':>7} | {'op p50':>7} {'p95':>7} {'max':>7} | "
          "ratio p50   p95")
    for phase in (*START_PHASES, *DELETE_PHASES):
        o = op.get(phase, {})
        r = raw.get(RAW_OF.get(phase, ""), {})
        r50, r95 = ratio_text(o, r, "p50"), ratio_text(o, r, "p95")
        print(f"  {LABELS[phase]:<26}{b.ms(r.get('p50'))} {b.ms(r.get('p95'))} {b.ms(r.get('max'))} | "
              f"{b.ms(o.get('p50'))} {b.ms(o.get('p95'))} {b.ms(o.get('max'))} | {r50:>6} {r95:>6}")


def ratio_text(o: dict, r: dict, key: str) -> str:
    x = b.ratio(o, r, key)
    return "-" if x is None else f"{x:.2f}x"


def targets(sizes: dict) -> list[dict]:
    """Issue 11's targets, from the figures (reported, never asserted)."""
    out = []

    def check(size: str, what: str, op_phase: str, raw_phase: str, slack: float) -> None:
        if size not in sizes:
            return
        o, r = sizes[size]["operator"][op_phase]["p95"], sizes[size]["raw"][raw_phase]["p95"]
        out.append({"what": what, "operator_p95": o, "raw_p95": r, "limit": r + slack, "met": o <= r + slack})

    check("1", "1 VM: Ready p95 <= raw running p95 + 0.3 s", "ready", "running", 0.3)
    check("50", "50 VMs: Ready p95 <= raw running p95 + 1 s", "ready", "running", 1.0)
    check("50", "delete 50: object gone p95 <= raw destroy+undefine p95 + 1 s", "object_gone", "domain_gone", 1.0)
    return out


def process_census(node) -> dict[str, int]:
    return dict(Counter(b.comm(pid) for pid in node.processes()))


class Profiler:
    """py-spy record of the controller and the agent while the largest burst starts or is deleted
    (`<process>-<phase>.txt`: collapsed stacks, threads and idle frames included)."""

    def __init__(self, outdir: Path | None, pids: dict[str, int], phase: str):
        self.outdir, self.pids, self.phase, self.procs = outdir, pids, phase, []

    def __enter__(self):
        if self.outdir:
            self.outdir.mkdir(parents=True, exist_ok=True)
            spy = Path(sys.executable).with_name("py-spy")
            for name, pid in self.pids.items():
                self.procs.append(subprocess.Popen(
                    [str(spy), "record", "-p", str(pid), "-r", "100", "-f", "raw", "--threads", "--idle", "-o",
                     str(self.outdir / f"{name}-{self.phase}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.send_signal(2)  # SIGINT: py-spy writes its file and exits
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10,50", help="burst sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=5, help="runs of the 1-VM case")
    ap.add_argument("--profile", type=Path, help="py-spy the controller and agent during the largest burst")
    ap.add_argument("--out", default="vm_start", help="name of the JSON file under bench/results/")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    with b.world() as w:
        cluster, node = w.cluster, w.nodes[0]
        spec = b.kernel_spec(cluster.image)
        console = cluster.storage_dir / "console"
        api = w.api
        vms = b.VMWatch(api, predicates={"deleting": lambda vm: bool(vm["metadata"].get("deletionTimestamp"))})
        events = b.DomainEvents(node.uri)
        pids = {name: ref.pid for name, ref in cluster.operator.processes.items()}
        try:
            # First-use costs (image cache, QEMU capabilities, kopf's first listing) out of the numbers.
            raw_burst(node.uri, spec, console, ["warmup"], events)
            operator_burst(api, vms, events, spec, ["warmup"], node.name)
            idle = process_census(node)
            results: dict[str, dict] = {}
            census: dict = {"idle": idle}
            cpu: dict[str, dict[str, float]] = {}  # size -> process -> CPU seconds per VM (start + delete)
            loads: dict[str, float] = {}
            for size in sizes:
                runs = args.repeat if size == 1 else 1
                raw_runs, op_runs = [], []
                for i in range(runs):
                    names = [f"s{size}-{i}-{j}" for j in range(size)]
                    raw_runs.append(raw_burst(node.uri, spec, console, names, events))
                    time.sleep(1)
                    profile = args.profile if size == max(sizes) else None

                    def peak(size=size):
                        census[f"{size}_running"] = process_census(node)

                    meter = b.CPUMeter(pids).start()
                    op_runs.append(operator_burst(api, vms, events, spec, names, node.name, at_peak=peak,
                                                  around=lambda phase, p=profile: Profiler(p, pids, phase)))
                    if profile:  # the agent's log (its actions, with ms timestamps) beside the stacks
                        for name in pids:
                            log = cluster.operator.dir / f"{name}.log"
                            if log.exists():
                                shutil.copy(log, profile / f"{name}.log")
                        (profile / "delete-wall.json").write_text(json.dumps({n: DELETE_WALL[n] for n in names}))
                    for proc, spent in meter.stop().items():
                        cpu.setdefault(str(size), {}).setdefault(proc, 0.0)
                        cpu[str(size)][proc] += spent / (size * runs)
                    time.sleep(1)
                raw, op = merge(raw_runs), merge(op_runs)
                results[str(size)] = {"raw": {k: b.summary(v) for k, v in raw.items()},
                                      "operator": {k: b.summary(v) for k, v in op.items()},
                                      "samples": {"raw": raw, "operator": op}}
                label = f"{size} VM{'s' if size > 1 else ''} at once" + (f" (x{runs})" if runs > 1 else "")
                loads[str(size)] = b.load_average()
                print_size(label, results[str(size)]["raw"], results[str(size)]["operator"])
                print("  CPU per VM (start + delete): " + ", ".join(
                    f"{proc} {sec * 1000:.0f} ms" for proc, sec in cpu[str(size)].items())
                    + f"; load average {loads[str(size)]}")
        finally:
            vms.close()
            events.close()

    checks = targets(results)
    print("\ntargets (issue 11):")
    for c in checks:
        print(f"  {'met ' if c['met'] else 'MISS'} {c['what']}: operator {c['operator_p95'] * 1000:.0f} ms, "
              f"limit {c['limit'] * 1000:.0f} ms")
    print("\nprocesses on the node:", "; ".join(f"{k}: {v}" for k, v in census.items()))
    per_vm = {k: v for k, v in census.get(f"{max(sizes)}_running", {}).items() if idle.get(k, 0) != v}
    print(f"  processes that grew with {max(sizes)} VMs: {per_vm or 'none'}")
    path = b.write_result(args.out, {"sizes": results, "targets": checks, "processes": census,
                                     "per_vm_processes": per_vm, "cpu_per_vm": cpu, "load_average": loads})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
