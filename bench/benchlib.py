"""Shared parts of the benchmarks: a world of their own, clocks fed by watches and libvirt events, figures.

Every timestamp is `time.perf_counter()` in the benchmark process, taken when a Kubernetes watch
event or a libvirt domain event arrives (never by polling), so the measurement itself costs the
machine next to nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from kubernetes import client, watch

from libvirt_operator.api import meta

RESULTS = Path(__file__).resolve().parent / "results"
NS = "default"


# -- figures -------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank on the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    """n, p50, p95, max (seconds) of a list of durations."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "max": max(values)}


def ms(seconds: float | None) -> str:
    return "      -" if seconds is None else f"{seconds * 1000:7.0f}"


def ratio(op: dict, raw: dict, key: str) -> float | None:
    if not op.get(key) or not raw.get(key):
        return None
    return op[key] / raw[key]


def machine() -> dict:
    """What the figures were measured on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal")).split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "libvirt": _version(["libvirtd", "--version"]), "qemu": _version(["qemu-system-x86_64", "--version"]),
            "accel": "tcg",  # every benchmark VM is domainType qemu, whatever the host offers
            "kvm_available": os.path.exists("/dev/kvm"), "load_average": load_average(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


# -- processes -----------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def qemu_pid_of(uuid: str) -> int | None:
    """The QEMU process whose command line carries `-uuid <uuid>`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-uuid" in args and uuid.encode() in args:
            return int(entry.name)
    return None


# -- a world of the benchmark's own ----------------------------------------------------------------

@dataclass
class World:
    dir: Path
    cp: object  # localenv.controlplane.ControlPlane
    nodes: list = field(default_factory=list)  # localenv.nodes.LibvirtNode
    cluster: object | None = None  # localenv.cluster.Cluster (None: control plane only)

    @property
    def api(self) -> client.ApiClient:
        return self.cp.api_client()


@contextmanager
def world(node_names: Iterable[str] = ("bench-node",), operator: bool = True,
          agent_env: dict[str, str] | None = None) -> Iterator[World]:
    """A fresh control plane, libvirt nodes and the operator's processes; all torn down afterwards."""
    from localenv.cluster import install
    from localenv.controlplane import ControlPlane
    from localenv.guest import ensure_guest_image
    from localenv.nodes import start_nodes, stop_nodes
    from localenv.operator import OperatorProcesses

    wdir = Path(tempfile.mkdtemp(prefix="lvo-bench-", dir="/var/tmp"))
    cp = ControlPlane(wdir).start()
    saved = {k: os.environ.get(k) for k in (agent_env or {})}
    os.environ.update(agent_env or {})  # the agents inherit the environment
    try:
        w = World(wdir, cp)
        names = list(node_names)
        if names:
            w.nodes = start_nodes(wdir, names)
        if operator:
            w.cluster = install(cp, w.nodes, wdir / "storage", ensure_guest_image(), wdir)
        yield w
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        OperatorProcesses.load(wdir).stop()
        stop_nodes(wdir)
        cp.stop()
        shutil.rmtree(wdir, ignore_errors=True)


def kernel_spec(image, memory: str = "128Mi") -> dict:
    """The benchmarks' VM: the project's test guest by direct kernel boot; delete powers it off at once."""
    return {"domainType": "qemu", "memory": {"size": memory}, "shutdown": {"mode": "force"},
            "boot": {"kernel": {"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": image.cmdline}}}


