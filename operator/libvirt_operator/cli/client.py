"""The API server, as the plugin uses it: kubeconfig like kubectl, and the operator's objects."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.cli.plan import JSON_PATCH, VM_PLURAL, CreateObject, PatchVM, Plan, Refused


class VMClient:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.api_client = api_client
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def get(self, name: str, plural: str = VM_PLURAL) -> dict:
        try:
            return self.api.get_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                kind = plural.removesuffix("s")
                raise Refused(f'{kind} "{name}" not found in namespace "{self.namespace}"') from None
            raise

    def list(self, all_namespaces: bool) -> list[dict]:
        if all_namespaces:
            res = self.api.list_cluster_custom_object(meta.GROUP, meta.VERSION, VM_PLURAL)
        else:
            res = self.api.list_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, VM_PLURAL)
        return res.get("items", [])

    def patch(self, name: str, body: Any, content_type: str) -> dict:
        try:
            return self.api.patch_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, VM_PLURAL, name,
                                                           body, _content_type=content_type)
        except ApiException as exc:
            if exc.status == 422 and content_type == JSON_PATCH and "test" in api_message(exc).lower():
                raise Refused(f"{name} changed while this command ran; run it again") from None
            raise

    def create(self, plural: str, body: dict) -> dict:
        body = copy.deepcopy(body)
        body.setdefault("apiVersion", meta.API_VERSION)
        body["metadata"].setdefault("namespace", self.namespace)
        try:
            return self.api.create_namespaced_custom_object(meta.GROUP, meta.VERSION, self.namespace, plural, body)
        except ApiException as exc:
            if exc.status == 409:
                raise Refused(f'{plural.removesuffix("s")} "{body["metadata"]["name"]}" already exists') from None
            raise

    def apply(self, name: str, p: Plan) -> tuple[str, dict] | None:
        """Take the plan's actions in order; the plural and object of the last one (None without actions)."""
        last = None
        for action in p.actions:
            if isinstance(action, PatchVM):
                last = (VM_PLURAL, self.patch(name, action.body, action.content_type))
            elif isinstance(action, CreateObject):
                last = (action.plural, self.create(action.plural, action.body))
            else:  # pragma: no cover - the Action union is closed
                raise TypeError(action)
        return last


def api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or exc)


def connect(kubeconfig: str | None, context: str | None) -> tuple[client.ApiClient, str]:
    """An ApiClient and the default namespace, as kubectl finds them: --kubeconfig, else KUBECONFIG,
    else ~/.kube/config; in a pod without either, the service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not (kubeconfig or os.environ.get("KUBECONFIG")) and not os.path.exists(path) and \
            os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else "default"
    api_client = config.new_client_from_config(config_file=path, context=context)
    contexts, active = config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    ns = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return api_client, ns
