"""Detection latency: a domain stopped behind the operator's back, until status says so.

Starts its own world (one libvirt node, the operator) and N running VMs with `restartPolicy:
Never` (each boots a multiboot kernel that halts: no guest CPU). Then, one VM at a time:

  destroy  `virsh destroy` of its domain, as an operator would type it;
  crash    SIGKILL of its QEMU process (what a crashed QEMU looks like to libvirt).

Measured from the libvirt STOPPED event (received by this process) to the first watch event
whose status has Ready other than True; also from the moment the command was issued. Target
(issue 11): within 2 s. Writes bench/results/detect.json.

    .venv/bin/python bench/detect.py [--vms 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from kubernetes import client

import benchlib as b
from libvirt_operator.api import meta


def not_ready(vm: dict) -> bool:
    conds = {c.get("type"): c for c in (vm.get("status") or {}).get("conditions") or []}
    return (conds.get("Ready") or {}).get("status") != "True"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=10, help="VMs per kind of stop")
    ap.add_argument("--out", default="detect")
    args = ap.parse_args()
    result: dict = {}
    with b.world() as w:
        node = w.nodes[0]
        kernel = b.halt_kernel(w.cluster.storage_dir / "images")
        spec = {**b.halt_spec(kernel), "restartPolicy": "Never", "nodeName": node.name}
        crd = client.CustomObjectsApi(w.api)
        vms = b.VMWatch(w.api, predicates={"down": not_ready})
        events = b.DomainEvents(node.uri)
        try:
            names = {kind: [f"{kind}-{i}" for i in range(args.vms)] for kind in ("destroy", "crash")}
            everyone = [n for ns in names.values() for n in ns]
            uids = {}
            for n in everyone:
                uids[n] = crd.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                                              b.vm_body(n, spec))["metadata"]["uid"]
            vms.wait(everyone, "ready", 600)
            events.wait(uids.values(), "started", 600)
            time.sleep(3)
            reasons: dict[str, list[str]] = {}
            for kind, group in names.items():
                from_event, from_command = [], []
                for n in group:
                    vms.reset(n)
                    events.reset(uids[n])
                    issued = time.perf_counter()
                    if kind == "destroy":
                        vm = crd.get_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", n)
                        domain = (vm["status"].get("domain") or {}).get("name") or uids[n]
                        subprocess.run(["virsh", "-c", node.uri, "destroy", domain], check=True,
                                       capture_output=True)
                    else:
                        pid = b.qemu_pid_of(uids[n])
                        if pid is None:
                            raise SystemExit(f"no QEMU process for {n}")
                        os.kill(pid, signal.SIGKILL)
                    events.wait([uids[n]], "stopped", 60)
                    vms.wait([n], "down", 60)
                    seen = vms.marks[n]["down"]
                    from_event.append(seen - events.marks[uids[n]]["stopped"])
                    from_command.append(seen - issued)
                    vm = crd.get_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", n)
                    ready = next((c for c in vm["status"].get("conditions", []) if c["type"] == "Ready"), {})
                    reasons.setdefault(kind, []).append(ready.get("reason", "?"))
                    time.sleep(0.5)
                result[kind] = {"from_stopped_event": b.summary(from_event), "from_command": b.summary(from_command),
                                "ready_reasons": sorted(set(reasons[kind])),
                                "samples": {"from_stopped_event": from_event, "from_command": from_command}}
        finally:
            vms.close()
            events.close()

    print("domain stopped behind the operator's back -> status Ready != True")
    for kind, r in result.items():
        e, c = r["from_stopped_event"], r["from_command"]
        print(f"  {kind:<8} from libvirt's STOPPED event p50 {b.ms(e['p50'])} ms p95 {b.ms(e['p95'])} ms "
              f"max {b.ms(e['max'])} ms | from the command p50 {b.ms(c['p50'])} ms p95 {b.ms(c['p95'])} ms "
              f"(Ready reason {', '.join(r['ready_reasons'])})")
    result["targets"] = [{"what": f"{kind}: status within 2 s (p95, from the command)",
                          "value": r["from_command"]["p95"], "met": r["from_command"]["p95"] <= 2.0}
                         for kind, r in result.items()]
    for t in result["targets"]:
        print(f"  {'met ' if t['met'] else 'MISS'} {t['what']}")
    print(f"wrote {b.write_result(args.out, result)}")


if __name__ == "__main__":
    sys.exit(main())