def vm_body(name: str, spec: dict, namespace: str = NS) -> dict:
    return {"apiVersion": meta.API_VERSION, "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# -- clocks --------------------------------------------------------------------------------------

def _conds(vm: dict) -> dict[str, str]:
    return {c.get("type"): c.get("status") for c in (vm.get("status") or {}).get("conditions") or []}


class VMWatch:
    """Watches VirtualMachines of one namespace; records when each first showed a state.

    marks[name] = {"scheduled": t, "ready": t, "deleted": t, ...}; `predicates` name more
    states (name -> predicate on the object); `reset(name)` forgets a name's marks.
    """

    def __init__(self, api: client.ApiClient, namespace: str = NS,
                 predicates: dict[str, Callable[[dict], bool]] | None = None):
        self.api = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.predicates = {
            "scheduled": lambda vm: _conds(vm).get("Scheduled") == "True",
            "ready": lambda vm: _conds(vm).get("Ready") == "True",
            **(predicates or {}),
        }
        self.marks: dict[str, dict[str, float]] = {}
        self.events = 0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        rv = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, namespace, "virtualmachines",
                                                    limit=1)["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._thread.start()

    def _run(self, rv: str) -> None:
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for ev in self._watch.stream(self.api.list_namespaced_custom_object, meta.GROUP, meta.VERSION,
                                             self.namespace, "virtualmachines", resource_version=rv,
                                             allow_watch_bookmarks=True, timeout_seconds=300):
                    now = time.perf_counter()
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] == "BOOKMARK":
                        continue
                    self._observe(ev["type"], obj, now)
            except Exception:  # an expired watch restarts from the newest version
                if self._stop.is_set():
                    return
                rv = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace,
                                                            "virtualmachines", limit=1)["metadata"]["resourceVersion"]

    def _observe(self, kind: str, obj: dict, now: float) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            self.events += 1
            marks = self.marks.setdefault(name, {})
            if kind == "DELETED":
                marks.setdefault("deleted", now)
            else:
                for state, pred in self.predicates.items():
                    if state not in marks and pred(obj):
                        marks[state] = now
            self._lock.notify_all()

    def reset(self, name: str) -> None:
        with self._lock:
            self.marks.pop(name, None)

    def wait(self, names: Iterable[str], state: str, timeout: float) -> None:
        names = list(names)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                missing = [n for n in names if state not in self.marks.get(n, {})]
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"{len(missing)}/{len(names)} VMs never reached {state}: {missing[:5]}")
                self._lock.wait(min(left, 1.0))

    def close(self) -> None:
        self._stop.set()
        if self._watch:
            self._watch.stop()


_event_loop_started = False


def _start_libvirt_event_loop() -> None:
    global _event_loop_started
    if _event_loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True, name="libvirt-events").start()
    _event_loop_started = True


class DomainEvents:
    """libvirt lifecycle events of one node, by domain UUID: when each was first DEFINED, STARTED,
    STOPPED, UNDEFINED (received by this process, as `virsh event --all` would see them)."""

    KINDS = {libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
             libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined"}

    def __init__(self, uri: str):
        _start_libvirt_event_loop()
        self.marks: dict[str, dict[str, float]] = {}
        self._lock = threading.Condition()
        self.conn = libvirt.open(uri)
        self._cb = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on, None)

    def _on(self, _conn, dom, event, _detail, _opaque) -> None:
        now = time.perf_counter()
        kind = self.KINDS.get(event)
        if kind is None:
            return
        with self._lock:
            self.marks.setdefault(dom.UUIDString(), {}).setdefault(kind, now)
            self._lock.notify_all()

    def reset(self, uuid: str) -> None:
        with self._lock:
            self.marks.pop(uuid, None)

    def wait(self, uuids: Iterable[str], kind: str, timeout: float) -> None:
        uuids = list(uuids)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                missing = [u for u in uuids if kind not in self.marks.get(u, {})]
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"{len(missing)}/{len(uuids)} domains never {kind}")
                self._lock.wait(min(left, 1.0))

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self._cb)
            self.conn.close()
        except libvirt.libvirtError:
            pass


# -- a guest that costs nothing ------------------------------------------------------------------

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_AOUT_KLUDGE = 1 << 16  # the header gives the load addresses (no ELF needed)
LOAD_ADDR = 0x100000


def halt_kernel(directory: Path) -> Path:
    """A 36-byte multiboot kernel that halts its only vCPU for good: QEMU boots it with -kernel, and the
    guest then costs no CPU. For benchmarks of many VMs where the guest does not matter."""
    import struct

    path = directory / "halt.multiboot"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        header_len = 32
        checksum = (-(MULTIBOOT_MAGIC + MULTIBOOT_AOUT_KLUDGE)) & 0xFFFFFFFF
        header = struct.pack("<8I", MULTIBOOT_MAGIC, MULTIBOOT_AOUT_KLUDGE, checksum,
                             LOAD_ADDR, LOAD_ADDR, 0, 0, LOAD_ADDR + header_len)
        code = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt
        path.write_bytes(header + code)
    return path


def halt_spec(kernel: Path, memory: str = "16Mi") -> dict:
    return {"domainType": "qemu", "memory": {"size": memory}, "shutdown": {"mode": "force"},
            "boot": {"kernel": {"kernel": str(kernel)}}}


# -- metrics of the operator's processes ---------------------------------------------------------

def scrape(port: int) -> list[tuple[str, dict, float]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CPUMeter:
    """CPU seconds each named process spends between start() and stop(): robust on a busy machine,
    where wall-clock figures mostly measure the neighbours."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.spent: dict[str, float] = {}

    def start(self) -> CPUMeter:
        self._start = {n: cpu_seconds(p) for n, p in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.spent = {n: cpu_seconds(p) - self._start[n] for n, p in self.pids.items()}
        return self.spent


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])
