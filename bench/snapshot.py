"""Snapshots (issue 8): an external snapshot with memory and a revert to it, through the operator against the
same libvirt calls made directly, on the same kind of guest, in one run.

Starts its own world (one libvirt node, the operator) and two running test guests with the same rendered
devices (192Mi, a qcow2 system disk and a qcow2 data disk): one a VirtualMachine, the other a raw domain of
the same XML defined by this script. Each round (--repeat times, the two sides in turn):

  create   operator: create a VMSnapshot (External, memory)   -> the watch event with phase Ready
           raw:      snapshotCreateXML(<memory external> + every disk external, LIVE|NO_METADATA) returns
  revert   operator: patch spec.revert {id, snapshot}          -> the watch event with status.lastRevert
                                                                  Succeeded for that id
           raw:      destroy; per disk qemu-img create -f qcow2 -F qcow2 -b <snapshot's file> <new leaf>;
                     saveImageGetXMLDesc(mem) with the disks pointed at the new leaves; defineXML;
                     restoreFlags(mem, xml, RUNNING) returns

Times are time.perf_counter() in this process: from the call to its return (raw), from the API call to the
watch event (operator). Both guests have booted (ready marker on the console) before the first round; each
revert puts a guest back into the running state of its snapshot. Target: operator
p95 <= raw p95 * 1.10 + 0.3 s, for each of create and revert (reported, never asserted). Writes
bench/results/snapshot.json (snapshot-raw.json / snapshot-operator.json with --only: one side alone).

    .venv/bin/python bench/snapshot.py [--repeat 3] [--only raw|operator|both] [--timeout 300]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
from kubernetes import client, watch

import benchlib as b
from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain
from libvirt_operator.hypervisor import readxml

TARGET_FACTOR, TARGET_PLUS = 1.10, 0.3
OPS = ("create", "revert")
VM = "snapbench"


def spec_for(image, storage: Path, prefix: str) -> dict:
    s = b.kernel_spec(image, memory="192Mi")
    s["disks"] = [{"name": "root", "path": make_disk(storage, f"{prefix}-root")},
                  {"name": "data", "path": make_disk(storage, f"{prefix}-data")}]
    return s


def make_disk(storage: Path, name: str) -> str:
    path = storage / "images" / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return str(path)


# -- the raw side ----------------------------------------------------------------------------------

class Raw:
    """The same domain defined by hand, snapshotted and reverted by the libvirt calls themselves."""

    def __init__(self, conn: libvirt.virConnect, xml: str, storage: Path):
        self.conn, self.storage = conn, storage
        self.dom = conn.defineXML(xml)
        self.dom.create()
        self.leaves = self._disks(self.dom.XMLDesc(0))  # {target: active file}

    @staticmethod
    def _disks(xml: str) -> dict[str, str]:
        return {d.target: d.path for d in readxml.disk_sources(xml) if d.device == "disk" and d.path}

    def create(self, name: str) -> tuple[float, dict]:
        """snapshotCreateXML LIVE|NO_METADATA with the memory and every disk external: seconds, the point."""
        mem = str(self.storage / "images" / f"bench-raw.{name}.mem")
        overlays = {t: str(self.storage / "images" / f"bench-raw-{t}.{name}.qcow2") for t in self.leaves}
        disks = "".join(f"<disk name='{t}' snapshot='external'><driver type='qcow2'/><source file='{f}'/></disk>"
                        for t, f in overlays.items())
        xml = (f"<domainsnapshot><name>{name}</name><memory snapshot='external' file='{mem}'/>"
               f"<disks>{disks}</disks></domainsnapshot>")
        t = time.perf_counter()
        self.dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
                                   | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        spent = time.perf_counter() - t
        point = {"memory": mem, "backing": dict(self.leaves)}  # the files it ran on are the snapshot
        self.leaves = overlays
        return spent, point

    def revert(self, point: dict, rid: str) -> float:
        """The manual revert of libvirt 9.0: destroy, new leaves over the snapshot's files, restore the memory
        with the domain XML pointed at them."""
        new = {t: str(self.storage / "images" / f"bench-raw-{t}.r-{rid}.qcow2") for t in point["backing"]}
        t = time.perf_counter()
        self.dom.destroy()
        for tgt, leaf in new.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", point["backing"][tgt],
                            leaf], check=True)
        xml = self.conn.saveImageGetXMLDesc(point["memory"], libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        xml = retarget(xml, new)
        self.conn.defineXML(xml)
        self.conn.restoreFlags(point["memory"], xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        spent = time.perf_counter() - t
        if self.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING or self._disks(self.dom.XMLDesc(0)) != new:
            raise SystemExit(f"raw revert {rid}: the domain is not running on its new leaves")
        self.leaves = new
        return spent

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        self.dom.undefine()


def retarget(domain_xml: str, leaves: dict[str, str]) -> str:
    """Each disk of `leaves` ({target: file}) on its new qcow2 file, without the old <backingStore>."""
    root = ET.fromstring(domain_xml)
    for d in root.findall("./devices/disk"):
        tgt = d.find("target")
        if tgt is None or tgt.get("dev") not in leaves:
            continue
        d.set("type", "file")
        d.find("source").attrib.clear()
        d.find("source").set("file", leaves[tgt.get("dev")])
        drv = d.find("driver")
        if drv is not None:
            drv.set("type", "qcow2")
        for bs in d.findall("backingStore"):
            d.remove(bs)
    return ET.tostring(root, encoding="unicode")


# -- the operator side ----------------------------------------------------------------------------

class Watcher:
    """When an object of `plural` (one namespace) first satisfied a predicate: marks[(name, key)] = time."""

    def __init__(self, api: client.ApiClient, plural: str):
        self.api, self.plural = client.CustomObjectsApi(api), plural
        self.wanted: dict[tuple[str, str], callable] = {}
        self.marks: dict[tuple[str, str], float] = {}
        self.last: dict[str, dict] = {}
        self.trace: dict[str, list[tuple[float, dict]]] = {}  # name -> (time, status) of every event, if traced
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._w: watch.Watch | None = None
        rv = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, plural,
                                                    limit=1)["metadata"]["resourceVersion"]
        threading.Thread(target=self._run, args=(rv,), daemon=True).start()

    def expect(self, name: str, key: str, predicate) -> None:
        with self._cv:
            self.wanted[(name, key)] = predicate
            if name in self.last and predicate(self.last[name]):
                self.marks.setdefault((name, key), time.perf_counter())

    def _run(self, rv: str) -> None:
        while not self._stop.is_set():
            self._w = watch.Watch()
            try:
                for ev in self._w.stream(self.api.list_namespaced_custom_object, meta.GROUP, meta.VERSION, b.NS,
                                         self.plural, resource_version=rv, allow_watch_bookmarks=True,
                                         timeout_seconds=300):
                    now = time.perf_counter()
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("BOOKMARK", "DELETED"):
                        continue
                    name = obj["metadata"]["name"]
                    with self._cv:
                        self.last[name] = obj
                        if name in self.trace:
                            self.trace[name].append((now, obj.get("status") or {}))
                        for (n, key), pred in self.wanted.items():
                            if n == name and (n, key) not in self.marks and pred(obj):
                                self.marks[(n, key)] = now
                        self._cv.notify_all()
            except Exception:  # an expired watch restarts from the newest version
                if self._stop.is_set():
                    return
                rv = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, self.plural,
                                                            limit=1)["metadata"]["resourceVersion"]

    def wait(self, name: str, key: str, timeout: float, failed=None) -> float:
        """The mark's time; RuntimeError on timeout or when `failed(obj)` names a failure."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (name, key) not in self.marks:
                obj = self.last.get(name)
                if failed and obj is not None and (why := failed(obj)):
                    raise RuntimeError(f"{name}: {why}")
                left = deadline - time.monotonic()
                if left <= 0:
                    st = (obj or {}).get("status")
                    raise RuntimeError(f"{name}: no {key} within {timeout:.0f}s; last status: {st}")
                self._cv.wait(min(left, 1.0))
            return self.marks[(name, key)]

    def close(self) -> None:
        self._stop.set()
        if self._w:
            self._w.stop()


