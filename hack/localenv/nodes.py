"""Isolated libvirt "nodes" on one machine for the local test world.

Each node is its own libvirtd + virtlogd in a private mount namespace: a tmpfs
over /run and private copies of /etc/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt bind-mounted from
``<world>/nodes/<name>/``. Every other path (e.g. ``<world>/storage``) is shared
by all nodes, like shared storage. Each node also gets its own cgroup subtree
(and cgroup namespace), so its domains live in its own ``machine/`` partition.
Nodes are reached over TCP on 127.0.0.1 and outlive the Python process that
started them: ``LibvirtNode.load`` finds a running node again from its state
directory. A node's first process is a subreaper (``subreaper.py``) that adopts
and promptly reaps the node's daemonized processes, so a QEMU that exits is gone
at once (libvirtd reports STOPPED only then) whatever the machine's PID 1 does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt

# Host directories replaced per node (name of the private copy -> host path).
PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
# Each node owns a block of loopback ports: libvirtd's TCP port, then QEMU's
# migration ports, then VNC/SPICE display ports.
MIGRATION_PORTS = 16
DISPLAY_PORTS = 16
PORT_BLOCK = 1 + MIGRATION_PORTS + DISPLAY_PORTS
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range (32768+)
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
SUBREAPER = Path(__file__).with_name("subreaper.py")
# /proc/<pid>/comm of the processes whose PIDs the state directory records.
DAEMON_COMMS = {"libvirtd": "libvirtd", "virtlogd": "virtlogd", "subreaper": "lvo-subreaper"}

# The launch runs in two steps. First the shell moves itself into the node's
# cgroups, then re-executes itself in a new cgroup + mount namespace whose
# cgroup root is that node cgroup: libvirt's "machine" partition is then
# per node (qemu-1-vm cgroups of two nodes would collide otherwise).
_ENTER_CGROUPS = """
set -e
for procs in {procs_files}; do echo $$ >"$procs"; done
exec unshare -C -m --propagation private sh -c "$1"
"""
_LAUNCH = """
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/libvirt /run/lock
for pair in {mounts}; do mount --bind "${{pair%%=*}}" "${{pair#*=}}"; done
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
{cgroup_mounts}
for mp in {cgroup_mount_points}; do echo $$ >"$mp/daemons/cgroup.procs"; done
exec {subreaper} sh -c {daemons}
"""
# Run by the subreaper, which then stays in the namespaces as the daemons' reaper.
_VIRTLOGD = "virtlogd -d -p {state}/virtlogd.pid"
_LIBVIRTD = "libvirtd -d --listen -p {state}/libvirtd.pid"
_DAEMONS = f"set -e; {_VIRTLOGD}; {_LIBVIRTD}"
# revive(): back into the namespaces of a node whose libvirtd died (its QEMUs may still run),
# under a new subreaper, so the new daemons and their QEMUs are reaped promptly as well.
_REENTER = """
set -e
for mp in {cgroup_mount_points}; do echo $$ >"$mp/daemons/cgroup.procs"; done
exec {subreaper} sh -c {daemons}
"""


@dataclass
class LibvirtNode:
    name: str
    world_dir: Path
    port: int
    host_uuid: str
    cgroup_dirs: list[str] = field(default_factory=list)  # host paths of the node's cgroup roots

    # Private copies of host directories (name under state_dir -> path inside the node); a
    # subclass may add some, e.g. "run": "/run/libvirt" to reach libvirt's socket from the host.
    private_dirs = PRIVATE_DIRS

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @property
    def state_dir(self) -> Path:
        return Path(self.world_dir) / "nodes" / self.name

    @property
    def migration_ports(self) -> tuple[int, int]:
        return self.port + 1, self.port + MIGRATION_PORTS

    @property
    def display_ports(self) -> tuple[int, int]:
        first = self.port + 1 + MIGRATION_PORTS
        return first, first + DISPLAY_PORTS - 1

    @classmethod
    def load(cls, world_dir: Path | str, name: str) -> LibvirtNode:
        data = json.loads((Path(world_dir) / "nodes" / name / "node.json").read_text())
        return cls(world_dir=Path(world_dir), **data)

    @property
    def cgroup_name(self) -> str:
        world_id = hashlib.sha1(str(Path(self.world_dir).resolve()).encode()).hexdigest()[:10]
        return f"lvo.{self.name}.{world_id}"

    def inside(self, path: str) -> Path:
        """``path`` as the node's daemons see it (e.g. its own /sys/fs/cgroup or /run)."""
        pid = self._daemon_pid("libvirtd")
        if pid is None:
            raise RuntimeError(f"node {self.name} is not running")
        return Path(f"/proc/{pid}/root{path}")

    # --- lifecycle -------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Starts the node's daemons and waits until libvirt accepts connections."""
        if self.is_running():
            return
        _seed_capabilities(self.state_dir / "cache")
        mounts = " ".join(f"{self.state_dir / d}={host}" for d, host in self.private_dirs.items())
        hierarchies = _cgroup_hierarchies()
        self.cgroup_dirs = [_make_node_cgroup(h, self.cgroup_name) for h in hierarchies]
        self._write_state()
        state = shlex.quote(str(self.state_dir))
        subreaper = shlex.join(
            [sys.executable, "-I", str(SUBREAPER), f"{self.state_dir}/subreaper.pid", f"{self.state_dir}/subreaper.log"]
        )
        launch_script = _LAUNCH.format(
            mounts=mounts,
            subreaper=subreaper,
            daemons=shlex.quote(_DAEMONS.format(state=state)),
            cgroup_mounts="\n".join(h.mount_command() for h in hierarchies),
            cgroup_mount_points=" ".join(h.mount_point for h in hierarchies),
        )
        enter_script = _ENTER_CGROUPS.format(procs_files=" ".join(f"{d}/cgroup.procs" for d in self.cgroup_dirs))
        launch = subprocess.run(
            ["sh", "-c", enter_script, "sh", launch_script],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if launch.returncode != 0:
            self.stop()
            raise RuntimeError(f"node {self.name}: launch failed: {launch.stderr.strip()}")
        try:
            self._wait_until_open(timeout)
        except RuntimeError:
            self.stop()
            raise
        _save_capabilities(self.state_dir / "cache")

    def revive(self, timeout: float = START_TIMEOUT) -> bool:
        """Starts a dead libvirtd (and virtlogd) again inside the node's existing mount and cgroup
        namespaces, where libvirt's runtime state of the still-running QEMUs lives: libvirtd
        re-adopts them. Returns False (touching nothing) when no process of the old namespaces
        is left to enter; start() is then the way."""
        if self.is_running():
            return True
        anchor = self._daemon_pid("subreaper") or self._daemon_pid("virtlogd")
        if anchor is None:
            return False
        state = shlex.quote(str(self.state_dir))
        daemons = ([] if self._daemon_pid("virtlogd") else [_VIRTLOGD]) + [_LIBVIRTD]
        subreaper = shlex.join(
            [sys.executable, "-I", str(SUBREAPER), f"{self.state_dir}/subreaper.pid", f"{self.state_dir}/subreaper.log"]
        )
        script = _REENTER.format(
            cgroup_mount_points=" ".join(h.mount_point for h in _cgroup_hierarchies()),
            subreaper=subreaper,
            daemons=shlex.quote("set -e; " + "; ".join(d.format(state=state) for d in daemons)),
        )
        launch = subprocess.run(["nsenter", "-t", str(anchor), "-m", "-C", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if launch.returncode != 0:
            raise RuntimeError(f"node {self.name}: revive failed: {launch.stderr.strip()}")
        self._wait_until_open(timeout)
        return True

    def stop(self, timeout: float = STOP_TIMEOUT) -> list[int]:
        """Destroys the node's domains, stops its daemons, then SIGKILLs whatever of
        the node is left (e.g. QEMUs of a crashed libvirtd) and last its subreaper.
        Returns the killed PIDs (the subreaper aside); raises if any process of the
        node survives."""
        if self.is_running():
            self._destroy_domains()
        reaper = self._daemon_pid("subreaper")
        daemons = [pid for pid in map(self._daemon_pid, ("libvirtd", "virtlogd")) if pid]
        for pid in daemons:
            _signal(pid, signal.SIGTERM)
        _wait_until(lambda: not any(map(_is_alive, daemons)), timeout / 2)
        stragglers = [pid for pid in self.processes() if pid != reaper]
        for pid in stragglers:
            _signal(pid, signal.SIGKILL)
        _wait_until(lambda: set(self.processes()) <= {reaper}, timeout / 4)
        if reaper:  # it exits by itself once it has reaped every child
            _wait_until(lambda: not _is_alive(reaper), 2.0)
        left = self.processes()  # a stuck reaper, or whatever started meanwhile
        stragglers += [pid for pid in left if pid != reaper]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        if not _wait_until(lambda: not self.processes(), timeout / 4):
            raise RuntimeError(f"node {self.name}: processes survived SIGKILL: {_describe(self.processes())}")
        for cgroup_dir in self.cgroup_dirs:
            _remove_cgroup_tree(Path(cgroup_dir))
        return stragglers

    def is_running(self) -> bool:
        return self._daemon_pid("libvirtd") is not None

    def processes(self) -> list[int]:
        """Live processes of this node: every one that sees its private /var/lib/libvirt
        (libvirtd, virtlogd, QEMU in its per-domain mount namespace, helpers)."""
        return [pid for pid in _live_pids() if self._owns(pid)]

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    # --- internals -------------------------------------------------------

    def _write_state(self) -> None:
        state = self.state_dir
        for d in self.private_dirs:
            (state / d).mkdir(parents=True, exist_ok=True)
        _copy_host_config(state / "etc")
        mig_min, mig_max = self.migration_ports
        disp_min, disp_max = self.display_ports
        (state / "etc" / "libvirtd.conf").write_text(
            "listen_tls = 0\n"
            "listen_tcp = 1\n"
            'listen_addr = "127.0.0.1"\n'
            f'tcp_port = "{self.port}"\n'
            'auth_tcp = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (state / "etc" / "qemu.conf").write_text(
            # Root so QEMU can read images under /root/.cache; no MAC labelling so
            # the world behaves the same with or without AppArmor/SELinux.
            'user = "root"\n'
            'group = "root"\n'
            'security_driver = "none"\n'
            f"migration_port_min = {mig_min}\n"
            f"migration_port_max = {mig_max}\n"
            f"remote_display_port_min = {disp_min}\n"
            f"remote_display_port_max = {disp_max}\n"
        )
        (state / "node.json").write_text(
            json.dumps({k: v for k, v in asdict(self).items() if k != "world_dir"}, indent=2)
        )

    def _wait_until_open(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                log = self.state_dir / "log" / "libvirtd.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise RuntimeError(f"node {self.name}: libvirtd exited during start:\n{tail}")
            # A quiet TCP probe first; libvirtd accepts clients once its drivers are up.
            if _port_open(self.port):
                try:
                    conn = libvirt.open(self.uri)
                    conn.getVersion()
                    conn.close()
                    return
                except libvirt.libvirtError as err:
                    error = err
            else:
                error = f"nothing listens on port {self.port}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: libvirtd not usable at {self.uri}: {error}")
            time.sleep(0.2)

    def _destroy_domains(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return  # daemon unreachable: its QEMUs get killed as leftovers
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):  # already gone
                    dom.destroy()
        finally:
            conn.close()

    def _daemon_pid(self, daemon: str) -> int | None:
        """PID from the daemon's pid file, if that process is alive and ours."""
        try:
            pid = int((self.state_dir / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_alive(pid) and _comm(pid) == DAEMON_COMMS[daemon] and self._owns(pid) else None

    def _owns(self, pid: int) -> bool:
        lib_dir = str((self.state_dir / "lib").resolve())
        mountinfo = _mountinfo(pid)
        if mountinfo is None:
            return False
        for line in mountinfo.splitlines():
            fields = line.split()
            # fields[3]: root of the mount inside its filesystem; fields[4]: mount point.
            # The root is relative to the filesystem holding the world dir, hence a
            # suffix match (which still includes the world dir's own name).
            if fields[4] == "/var/lib/libvirt" and fields[3] != "/" and lib_dir.endswith(fields[3]):
                return fields[3].count("/") >= 3
        return False


def start_nodes(world_dir: Path | str, names: list[str]) -> list[LibvirtNode]:
    """Creates and starts nodes under ``<world>/nodes/`` plus the shared ``<world>/storage``."""
    world = Path(world_dir)
    (world / "storage").mkdir(parents=True, exist_ok=True)
    os.chmod(world / "storage", 0o755)
    nodes = [
        LibvirtNode(name=name, world_dir=world, port=port, host_uuid=str(uuid.uuid4()))
        for name, port in zip(names, _free_port_blocks(len(names)), strict=True)
    ]
    try:
        for node in nodes:
            node.start()
    except Exception:
        for node in nodes:
            node.stop()
        raise
    return nodes


def load_nodes(world_dir: Path | str) -> list[LibvirtNode]:
    nodes_dir = Path(world_dir) / "nodes"
    names = sorted(p.parent.name for p in nodes_dir.glob("*/node.json")) if nodes_dir.exists() else []
    return [LibvirtNode.load(world_dir, name) for name in names]


def stop_nodes(world_dir: Path | str) -> dict[str, list[int]]:
    """Stops every node of the world (works from a fresh process); returns the
    stragglers each node's stop() had to kill."""
    errors, killed = [], {}
    for node in load_nodes(world_dir):
        try:
            killed[node.name] = node.stop()
        except RuntimeError as err:
            errors.append(str(err))
    if errors:
        raise RuntimeError("; ".join(errors))
    return killed


# --- helpers -------------------------------------------------------------


def _copy_host_config(dest: Path) -> None:
    """The host's libvirt config files, without its domain/network definitions or hooks."""
    host = Path("/etc/libvirt")
    for conf in host.glob("*.conf"):
        shutil.copy2(conf, dest / conf.name)
    if (host / "nwfilter").is_dir() and not (dest / "nwfilter").exists():
        shutil.copytree(host / "nwfilter", dest / "nwfilter")
    (dest / "qemu" / "networks").mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class _Hierarchy:
    """A cgroup hierarchy mounted on the host, and our place in it."""

    mount_point: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    controllers: str  # v1: "cpu", "cpu,cpuacct", "name=systemd"; v2: ""
    placement: str  # our cgroup, relative to the mount's root

    def mount_command(self) -> str:
        if self.fstype == "cgroup2":
            return f"mkdir -p {self.mount_point} && mount -t cgroup2 cgroup2 {self.mount_point}"
        opts = f"none,{self.controllers}" if self.controllers.startswith("name=") else self.controllers
        return f"mkdir -p {self.mount_point} && mount -t cgroup -o {opts} cgroup {self.mount_point}"


def _cgroup_hierarchies() -> list[_Hierarchy]:
    mounts = []  # (mount point, mount root, fstype, super options)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, rest = line.split(" - ", 1)
        fstype, _source, superopts = rest.split()[:3]
        if fstype in ("cgroup", "cgroup2") and fields.split()[4].startswith("/sys/fs/cgroup/"):
            mounts.append((fields.split()[4], fields.split()[3], fstype, set(superopts.split(","))))
    hierarchies = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for mount_point, root, fstype, opts in mounts:
            v2 = fstype == "cgroup2" and not controllers
            v1 = fstype == "cgroup" and controllers and set(controllers.split(",")) <= opts
            if (v1 or v2) and (path + "/").startswith(root.rstrip("/") + "/"):
                relative = path[len(root.rstrip("/")) :]
                hierarchies.append(_Hierarchy(mount_point, fstype, controllers, relative))
                break
    return hierarchies


def _make_node_cgroup(h: _Hierarchy, name: str) -> str:
    """Creates <our cgroup>/<name> and its daemons/ child; returns the former's path."""
    parent = Path(h.mount_point + h.placement)
    node_dir = parent / name
    for d in (node_dir, node_dir / "daemons"):
        d.mkdir(exist_ok=True)
        if "cpuset" in h.controllers.split(","):  # v1 cpusets start empty
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (d / knob).write_text((parent / knob).read_text())
    return str(node_dir)


def _remove_cgroup_tree(top: Path) -> None:
    """rmdir bottom-up (cgroup directories hold only virtual files)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise RuntimeError(f"cannot remove cgroup {dirpath}: {err}; threads: {_cgroup_tids(dirpath)}") from err


def _cgroup_tids(cgroup_dir: str) -> str:
    for name in ("tasks", "cgroup.threads"):  # v1, v2
        with contextlib.suppress(OSError):
            return ", ".join(f"{tid} ({_comm(int(tid))})" for tid in Path(cgroup_dir, name).read_text().split())
    return "?"


def _capabilities_seed() -> Path:
    """QEMU capabilities probed by an earlier node (probing costs seconds per node).
    libvirt re-validates the cache against the binaries, so reuse is safe."""
    base = os.environ.get("LIBVIRT_OPERATOR_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "libvirt-operator"
    )
    return Path(base) / "libvirt-qemu-capabilities"


def _seed_capabilities(node_cache: Path) -> None:
    dest = node_cache / "qemu" / "capabilities"
    if dest.exists() or not _capabilities_seed().is_dir():
        return
    shutil.copytree(_capabilities_seed(), dest)


def _save_capabilities(node_cache: Path) -> None:
    seed = _capabilities_seed()
    seed.mkdir(parents=True, exist_ok=True)
    for xml in (node_cache / "qemu" / "capabilities").glob("*.xml"):
        tmp = seed / f".{xml.name}.{os.getpid()}"
        shutil.copy2(xml, tmp)
        tmp.rename(seed / xml.name)  # atomic: concurrent worlds may do the same


def _free_port_blocks(count: int) -> list[int]:
    """First ports of ``count`` disjoint blocks of PORT_BLOCK free loopback ports."""
    bases: list[int] = []
    rng = random.Random()
    while len(bases) < count:
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - PORT_BLOCK)
        if any(abs(base - b) < PORT_BLOCK for b in bases):
            continue
        if all(_port_free(p) for p in range(base, base + PORT_BLOCK)):
            bases.append(base)
    return bases


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _live_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_alive(int(p.name))]


def _live_threads(pid: int) -> list[int]:
    """Threads of the process that have not finished exiting. A process whose main
    thread is already a zombie can still have threads running (or busy exiting,
    e.g. freeing QEMU's guest RAM); those still hold the process's cgroups."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return []
    live = []
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            live.append(tid)
    return live


def _is_alive(pid: int) -> bool:
    """True until every thread of the process has exited; a zombie is not alive."""
    return bool(_live_threads(pid))


def _mountinfo(pid: int) -> str | None:
    """The process's mount table, read through a live thread (a zombie main thread has none)."""
    for tid in _live_threads(pid):
        try:
            return Path(f"/proc/{pid}/task/{tid}/mountinfo").read_text()
        except OSError:
            continue
    return None


def _describe(pids: list[int]) -> str:
    return ", ".join(f"{pid} ({_comm(pid)}, threads {_live_threads(pid)})" for pid in pids) or "none"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
