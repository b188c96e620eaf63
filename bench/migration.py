"""Migrations (issue 9): a Live migration between two nodes and a Storage migration on one node, through the
operator against the same libvirt calls made directly, on the same kind of guest, in one run.

Starts its own world (libvirt nodes node-a and node-b, the operator; the world's storage root is declared
shared by both agents) and two running test guests with the same rendered devices (192Mi; a 64M qcow2 system
disk; one data disk per storage round, each a qcow2 leaf holding --data-mib MiB over a sparse raw parent
holding as much, all in the shared root): one a VirtualMachine, the other a raw domain of the same XML defined
by this script on node-a. Rounds alternate raw and operator (one warm-up round of each first, not counted):

  live     raw:      migrateToURI3(<other node's URI>, {URI: tcp://127.0.0.1, LISTEN_ADDRESS: 127.0.0.1},
                     PEER2PEER|LIVE|PERSIST_DEST|UNDEFINE_SOURCE|AUTO_CONVERGE|UNSAFE) returns
                     (the flags and parameters agent/migrations/live.py passes for a Live migration here)
           operator: create a VMMigration {type: Live, targetNode: <other node>} -> the watch event with
                     phase Succeeded
           each round goes the other way (node-a -> node-b, then back)
  storage  raw:      the handbook's blockcopy, done directly: cp --sparse=always of the data disk's parent
                     into a new directory, qemu-img create -f qcow2 -F raw -b <copy> <new leaf>,
                     blockCopy(SHALLOW|REUSE_EXT|TRANSIENT_JOB), wait for the READY block-job event,
                     blockJobAbort(PIVOT), then the handbook's last steps: the persistent definition on the
                     new paths, the old files removed (the operator's Record and Cleanup do the same work
                     before Succeeded; "pivoted" shows the time to the pivot alone)
           operator: create a VMMigration {type: Storage, disks: [{name: dataN, destinationPath: <new dir>}]}
                     -> the watch event with phase Succeeded (its own Record and Cleanup included)
           each round moves the next data disk (a disk is moved once: see bench/README.md, the disk record
           of a moved disk)

Times are time.perf_counter() in this process, taken when a call returns, a Kubernetes watch event arrives
(VMMigrations and VirtualMachines) or a libvirt event arrives (lifecycle and block-job events of both nodes):
nothing polls. The operator's phases (PreChecking, the target's pre-check answer, Running and its steps,
HandingOver, the VM's status.migration states and node label, Succeeded) come from the same watches, with
the libvirt events of its domain, so that the overhead can be explained. Target: operator / raw <= 1.10
(overhead <= 10 %), at p50 and at p95 (reported, never asserted). Writes bench/results/migration.json.

    .venv/bin/python bench/migration.py [--repeat 5] [--warmup 1] [--only live,storage] [--data-mib 64] [--logs DIR]
                                        [--memory 192Mi] [--fill-mib 0]

--memory and --fill-mib give both guests more memory and fill part of it with random bytes in a tmpfs: a guest in
use, whose migration carries that memory, where the default one is idle (its migration is about the fixed cost of
starting the target's QEMU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
from kubernetes import client

import benchlib as b
from libvirt_operator.api import meta
from libvirt_operator.api.virtualmachine import VirtualMachineSpec
from libvirt_operator.domain.render import render_domain
from libvirt_operator.domain.snapshot import retarget_disks
from libvirt_operator.hypervisor import readxml
from snapshot import Watcher

TARGET_RATIO = 1.10
VM = "migbench"
RAW = "migbench_raw"
NODES = ("node-a", "node-b")
OTHER = {"node-a": "node-b", "node-b": "node-a"}
LIVE_FLAGS = (libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_AUTO_CONVERGE | libvirt.VIR_MIGRATE_UNSAFE)
LIVE_PARAMS = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1", libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}
COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
              | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
TERMINAL = ("Succeeded", "Failed", "Aborted")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# -- the guests' disks -----------------------------------------------------------------------------

def make_disks(images: Path, prefix: str, count: int, data_mib: int) -> dict:
    """root: an empty 64M qcow2; data1..data<count>: each a qcow2 leaf with `data_mib` MiB written over a sparse
    raw parent holding as many MiB of random bytes (virtual size 4 x data_mib, at least 64M)."""
    root = images / f"{prefix}-root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root), "64M"], check=True)
    data = []
    for n in range(1, count + 1):
        parent, leaf = images / f"{prefix}-data{n}-base.raw", images / f"{prefix}-data{n}.qcow2"
        with open(parent, "wb") as f:
            f.truncate(max(64, 4 * data_mib) << 20)
        if data_mib:
            subprocess.run(["dd", "if=/dev/urandom", f"of={parent}", "bs=1M", f"count={data_mib}", "conv=notrunc",
                            "status=none"], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(parent), str(leaf)],
                       check=True)
        if data_mib:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {data_mib}M {data_mib}M", str(leaf)],
                           check=True, capture_output=True)
        data.append({"name": f"data{n}", "leaf": str(leaf), "parent": str(parent)})
    return {"root": str(root), "data": data}


def spec_for(image, files: dict, memory: str = "192Mi") -> dict:
    s = b.kernel_spec(image, memory=memory)
    s["disks"] = [{"name": "root", "path": files["root"], "format": "qcow2"},
                  *({"name": d["name"], "path": d["leaf"], "format": "qcow2"} for d in files["data"])]
    return s


# -- libvirt events of both nodes ------------------------------------------------------------------

class Events(b.DomainEvents):
    """Lifecycle events (with suspended/resumed) and block-job events (READY, COMPLETED) of one node."""

    KINDS = {**b.DomainEvents.KINDS, libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
             libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed"}
    JOB = {libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready", libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
           libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed", libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled"}

    def __init__(self, uri: str):
        super().__init__(uri)
        self._job_cb = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_job,
                                                        None)

    def _on_job(self, _conn, dom, disk, _type, status, _opaque) -> None:
        now = time.perf_counter()
        kind = self.JOB.get(status)
        if kind is None:
            return
        with self._lock:
            self.marks.setdefault(dom.UUIDString(), {}).setdefault(f"{disk}:{kind}", now)
            self._lock.notify_all()

    def when(self, uid: str, kind: str) -> float | None:
        with self._lock:
            return self.marks.get(uid, {}).get(kind)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self._job_cb)
        super().close()


def rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


# -- the raw side ----------------------------------------------------------------------------------

class Raw:
    """The same domain defined by hand on node-a, migrated and block-copied by the libvirt calls themselves."""

    def __init__(self, nodes: dict, events: dict[str, Events], xml: str, files: dict[str, str]):
        self.nodes, self.events = nodes, events
        self.conns = {name: libvirt.open(n.uri) for name, n in nodes.items()}
        self.node = "node-a"
        dom = self.conns[self.node].defineXML(xml)
        dom.create()
        self.uuid = dom.UUIDString()
        targets = {d.path: d.target for d in readxml.disk_sources(dom.XMLDesc(0))}
        self.data = [{**d, "target": targets[d["leaf"]]} for d in files["data"]]  # one disk moved per round

    def dom(self) -> libvirt.virDomain:
        return self.conns[self.node].lookupByUUIDString(self.uuid)

    def live(self) -> tuple[float, dict]:
        src, dst = self.node, OTHER[self.node]
        dom = self.dom()
        for ev in self.events.values():
            ev.reset(self.uuid)
        t = time.perf_counter()
        dom.migrateToURI3(self.nodes[dst].uri, LIVE_PARAMS, LIVE_FLAGS)
        spent = time.perf_counter() - t
        self.node = dst
        if self.dom().state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            raise SystemExit(f"raw live migration: the domain does not run on {dst}")
        self.events[src].wait([self.uuid], "stopped", 60)
        phases = {"dest QEMU started": rel(self.events[dst].when(self.uuid, "started"), t),
                  "source stopped (migrated)": rel(self.events[src].when(self.uuid, "stopped"), t),
                  "dest resumed": rel(self.events[dst].when(self.uuid, "resumed"), t),
                  "call returned": round(spent, 3), "direction": f"{src} -> {dst}"}
        return spent, phases

    def storage(self, dest_dir: Path) -> tuple[float, dict]:
        """The handbook's sequence, the next data disk's parent and leaf into `dest_dir`; (seconds to its end,
        the old files removed; steps)."""
        dom = self.dom()
        disk = self.data.pop(0)
        target, leaf, parent = disk["target"], disk["leaf"], disk["parent"]
        new_parent, new_leaf = str(dest_dir / Path(parent).name), str(dest_dir / Path(leaf).name)
        capacity = dom.blockInfo(target)[0]
        dest_xml = f"<disk type='file'><driver type='qcow2'/><source file='{new_leaf}'/></disk>"
        ev = self.events[self.node]
        ev.reset(self.uuid)
        t0 = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", parent, new_parent], check=True)
        t1 = time.perf_counter()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", new_parent, new_leaf,
                        str(capacity)], check=True)
        t2 = time.perf_counter()
        dom.blockCopy(target, dest_xml, {}, COPY_FLAGS)
        ev.wait([self.uuid], f"{target}:ready", 300)
        t3 = ev.when(self.uuid, f"{target}:ready")
        dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        t4 = time.perf_counter()
        # the handbook's steps 5-6: the persistent definition on the new files, the old files removed
        self.conns[self.node].defineXML(retarget_disks(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                                                       {target: new_leaf}))
        os.unlink(leaf)
        os.unlink(parent)
        t5 = time.perf_counter()
        active = next(d.path for d in readxml.disk_sources(dom.XMLDesc(0)) if d.target == target)
        if active != new_leaf:
            raise SystemExit(f"raw storage move: {target} runs on {active}, not {new_leaf}")
        return t5 - t0, {"parent copied": round(t1 - t0, 3), "leaf created": round(t2 - t0, 3),
                         "READY": round(t3 - t0, 3), "pivoted": round(t4 - t0, 3), "disk": disk["name"],
                         "tail (define + rm)": round(t5 - t4, 3)}

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                dom = conn.lookupByUUIDString(self.uuid)
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                dom.undefine()
            conn.close()


# -- the operator side ----------------------------------------------------------------------------

def _status(o: dict) -> dict:
    return o.get("status") or {}


def _ready(o: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in _status(o).get("conditions") or [])


def _why(o: dict) -> str | None:
    st = _status(o)
    if st.get("phase") not in ("Failed", "Aborted"):
        return None
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return f"{st.get('phase')}: {ready.get('reason')}: {ready.get('message')}"


class Operator:
    def __init__(self, api: client.ApiClient, events: dict[str, Events], timeout: float):
        self.objs = client.CustomObjectsApi(api)
        self.migs, self.vms = Watcher(api, "vmmigrations"), Watcher(api, "virtualmachines")
        self.events, self.timeout = events, timeout
        self.node = "node-a"
        self.uid = ""
        self.count = 0

    def start(self, spec: dict, files: dict) -> None:
        self.data = list(files["data"])  # one disk moved per round (see the README: a moved disk's record)
        self.vms.expect(VM, "ready", _ready)
        self.objs.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "virtualmachines",
                                                  b.vm_body(VM, {**spec, "nodeName": self.node}))
        self.vms.wait(VM, "ready", 300)
        self.uid = self.vms.last[VM]["metadata"]["uid"]

    def _run(self, name: str, spec: dict, settled) -> tuple[float, list, list, float]:
        """Creates the VMMigration, waits for Succeeded: (seconds, its status events, the VM's, t0)."""
        body = {"apiVersion": meta.API_VERSION, "kind": "VMMigration", "metadata": {"name": name, "namespace": b.NS},
                "spec": {"vmName": VM, **spec}}
        self.migs.expect(name, "done", lambda o: _status(o).get("phase") == "Succeeded")
        self.vms.expect(VM, f"settled-{name}", settled)
        with self.migs._cv:
            self.migs.trace[name] = []
        with self.vms._cv:
            self.vms.trace[VM] = []
        for ev in self.events.values():
            ev.reset(self.uid)
        t = time.perf_counter()
        self.objs.create_namespaced_custom_object(meta.GROUP, meta.VERSION, b.NS, "vmmigrations", body)
        done = self.migs.wait(name, "done", self.timeout, failed=_why)
        # not counted: the VM settled (Ready on its node) before the next round
        self.vms.wait(VM, f"settled-{name}", self.timeout)
        with self.migs._cv:
            mig_events = self.migs.trace.pop(name, [])
        with self.vms._cv:
            vm_events = self.vms.trace.pop(VM, [])
        return done - t, mig_events, vm_events, t

    @staticmethod
    def _mig_phases(mig_events: list, t: float) -> dict:
        out: dict[str, float] = {}
        for when, st in mig_events:
            phase = st.get("phase") or "(none)"
            out.setdefault(phase, round(when - t, 3))
            if st.get("target"):
                out.setdefault("PreChecking: target answered", round(when - t, 3))
            if st.get("step"):
                out.setdefault(f"{phase}/{st['step']}", round(when - t, 3))
        return out

    def live(self) -> tuple[float, dict]:
        self.count += 1
        src, dst = self.node, OTHER[self.node]
        name = f"{VM}-live-{self.count}"

        def settled(o: dict) -> bool:
            mig = _status(o).get("migration") or {}
            return (mig.get("name") == name and mig.get("state") == "Succeeded" and _ready(o)
                    and _status(o).get("nodeName") == dst)

        self.vms.expect(VM, f"label-{name}", lambda o: (o["metadata"].get("labels") or {}).get(meta.NODE_LABEL) == dst)
        spent, mig_events, vm_events, t = self._run(name, {"type": "Live", "targetNode": dst}, settled)
        self.node = dst
        phases = self._mig_phases(mig_events, t)
        for when, st in vm_events:
            mig = st.get("migration") or {}
            if mig.get("name") == name:
                phases.setdefault(f"VM migration {mig.get('state')}", round(when - t, 3))
            if st.get("nodeName") == dst:
                phases.setdefault("VM status.nodeName = target", round(when - t, 3))
        phases["dest QEMU started"] = rel(self.events[dst].when(self.uid, "started"), t)
        phases["source stopped (migrated)"] = rel(self.events[src].when(self.uid, "stopped"), t)
        phases["dest resumed"] = rel(self.events[dst].when(self.uid, "resumed"), t)
        phases["VM node label = target"] = rel(self.vms.marks.get((VM, f"label-{name}")), t)
        phases["VM settled (Ready on target)"] = rel(self.vms.marks.get((VM, f"settled-{name}")), t)
        phases["direction"] = f"{src} -> {dst}"
        st = _status(self.migs.last.get(name) or {})
        phases["status.durationMilliseconds"] = st.get("durationMilliseconds")
        phases["progress.elapsedMilliseconds"] = (st.get("progress") or {}).get("elapsedMilliseconds")
        return spent, phases

    def storage(self, dest_dir: Path) -> tuple[float, dict]:
        self.count += 1
        name = f"{VM}-storage-{self.count}"
        disk = self.data.pop(0)
        leaf = str(dest_dir / Path(disk["leaf"]).name)

        def settled(o: dict) -> bool:  # not Ready: a moved disk turns the VM Drifted (see bench/README.md)
            mig = _status(o).get("migration") or {}
            return mig.get("name") == name and mig.get("state") == "Succeeded"

        spent, mig_events, _vm, t = self._run(name, {"type": "Storage", "disks": [
            {"name": disk["name"], "destinationPath": leaf}]}, settled)
        phases = self._mig_phases(mig_events, t)
        ev = self.events[self.node]
        with ev._lock:
            jobs = {k: v for k, v in ev.marks.get(self.uid, {}).items() if ":" in k}
        for kind, when in sorted(jobs.items(), key=lambda kv: kv[1]):
            phases[f"block job {kind.split(':', 1)[1]}"] = round(when - t, 3)
        st = _status(self.migs.last.get(name) or {})
        phases["status.durationMilliseconds"] = st.get("durationMilliseconds")
        phases["disk"] = disk["name"]
        return spent, phases

    def vm_conditions(self) -> dict:
        """The VM's conditions now, by type: (status, reason, message)."""
        return {c.get("type"): [c.get("status"), c.get("reason"), c.get("message")]
                for c in _status(self.vms.last.get(VM) or {}).get("conditions") or []}

    def close(self) -> None:
        self.migs.close()
        self.vms.close()


# -- the run ---------------------------------------------------------------------------------------

def fill(dom: libvirt.virDomain, mib: int) -> None:
    """`mib` MiB of random bytes in a tmpfs of the guest (pages a migration must copy, none of them zero)."""
    from localenv.guest import guest_sh
    guest_sh(dom, f"mkdir -p /run/fill && mount -t tmpfs -o size={mib + 8}m fill /run/fill && "
             f"dd if=/dev/urandom of=/run/fill/bytes bs=1M count={mib} 2>/dev/null && "
             "grep -E 'MemTotal|MemFree|Shmem:' /proc/meminfo", timeout=600)
    print(f"{dom.name()}: {mib} MiB of random bytes in a tmpfs", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (each side)")
    ap.add_argument("--only", default="live,storage", help="comma-separated: live, storage")
    ap.add_argument("--data-mib", type=int, default=64, help="MiB written in the data disk's parent and in its leaf")
    ap.add_argument("--memory", default="192Mi", help="the guests' memory")
    ap.add_argument("--fill-mib", type=int, default=0,
                    help="MiB of random bytes each guest keeps in a tmpfs before the rounds (memory a migration "
                    "must carry: a guest in use, not an idle one)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each measured operation")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one operator migration may take")
    ap.add_argument("--out", default="migration", help="results/<out>.json")
    ap.add_argument("--logs", type=Path, help="copy the world's controller and agent logs here before teardown")
    args = ap.parse_args()
    kinds = [k for k in ("live", "storage") if k in args.only.split(",")]
    libvirt.registerErrorHandler(lambda *_: None, None)  # lookups that miss (where a domain is not) say nothing
    from localenv.guest import wait_for_marker

    load = {"before": uptime()}
    print(f"load before: {load['before']}", flush=True)
    results = {k: {"raw": [], "operator": []} for k in kinds}
    phases = {k: {"raw": [], "operator": []} for k in kinds}
    errors: dict[str, str] = {}
    vm_after: dict = {}
    with b.world(NODES) as w:
        nodes = {n.name: n for n in w.nodes}
        cluster, image = w.cluster, w.cluster.image
        images = cluster.storage_dir / "images"
        console = cluster.storage_dir / "console"
        events = {name: Events(n.uri) for name, n in nodes.items()}
        raw = opr = None
        try:
            disks = (args.warmup + args.repeat) if "storage" in kinds else 1
            raw_files = make_disks(images, "raw", disks, args.data_mib)
            op_files = make_disks(images, "op", disks, args.data_mib)
            raw_console = console / f"{RAW}.console.log"
            xml = render_domain(VirtualMachineSpec.model_validate(spec_for(image, raw_files, args.memory)), name=RAW,
                                uuid=str(uuid.uuid4()), namespace="bench", vm_name="raw", generation=1,
                                domain_type="qemu", console_log=str(raw_console)).to_xml()
            raw = Raw(nodes, events, xml, raw_files)
            opr = Operator(w.api, events, args.timeout)
            opr.start(spec_for(image, op_files, args.memory), op_files)
            wait_for_marker(raw_console, image.ready_marker, 300)
            wait_for_marker(console / f"{b.NS}_{VM}.console.log", image.ready_marker, 300)
            if args.fill_mib:
                for dom in (raw.dom(), raw.conns[opr.node].lookupByUUIDString(opr.uid)):
                    fill(dom, args.fill_mib)
            for kind in kinds:
                for i in range(1, args.warmup + args.repeat + 1):
                    counted = i > args.warmup
                    for side, runner in (("raw", raw), ("operator", opr)):
                        if side == "operator" and "operator" in errors:
                            continue
                        time.sleep(args.settle)
                        try:
                            if kind == "live":
                                spent, steps = runner.live()
                            else:
                                dest = images / f"moved-{side}-{i}"
                                dest.mkdir()
                                spent, steps = runner.storage(dest)
                        except RuntimeError as exc:  # the operator side is reported, the raw side carries on
                            errors["operator"] = f"{kind} round {i}: {exc}"
                            print(f"operator side stopped: {exc}", file=sys.stderr, flush=True)
                            continue
                        steps["counted"] = counted
                        phases[kind][side].append(steps)
                        if counted:
                            results[kind][side].append(spent)
                        print(f"{kind} round {i}{'' if counted else ' (warm-up)'} {side}: {spent:.3f} s  {steps}",
                              flush=True)
            if opr is not None and "storage" in kinds:
                time.sleep(10)  # what the VM says once its agent has looked at it again after the moves
                vm_after = opr.vm_conditions()
                print(f"VM conditions 10 s after the last storage migration: {vm_after}", flush=True)
        finally:
            load["after"] = uptime()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in (w.dir / "operator").glob("*.log"):
                    shutil.copy(log, args.logs / log.name)
            if opr is not None:
                opr.close()
            if raw is not None:
                raw.close()
            for ev in events.values():
                ev.close()
    print(f"load after: {load['after']}", flush=True)
    report(results, phases, errors, load, args, vm_after)


def _median_phases(rounds: list[dict]) -> dict:
    keys: dict[str, list[float]] = {}
    for r in rounds:
        if not r.get("counted"):
            continue
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                keys.setdefault(k, []).append(v)
    return {k: round(b.pct(v, 50), 3) for k, v in sorted(keys.items(), key=lambda kv: b.pct(kv[1], 50))}


def report(results: dict, phases: dict, errors: dict, load: dict, args, vm_after: dict) -> None:
    data = {"repeat": args.repeat, "warmup": args.warmup, "data_mib": args.data_mib, "memory": args.memory,
            "fill_mib": args.fill_mib, "settle_s": args.settle,
            "target": f"operator / raw <= {TARGET_RATIO} at p50 and p95", "load": load, "ops": {}, "errors": errors,
            "phases_s": phases, "vm_conditions_after_storage": vm_after}
    ok = not errors
    print(f"\nmigrations: operator vs the libvirt calls, {args.repeat} round(s) each (+{args.warmup} warm-up)")
    print(f"{'':8} {'raw p50 / p95 / max (s)':>26} | {'operator p50 / p95 / max (s)':>29} | ratio p50 / p95 | target")
    for kind, r in results.items():
        raw, opr = b.summary(r["raw"]), b.summary(r["operator"])
        entry: dict = {"raw": raw, "operator": opr, "raw_seconds": r["raw"], "operator_seconds": r["operator"],
                       "raw_phases_median_s": _median_phases(phases[kind]["raw"]),
                       "operator_phases_median_s": _median_phases(phases[kind]["operator"])}
        line = f"{kind:8} {raw.get('p50', 0):8.2f} / {raw.get('p95', 0):5.2f} / {raw.get('max', 0):5.2f}    |"
        if opr.get("n") and raw.get("n"):
            r50, r95 = b.ratio(opr, raw, "p50"), b.ratio(opr, raw, "p95")
            met = r50 <= TARGET_RATIO and r95 <= TARGET_RATIO
            ok &= met
            entry.update(ratio_p50=r50, ratio_p95=r95, overhead_p50_pct=(r50 - 1) * 100,
                         overhead_p95_pct=(r95 - 1) * 100, overhead_p50_s=opr["p50"] - raw["p50"],
                         overhead_p95_s=opr["p95"] - raw["p95"], target_met=met)
            line += (f" {opr['p50']:10.2f} / {opr['p95']:5.2f} / {opr['max']:5.2f}    | {r50:5.2f} / {r95:5.2f}   | "
                     f"overhead {(r50 - 1) * 100:+.0f} % / {(r95 - 1) * 100:+.0f} %: {'met' if met else 'MISSED'}")
        else:
            ok = False
            line += " operator: " + errors.get("operator", "not measured")
        data["ops"][kind] = entry
        print(line)
    for kind in results:
        for side in ("raw", "operator"):
            med = data["ops"][kind][f"{side}_phases_median_s"]
            print(f"{kind} {side} phases (median s after the start): "
                  + ", ".join(f"{k} {v}" for k, v in med.items()))
    print(f"load: before {load['before']!r}, after {load['after']!r}")
    print(f"written {b.write_result(args.out, data)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
