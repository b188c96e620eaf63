"""Controller settings, from the environment (the Deployment sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libvirt_operator.api import meta


@dataclass(frozen=True)
class ControllerConfig:
    namespace: str = meta.DEFAULT_NAMESPACE  # where agents renew their leases
    watch_namespaces: tuple[str, ...] = ()  # kopf namespace patterns; empty = cluster-wide
    retry_seconds: float = 5.0  # how often an unplaceable VM is tried again
    liveness_endpoint: str | None = None  # e.g. http://0.0.0.0:8080/healthz
    log_level: str = "INFO"
    migrations_per_node: int = 2  # active VMMigrations a node takes part in (source or target)
    migrations_per_cluster: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControllerConfig:
        env = os.environ if env is None else env
        kwargs: dict = {}
        if env.get("LVO_NAMESPACE"):
            kwargs["namespace"] = env["LVO_NAMESPACE"]
        if env.get("LVO_WATCH_NAMESPACES"):
            kwargs["watch_namespaces"] = tuple(p.strip() for p in env["LVO_WATCH_NAMESPACES"].split(",") if p.strip())
        if env.get("LVO_PLACEMENT_RETRY_SECONDS"):
            kwargs["retry_seconds"] = float(env["LVO_PLACEMENT_RETRY_SECONDS"])
            if kwargs["retry_seconds"] <= 0:
                raise SystemExit("LVO_PLACEMENT_RETRY_SECONDS must be positive")
        if env.get("LVO_LIVENESS_ENDPOINT"):
            kwargs["liveness_endpoint"] = env["LVO_LIVENESS_ENDPOINT"]
        if env.get("LVO_LOG_LEVEL"):
            kwargs["log_level"] = env["LVO_LOG_LEVEL"].upper()
        for key, field in (("LVO_MIGRATIONS_PER_NODE", "migrations_per_node"),
                           ("LVO_MIGRATIONS_PER_CLUSTER", "migrations_per_cluster")):
            if env.get(key):
                try:
                    kwargs[field] = int(env[key])
                except ValueError:
                    raise SystemExit(f"{key} must be a whole number, not {env[key]!r}") from None
                if kwargs[field] < 1:
                    raise SystemExit(f"{key} must be at least 1")
        return cls(**kwargs)