def _ready_reason(obj: dict) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return f"{c.get('reason')}: {c.get('message', '')}"
    return ""


class Operator:
    def __init__(self, api: client.ApiClient, timeout: float):
        self.objs = client.CustomObjectsApi(api)
        self.snaps, self.vms = Watcher(api, "vmsnapshots"), Watcher(api, "virtualmachines")
        self.timeout = timeout
        self.agent_ms: list[dict] = []  # each snapshot's own durationMs/downtimeMs (the agent's job)
        self.revert_steps: list[dict] = []  # per revert: when (s after the patch) each lastRevert step showed

    def create(self, name: str) -> float:
        body = {"apiVersion": meta.API_VERSION, "kind": "VMSnapshot", "metadata": {"name": name, "namespace": b.NS},
                "spec": {"vmName": VM, "method": "External", "memory": True}}
        self.snaps.expect(name, "ready", lambda o: (o.get("status") or {}).get("phase") == "Ready")
        t = time.perf_counter()
        self.objs.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "vmsnapshots", body)
        done = self.snaps.wait(name, "ready", self.timeout, failed=lambda o: (
            f"Failed ({_ready_reason(o)})" if (o.get("status") or {}).get("phase") == "Failed" else None))
        st = (self.snaps.last.get(name) or {}).get("status") or {}
        self.agent_ms.append({"durationMs": st.get("durationMs"), "downtimeMs": st.get("downtimeMs")})
        return done - t

    def revert(self, snapshot: str, rid: str) -> float:
        def outcome(o: dict) -> str | None:
            lr = (o.get("status") or {}).get("lastRevert") or {}
            return lr.get("result") if lr.get("id") == rid else None

        self.vms.expect(VM, f"revert-{rid}", lambda o: outcome(o) == "Succeeded")
        with self.vms._cv:
            self.vms.trace[VM] = []
        t = time.perf_counter()
        self.objs.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines", VM,
                                                 {"spec": {"revert": {"id": rid, "snapshot": snapshot}}})
        done = self.vms.wait(VM, f"revert-{rid}", self.timeout, failed=lambda o: (
            f"revert Failed: {(o['status']['lastRevert'] or {}).get('message')}" if outcome(o) == "Failed" else None))
        with self.vms._cv:
            events = self.vms.trace.pop(VM, [])
        steps: dict[str, float] = {}
        for when, st in events:
            lr = st.get("lastRevert") or {}
            if lr.get("id") == rid:
                steps.setdefault(f"{lr.get('result')}/{lr.get('step')}", round(when - t, 3))
        self.revert_steps.append(steps)
        return done - t

    def close(self) -> None:
        self.snaps.close()
        self.vms.close()


