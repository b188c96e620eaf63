"""Live updates: a spec patch until Ready for the new generation, against the same libvirt call
made directly, in the same run; and how soon a change made behind the operator's back is seen.

Starts its own world (one libvirt node, the operator) and two running test guests on it with the
same rendered devices: one is a VirtualMachine, the other a raw domain of the same XML defined by
this script. For each operation, repeated --repeat times:

  vcpu     +1 vCPU          operator: patch cpu.vcpus        raw: setVcpusFlags(n, LIVE|CONFIG)
  dimm     +128Mi memory    operator: patch memory.size      raw: attachDeviceFlags(<memory model='dimm'>)
  disk     attach a disk    operator: append to spec.disks   raw: attachDeviceFlags(<disk>, LIVE|CONFIG)

The operator's time runs from the patch call to the watch event whose status shows the patched
generation applied with Ready True; raw's from the call to its return. Target (issue 7): operator
p95 <= raw p95 + 0.3 s. Drift: after a hand `setmem` and a hand `detach-device` on the VM, the time
until the operator has put it back (the domain event this script receives for the correction).
Writes bench/results/live_update.json.

    .venv/bin/python bench/live_update.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import uuid

import libvirt
from kubernetes import client

import benchlib as b
from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain

TARGET_OVERHEAD = 0.3
OPS = ("vcpu", "dimm", "disk")


def spec_for(image, repeat: int) -> dict:
    s = b.kernel_spec(image, memory="192Mi")
    s["cpu"] = {"vcpus": 1, "maxVcpus": 1 + repeat}
    s["memory"] = {"size": "192Mi", "maxSize": f"{192 + 128 * repeat}Mi"}
    s["shutdown"] = {"mode": "force"}
    return s


def make_disk(storage, name: str) -> str:
    path = storage / "images" / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return str(path)


def applied(gen: int):
    def check(vm: dict) -> bool:
        st = vm.get("status") or {}
        ready = {c["type"]: c for c in st.get("conditions") or []}.get("Ready", {})
        return (st.get("observedGeneration") or 0) >= gen and ready.get("status") == "True"
    return check


class Applied:
    """Watch: when each VM first showed a generation applied."""

    def __init__(self, api: client.ApiClient):
        self.vms = client.CustomObjectsApi(api)
        self.seen: dict[int, float] = {}
        self._cv = threading.Condition()
        self._watch = b.VMWatch(api, predicates={})
        self._watch._observe = self._observe  # every event, not only first marks

    def _observe(self, _kind: str, obj: dict, now: float) -> None:
        st = obj.get("status") or {}
        ready = {c["type"]: c for c in st.get("conditions") or []}.get("Ready", {})
        if ready.get("status") == "True":
            with self._cv:
                self.seen.setdefault(st.get("observedGeneration") or 0, now)
                self._cv.notify_all()

    def wait(self, gen: int, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                hit = [t for g, t in self.seen.items() if g >= gen]
                if hit:
                    return min(hit)
                if time.monotonic() > deadline:
                    raise SystemExit(f"generation {gen} never applied")
                self._cv.wait(1.0)

    def close(self) -> None:
        self._watch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from localenv.guest import wait_for_marker

    with b.world() as w:
        node, cluster, image = w.nodes[0], w.cluster, w.cluster.image
        spec = spec_for(image, args.repeat)
        vms = client.CustomObjectsApi(w.api)
        vms.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                            b.vm_body("live", spec))
        watch = Applied(w.api)
        watch.wait(1, 180)
        conn = libvirt.open(node.uri)
        vm = vms.get_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", "live")
        dom = conn.lookupByUUIDString(vm["metadata"]["uid"])
        raw_uuid = str(uuid.uuid4())
        console = cluster.storage_dir / "console" / "bench_raw.console.log"
        raw_xml = render_domain(VirtualMachineSpec.model_validate(spec), name="bench_raw", uuid=raw_uuid,
                                namespace="bench", vm_name="raw", generation=1, domain_type="qemu",
                                console_log=str(console)).to_xml()
        raw = conn.defineXML(raw_xml)
        raw.create()
        wait_for_marker(console, image.ready_marker, 120)
        wait_for_marker(cluster.storage_dir / "console" / f"{b.NS}_live.console.log", image.ready_marker, 120)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        results = {op: {"raw": [], "operator": []} for op in OPS}
        disks = []
        for i in range(1, args.repeat + 1):
            # vCPU
            t = time.perf_counter()
            raw.setVcpusFlags(1 + i, flags)
            results["vcpu"]["raw"].append(time.perf_counter() - t)
            spec["cpu"]["vcpus"] = 1 + i
            t = time.perf_counter()
            gen = vms.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", "live",
                                                     {"spec": {"cpu": spec["cpu"]}})["metadata"]["generation"]
            results["vcpu"]["operator"].append(watch.wait(gen) - t)
            # DIMM
            dimm = ("<memory model='dimm'><target><size unit='MiB'>128</size><node>0</node></target>"
                    f"<alias name='ua-dimm-raw{i}'/></memory>")
            t = time.perf_counter()
            raw.attachDeviceFlags(dimm, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            results["dimm"]["raw"].append(time.perf_counter() - t)
            spec["memory"]["size"] = f"{192 + 128 * i}Mi"
            t = time.perf_counter()
            gen = vms.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", "live",
                                                     {"spec": {"memory": spec["memory"]}})["metadata"]["generation"]
            results["dimm"]["operator"].append(watch.wait(gen) - t)
            # disk
            path = make_disk(cluster.storage_dir, f"bench-raw-{i}")
            target = "vd" + "bcdefgh"[i - 1]
            t = time.perf_counter()
            raw.attachDeviceFlags(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                                  f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>", flags)
            results["disk"]["raw"].append(time.perf_counter() - t)
            disks.append({"name": f"d{i}", "path": make_disk(cluster.storage_dir, f"bench-op-{i}")})
            t = time.perf_counter()
            gen = vms.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", "live",
                                                     {"spec": {"disks": disks}})["metadata"]["generation"]
            results["disk"]["operator"].append(watch.wait(gen) - t)

        drift = measure_drift(w.api, dom)
        watch.close()
        raw.destroy()
        raw.undefine()
        conn.close()

    report(results, drift, args)


def measure_drift(api, dom) -> dict:
    """Hand changes behind the operator's back, until the operator has put them back: for setmem the
    operator's DriftCorrected Event (an upper bound: it is posted after the correction), for a detach
    the device back in the live XML."""
    core = client.CoreV1Api(api)
    out = {}
    before = {e.metadata.name for e in core.list_namespaced_event(b.NS).items}
    t = time.perf_counter()
    dom.setMemoryFlags(dom.info()[1] - 64 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    while time.perf_counter() - t < 60:
        fresh = [e for e in core.list_namespaced_event(b.NS).items
                 if e.metadata.name not in before and e.reason == "DriftCorrected"]
        if fresh:
            break
        time.sleep(0.05)
    out["setmem"] = time.perf_counter() - t
    t = time.perf_counter()
    dom.detachDeviceAlias("ua-disk-d1", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    gone = False
    while time.perf_counter() - t < 60:
        present = "ua-disk-d1" in dom.XMLDesc(0)
        gone = gone or not present
        if gone and present:
            break
        time.sleep(0.02)
    out["detach-device"] = time.perf_counter() - t
    return out


def report(results: dict, drift: dict, args) -> None:
    lines, ok = [], True
    data = {"machine": b.machine(), "repeat": args.repeat, "ops": {}, "drift_seconds": drift}
    for op, r in results.items():
        raw, opr = b.summary(r["raw"]), b.summary(r["operator"])
        met = opr["p95"] <= raw["p95"] + TARGET_OVERHEAD
        ok &= met
        data["ops"][op] = {"raw": raw, "operator": opr, "overhead_p95_s": opr["p95"] - raw["p95"], "target_met": met}
        lines.append(f"{op:5} raw p50 {b.ms(raw['p50'])} p95 {b.ms(raw['p95'])} | operator p50 {b.ms(opr['p50'])} "
                     f"p95 {b.ms(opr['p95'])} | overhead p95 {b.ms(opr['p95'] - raw['p95'])} "
                     f"({'ok' if met else 'MISSED'} <= {int(TARGET_OVERHEAD * 1000)} ms)")
    print("spec patch -> Ready for the new generation vs the raw libvirt call")
    print("\n".join(lines))
    for what, secs in drift.items():
        print(f"drift: hand {what} put back after {b.ms(secs)}")
    print(f"written {b.write_result('live_update', data)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
