"""Our custom resources over the API: get, patch, and server-side apply of status."""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.kube.client import api_client, custom_objects

VMS = "virtualmachines"
SNAPSHOTS = "vmsnapshots"
MIGRATIONS = "vmmigrations"
QOS_POLICIES = "vmqospolicies"
KIND_OF = {VMS: "VirtualMachine", SNAPSHOTS: "VMSnapshot", MIGRATIONS: "VMMigration", QOS_POLICIES: "VMQosPolicy"}


def get(plural: str, namespace: str, name: str) -> dict | None:
    try:
        return custom_objects().get_namespaced_custom_object(meta.GROUP, meta.VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_all(plural: str, label_selector: str | None = None) -> list[dict]:
    kwargs = {"label_selector": label_selector} if label_selector else {}
    res = custom_objects().list_cluster_custom_object(meta.GROUP, meta.VERSION, plural, **kwargs)
    return res.get("items", [])


def merge_patch(plural: str, namespace: str, name: str, patch: dict) -> dict:
    return custom_objects().patch_namespaced_custom_object(
        meta.GROUP, meta.VERSION, namespace, plural, name, patch
    )


def json_patch(plural: str, namespace: str, name: str, ops: list[dict]) -> dict:
    """A JSON patch (RFC 6902): its `test` operations make it conditional on just the fields they name."""
    # a list: the client library turns a json-patch with any other body into a strategic merge patch
    return _call("PATCH", _path(plural, namespace, name), list(ops), "application/json-patch+json")


def apply_status(plural: str, namespace: str, name: str, status: dict[str, Any], manager: str,
                 force: bool = True, resource_version: str | None = None) -> dict:
    """Server-side apply of the status fields this manager owns (others' fields stay).

    With force=False a field that another manager set to a different value is not taken
    over: the apply fails with ApiException 409 (Conflict) instead. With `resource_version`
    the apply fails with 409 if the object changed since that version was read.
    """
    md = {"name": name, "namespace": namespace, **({"resourceVersion": resource_version} if resource_version else {})}
    body = {"apiVersion": meta.API_VERSION, "kind": KIND_OF[plural], "metadata": md, "status": status}
    return _call("PATCH", _path(plural, namespace, name) + "/status", body,
                 "application/apply-patch+yaml", {"fieldManager": manager, "force": str(force).lower()})


def _path(plural: str, namespace: str, name: str) -> str:
    return f"/apis/{meta.GROUP}/{meta.VERSION}/namespaces/{namespace}/{plural}/{name}"


def _call(method: str, path: str, body: Any, content_type: str, query: dict | None = None) -> dict:
    """A raw request (param_serialize + call_api, the ApiClient API of kubernetes 37); non-2xx raises ApiException."""
    client = api_client()
    if content_type == "application/apply-patch+yaml":
        body = json.dumps(body)  # JSON is YAML; the REST layer sends strings as they are
    request = client.param_serialize(
        method, path,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = client.call_api(*request)
    resp.read()
    if not 200 <= resp.status <= 299:
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    return json.loads(resp.data)