# -- the run ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (both sides)")
    ap.add_argument("--only", choices=("raw", "operator", "both"), default="both")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds each operator step may take")
    ap.add_argument("--logs", type=Path, help="copy the world's controller and agent logs here before teardown")
    args = ap.parse_args()
    from localenv.guest import wait_for_marker

    results = {op: {"raw": [], "operator": []} for op in OPS}
    errors: dict[str, str] = {}
    agent_ms: list[dict] = []
    revert_steps: list[dict] = []
    with b.world() as w:
        node, cluster, image = w.nodes[0], w.cluster, w.cluster.image
        storage = cluster.storage_dir
        conn = libvirt.open(node.uri)
        console_dir = storage / "console"
        raw = opr = None
        try:
            if args.only in ("raw", "both"):
                raw_spec = spec_for(image, storage, "bench-raw")
                raw_console = console_dir / "bench_raw.console.log"
                xml = render_domain(VirtualMachineSpec.model_validate(raw_spec), name="bench_raw",
                                    uuid=str(uuid.uuid4()), namespace="bench", vm_name="raw", generation=1,
                                    domain_type="qemu", console_log=str(raw_console)).to_xml()
                raw = Raw(conn, xml, storage)
                wait_for_marker(raw_console, image.ready_marker, 180)
            if args.only in ("operator", "both"):
                opr = Operator(w.api, args.timeout)
                vms = client.CustomObjectsApi(w.api)
                vms.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                                    b.vm_body(VM, spec_for(image, storage, "bench-op")))
                opr.vms.expect(VM, "ready", lambda o: any(c.get("type") == "Ready" and c.get("status") == "True"
                                                          for c in (o.get("status") or {}).get("conditions") or []))
                opr.vms.wait(VM, "ready", 180)
                wait_for_marker(console_dir / f"{b.NS}_{VM}.console.log", image.ready_marker, 180)
            for i in range(1, args.warmup + args.repeat + 1):
                name, rid = f"s{i}", f"r{i}"
                # the first rounds warm both sides (page cache, the agent's first qemu-img, imports): not counted
                keep = (lambda side, op, value: results[op][side].append(value)) if i > args.warmup else (
                    lambda side, op, value: None)
                if raw is not None:
                    spent, point = raw.create(name)
                    keep("raw", "create", spent)
                    keep("raw", "revert", raw.revert(point, rid))
                if opr is not None and "operator" not in errors:
                    try:
                        keep("operator", "create", opr.create(f"{VM}-{name}"))
                        keep("operator", "revert", opr.revert(f"{VM}-{name}", rid))
                    except RuntimeError as exc:  # the operator side is reported, the raw side carries on
                        errors["operator"] = str(exc)
                        print(f"operator side stopped: {exc}", file=sys.stderr)
        finally:
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in w.dir.rglob("*.log"):
                    if "console" not in log.parts:
                        shutil.copy(log, args.logs / log.name)
            if opr is not None:
                agent_ms, revert_steps = opr.agent_ms, opr.revert_steps
                opr.close()
            if raw is not None:
                raw.close()
            conn.close()
    report(results, errors, agent_ms, revert_steps, args)


