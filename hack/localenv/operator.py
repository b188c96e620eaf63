"""Run the operator's controller and one agent per libvirt node as local processes."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from localenv import procs
from localenv.nodes import LibvirtNode

NAMESPACE = "libvirt-operator-system"


def _metrics_env() -> dict[str, str]:
    """A free local port per process for its /metrics endpoint (several agents share this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"LVO_METRICS_PORT": str(port), "LVO_METRICS_ADDRESS": "127.0.0.1"}


def local_root(node: LibvirtNode) -> Path:
    """A node's local (unshared) storage root in the world: <world>/nodes/<name>/local-images."""
    return node.state_dir / "local-images"


@dataclass
class OperatorProcesses:
    world_dir: Path
    processes: dict[str, procs.ProcessRef] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.world_dir / "operator"

    def start_controller(self, kubeconfig: Path, namespace: str = NAMESPACE) -> procs.ProcessRef:
        env = {"KUBECONFIG": str(kubeconfig), "LVO_NAMESPACE": namespace, **_metrics_env()}
        return self._start("controller", [sys.executable, "-m", "libvirt_operator.controller"], env)

    def start_agent(self, node_name: str, libvirt_uri: str, kubeconfig: Path, storage_roots: list[Path],
                    console_dir: Path, namespace: str = NAMESPACE, *,
                    shared_storage_roots: list[Path] | tuple[Path, ...] = (),
                    migration_uri: str | None = None, migration_address: str | None = None) -> procs.ProcessRef:
        console_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "KUBECONFIG": str(kubeconfig), "LVO_NAMESPACE": namespace, "NODE_NAME": node_name,
            "LIBVIRT_URI": libvirt_uri, "LVO_STORAGE_ROOTS": ":".join(map(str, storage_roots)),
            "LVO_CONSOLE_LOG_DIR": str(console_dir), **_metrics_env(),
        }
        if shared_storage_roots:
            env["LVO_SHARED_STORAGE_ROOTS"] = ":".join(map(str, shared_storage_roots))
        if migration_uri:
            env["LVO_MIGRATION_URI"] = migration_uri
        if migration_address:
            env["LVO_MIGRATION_ADDRESS"] = migration_address
        return self._start(f"agent-{node_name}", [sys.executable, "-m", "libvirt_operator.agent"], env)

    def start_node_agent(self, node: LibvirtNode, kubeconfig: Path, storage_dir: Path,
                         namespace: str = NAMESPACE) -> procs.ProcessRef:
        """The world's agent of a libvirt node: the shared `storage_dir` (declared shared: every node sees it
        at the same path) plus the node's own local root (a different path per node, for whole-machine
        migrations), migrations over the node's TCP URI with the data streams on loopback."""
        local = local_root(node)
        local.mkdir(mode=0o755, parents=True, exist_ok=True)
        return self.start_agent(node.name, node.uri, kubeconfig, [storage_dir, local], storage_dir / "console",
                                namespace, shared_storage_roots=[storage_dir], migration_uri=node.uri,
                                migration_address="127.0.0.1")

    def restart(self, name: str) -> procs.ProcessRef:
        """Start a stopped or killed component again with the environment it had."""
        ref = self.processes[name]
        if ref.running():
            procs.stop(ref)
        argv = [sys.executable, "-m", "libvirt_operator.controller" if name == "controller"
                else "libvirt_operator.agent"]
        env = self.envs[name]
        if "LVO_METRICS_PORT" not in env:  # saved by a version without metrics: all would want 8080
            env = {**env, **_metrics_env()}
        return self._start(name, argv, env)

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would."""
        ref = self.processes[name]
        os.kill(ref.pid, 9)
        procs.wait_until(lambda: not ref.running(), f"{name} to die", 10)

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> procs.ProcessRef:
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        ref = procs.start_detached(name, argv, self.dir / f"{name}.log", env=full_env)
        time.sleep(0.3)
        if not ref.running():
            raise procs.StartupError(f"{name} exited at once:\n{ref.log_tail()}")
        self.processes[name], self.envs[name] = ref, env
        self._save()
        return ref

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        procs.write_json(self.dir / "state.json", {
            "processes": {n: r.to_dict() for n, r in self.processes.items()}, "envs": self.envs})

    @classmethod
    def load(cls, world_dir: Path) -> OperatorProcesses:
        ops = cls(Path(world_dir))
        state_file = ops.dir / "state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            ops.processes = {n: procs.ProcessRef.from_dict(r) for n, r in state["processes"].items()}
            ops.envs = state.get("envs", {})
        return ops

    def stop(self) -> None:
        for ref in self.processes.values():
            procs.stop(ref)
        self._save()
