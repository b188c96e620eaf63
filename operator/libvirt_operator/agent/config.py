"""Agent settings, from the environment (the DaemonSet sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from libvirt_operator.api import meta


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    libvirt_uri: str = "qemu:///system"
    namespace: str = meta.DEFAULT_NAMESPACE
    storage_roots: tuple[Path, ...] = (Path("/var/lib/libvirt/images"),)
    console_log_dir: Path = Path("/var/log/libvirt/qemu")
    resync_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    # Reconcile workers: a pass that starts a domain holds its worker for the whole createWithFlags
    # (seconds under TCG), so a burst of 50 starts needs about as many; asyncio tasks are cheap, the
    # libvirt threads (workers + 8) and connections bound what runs at once.
    workers: int = 48
    # libvirtd runs 5 calls per connection at a time (max_client_requests); a VM's calls stay on one
    # connection (by UUID), so with 8 the VMs of a burst of 50 deletes that hash to a busy connection waited
    # there behind its 5 destroys in flight (bench/vm_start.py, delete of 50: with 16, at raw's pace).
    libvirt_connections: int = 16
    # Roots on storage shared with other nodes (same path there): a Live migration needs every file
    # of the VM under one, on both nodes; only then is VIR_MIGRATE_UNSAFE passed.
    shared_storage_roots: tuple[Path, ...] = ()
    migration_uri: str | None = None  # how other nodes' libvirtd reach this one (default: libvirt_uri)
    migration_address: str | None = None  # address of the migration data and NBD streams

    @property
    def migration_target_uri(self) -> str:
        return self.migration_uri or self.libvirt_uri

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AgentConfig:
        env = dict(os.environ if env is None else env)
        node = env.get("NODE_NAME")
        if not node:
            raise SystemExit("NODE_NAME must be set (the DaemonSet passes it through the downward API)")
        kwargs: dict = {"node_name": node}
        if "LIBVIRT_URI" in env:
            kwargs["libvirt_uri"] = env["LIBVIRT_URI"]
        if "LVO_NAMESPACE" in env:
            kwargs["namespace"] = env["LVO_NAMESPACE"]
        if env.get("LVO_STORAGE_ROOTS"):
            kwargs["storage_roots"] = tuple(Path(p) for p in env["LVO_STORAGE_ROOTS"].split(":") if p)
        if env.get("LVO_SHARED_STORAGE_ROOTS"):
            kwargs["shared_storage_roots"] = tuple(Path(p) for p in env["LVO_SHARED_STORAGE_ROOTS"].split(":") if p)
        if env.get("LVO_MIGRATION_URI"):
            kwargs["migration_uri"] = env["LVO_MIGRATION_URI"]
        if env.get("LVO_MIGRATION_ADDRESS"):
            kwargs["migration_address"] = env["LVO_MIGRATION_ADDRESS"]
        if env.get("LVO_CONSOLE_LOG_DIR"):
            kwargs["console_log_dir"] = Path(env["LVO_CONSOLE_LOG_DIR"])
        if env.get("LVO_RESYNC_SECONDS"):
            kwargs["resync_seconds"] = float(env["LVO_RESYNC_SECONDS"])
        if env.get("LVO_WORKERS"):
            kwargs["workers"] = int(env["LVO_WORKERS"])
        if env.get("LVO_LIBVIRT_CONNECTIONS"):
            kwargs["libvirt_connections"] = int(env["LVO_LIBVIRT_CONNECTIONS"])
        return cls(**kwargs)