def report(results: dict, errors: dict, agent_ms: list[dict], revert_steps: list[dict], args) -> None:
    data = {"repeat": args.repeat, "only": args.only, "target": f"operator p95 <= raw p95 * {TARGET_FACTOR} + "
            f"{TARGET_PLUS} s", "ops": {}, "errors": errors, "snapshot_status_ms": agent_ms,
            "revert_steps_s": revert_steps}
    ok = not errors
    print(f"snapshot create (External, memory) and revert: operator vs the libvirt calls, {args.repeat} round(s)")
    for op, r in results.items():
        raw, opr = b.summary(r["raw"]), b.summary(r["operator"])
        entry: dict = {"raw": raw, "operator": opr, "raw_seconds": r["raw"], "operator_seconds": r["operator"]}
        line = f"{op:6} raw p50 {b.ms(raw.get('p50'))} p95 {b.ms(raw.get('p95'))} ms"
        if opr.get("n") and raw.get("n"):
            limit = raw["p95"] * TARGET_FACTOR + TARGET_PLUS
            met = opr["p95"] <= limit
            ok &= met
            entry.update(overhead_p95_s=opr["p95"] - raw["p95"], limit_p95_s=limit, target_met=met)
            line += (f" | operator p50 {b.ms(opr['p50'])} p95 {b.ms(opr['p95'])} ms | overhead p95 "
                     f"{b.ms(opr['p95'] - raw['p95'])} ms ({'ok' if met else 'MISSED'}: limit {b.ms(limit)} ms)")
        elif opr.get("n"):
            line += f" | operator p50 {b.ms(opr['p50'])} p95 {b.ms(opr['p95'])} ms"
        else:
            ok = ok and args.only == "raw"
            line += " | operator: " + (errors.get("operator", "not measured"))
        data["ops"][op] = entry
        print(line)
    if agent_ms:
        print("the snapshots' own status: " + ", ".join(f"durationMs {a['durationMs']} downtimeMs {a['downtimeMs']}"
                                                       for a in agent_ms))
    for i, steps in enumerate(revert_steps, 1):
        print(f"revert {i}: " + ", ".join(f"{k} +{v:.2f}s" for k, v in steps.items()))
    print(f"written {b.write_result('snapshot' if args.only == 'both' else f'snapshot-{args.only}', data)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
