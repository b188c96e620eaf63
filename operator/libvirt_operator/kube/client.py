"""One configured ApiClient per process: in-cluster, else KUBECONFIG."""

from __future__ import annotations

import functools
import os

from kubernetes import client, config

POOL_SIZE = 48


@functools.cache
def api_client() -> client.ApiClient:
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
    else:
        # Read KUBECONFIG now: the client library's default was fixed when it was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    cfg = client.Configuration.get_default_copy()
    # One pooled HTTPS connection per blocking thread: beyond the pool, every call would open
    # (and TLS-handshake) a connection of its own.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, POOL_SIZE)
    return client.ApiClient(cfg)


def custom_objects() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def coordination() -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api_client())
